"""The drift check's pure side: how planned operations are classified, the exit code and the
summary a scheduler acts on, and the three renderings, on recorded data (no lab, no pyinfra run).
"""

import json
from io import StringIO
from types import SimpleNamespace

import pytest
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.api.hiddenvalue import HiddenValue
from pyinfra.context import ctx_host

from operations import phase
from operations.docker_engine import changed_keys
from scripts.drift import report as r
from scripts.drift.plan import config_failure
from scripts.drift_check import parse_args


def fail_command(reason):
    return FunctionCommand(phase.fail_host, (reason,), {})


def checked(name, *items):
    return r.HostResult(name, items=list(items))


def change(op="Docker Engine | Merge /etc/docker/daemon.json", detail="log-opts.max-file"):
    return r.Item(op, "change", detail)


def conditional(op="Docker Engine | Restart Docker (daemon.json changed)"):
    return r.Item(op, "conditional", "runs only if an earlier operation changes")


# --- Classification ---------------------------------------------------------------------------


def test_an_operation_without_commands_is_no_drift():
    assert r.classify("op", conditional=False, commands=[], explained=[], findings=[]) == []


def test_a_conditional_operation_is_reported_apart_and_never_counted():
    items = r.classify("Restart Docker", conditional=True, commands=["x"], explained=[],
                       findings=[])
    assert [(i.kind, i.counted) for i in items] == [("conditional", False)]


def test_a_change_says_what_the_operation_explained_else_its_first_commands():
    commands = [StringCommand("install -d -m 0755 /etc/docker"),
                FileUploadCommand(StringIO("{}"), "/etc/docker/daemon.json.pyinfra-new")]
    explained = r.classify("Merge", conditional=False, commands=commands,
                           explained=[("daemon.json: managed keys differ: log-opts", None)],
                           findings=[])
    assert [(i.kind, i.detail) for i in explained] == [
        ("change", "daemon.json: managed keys differ: log-opts")]
    raw = r.classify("Merge", conditional=False, commands=commands * 3, explained=[], findings=[])
    assert raw[0].detail == ("install -d -m 0755 /etc/docker; upload "
                             "/etc/docker/daemon.json.pyinfra-new; install -d -m 0755 "
                             "/etc/docker (+3 more)")


def test_a_host_the_deploy_would_fail_is_drift_with_the_reason():
    items = r.classify("Reboot into NVIDIA driver", conditional=False,
                       commands=[fail_command("reboot required: driver 580.95.05 is installed, "
                                              "570.1 is loaded")], explained=[], findings=[])
    assert [(i.kind, i.counted) for i in items] == [("fail", True)]
    assert items[0].detail.startswith("reboot required: driver 580.95.05")


def test_a_finding_counts_even_though_the_operation_changes_nothing():
    items = r.classify("Swarm nodes outside the inventory", conditional=False, commands=[],
                       explained=[], findings=["nodes not in the inventory, left alone: gpu-99"])
    assert [(i.kind, i.counted) for i in items] == [("finding", True)]


def test_masked_values_never_reach_the_report():
    command = StringCommand("docker login -p", HiddenValue("s3cr3t-token"), "registry")
    items = r.classify("Login", conditional=False, commands=[command], explained=[], findings=[])
    assert items[0].detail == "docker login -p *MASKED* registry"


def test_changes_about_other_hosts_are_reported_under_those_hosts():
    items = r.classify("Docker Swarm | Swarm node labels", conditional=False,
                       commands=[StringCommand("docker node update ...")],
                       explained=[("node node-2: remove gpufleet.handmade", "node-2"),
                                  ("node node-3: set gpufleet.gpu.count=2", "node-3")],
                       findings=[])
    hosts = [checked("node-1", *items), checked("node-2"), checked("node-3")]
    r.attribute(hosts)
    assert hosts[0].items == []
    assert [(i.detail, i.via) for i in hosts[1].items] == [
        ("node node-2: remove gpufleet.handmade", "node-1")]
    assert [i.via for i in hosts[2].items] == ["node-1"]


def test_a_change_about_a_host_that_was_not_checked_stays_where_it_was_planned():
    item = r.Item("labels", "change", "node node-9: set x", about="node-9")
    hosts = [checked("node-1", item), r.HostResult("node-9", "unreachable", "refused")]
    r.attribute(hosts)
    assert hosts[0].items == [item] and item.via is None


# --- Exit code and summary --------------------------------------------------------------------


def test_a_clean_fleet_exits_0_and_conditional_operations_do_not_count():
    report = r.Report("inventories/prod.py", hosts=[checked("gpu-01", conditional()),
                                                     checked("gpu-02")])
    assert report.exit_code == r.EXIT_NO_DRIFT == 0
    assert report.summary == "no drift on 2 hosts"
    assert r.text_report(report) == ""


def test_drift_exits_2_and_counts_hosts_and_items():
    report = r.Report("inv", hosts=[checked("gpu-01", change(), conditional()),
                                    checked("gpu-02", change("Model weights | Model m"),
                                            r.Item("Swarm", "finding", "gpu-99")),
                                    checked("gpu-03")])
    assert report.exit_code == r.EXIT_DRIFT == 2
    assert report.summary == "drift: 2 hosts, 3 items"


def test_one_unreachable_host_fails_the_check_and_the_others_are_still_reported():
    report = r.Report("inv", hosts=[checked("gpu-01", change()),
                                    r.HostResult("gpu-02", "unreachable", "Could not connect"),
                                    checked("gpu-03")])
    assert report.exit_code == r.EXIT_CHECK_FAILED == 1
    assert report.summary == ("check failed: gpu-02 (unreachable); drift: 1 host, 1 item on the "
                              "2 other hosts")
    table = r.text_report(report)
    assert "gpu-01" in table and "gpu-02  (unreachable)" in table


def test_a_check_that_could_not_start_exits_1_with_its_reason():
    report = r.Report("inv", failure="bad configuration: host gpu-02: unknown key 'modls_dir'")
    assert report.exit_code == 1
    assert report.summary == "check failed: bad configuration: host gpu-02: unknown key 'modls_dir'"
    assert r.Report("inv").summary == "check failed: the inventory names no host"


def test_config_failure_repeats_the_validations_first_line():
    one = "configuration error: host gpu-02: unknown key 'modls_dir'\n"
    assert config_failure(one) == "bad configuration: host gpu-02: unknown key 'modls_dir'"
    two = one + "configuration error: host gpu-03: docker_log_max_file = 0\n"
    assert config_failure(two).startswith("bad configuration: 2 problems (above), the first: host")
    assert config_failure("") == "bad configuration (see the lines above)"


# --- Renderings -------------------------------------------------------------------------------


RECORDED = r.Report(
    "inventories/prod.py",
    started="2026-11-23T02:00:00+00:00",
    duration_s=41.0,
    hosts=[
        checked("gpu-01", change(), conditional()),
        checked("gpu-02", r.Item("Model weights | Model llama | x", "change",
                                 "model llama: config.json is missing")),
        checked("gpu-03", r.Item("Docker Swarm | Swarm node labels", "change",
                                 "node gpu-03: remove gpufleet.handmade", via="gpu-01")),
        r.HostResult("gpu-04", "unreachable", "Could not connect (timed out)"),
        checked("gpu-05"),
    ],
)


def test_the_table_has_a_row_per_counted_item_and_per_host_not_checked():
    lines = r.text_report(RECORDED).splitlines()
    assert lines[0].split() == ["HOST", "OPERATION", "WHAT", "WOULD", "CHANGE"]
    rows = lines[2:]
    assert [row.split()[0] for row in rows] == ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]
    assert "Swarm node labels (from gpu-01)" in rows[2]
    assert "Restart Docker" not in "\n".join(rows)


def test_json_has_the_summary_totals_and_items_per_host():
    data = json.loads(r.json_text(RECORDED))
    assert data["exit_code"] == 1
    assert data["summary"] == RECORDED.summary
    assert data["totals"] == {"hosts": 5, "hosts_with_drift": 3, "drift_items": 3,
                              "hosts_failed": 1, "conditional": 1}
    hosts = {h["name"]: h for h in data["hosts"]}
    assert hosts["gpu-01"]["drift"][0] == {
        "operation": "Docker Engine | Merge /etc/docker/daemon.json", "kind": "change",
        "detail": "log-opts.max-file", "via": None}
    assert hosts["gpu-01"]["conditional"][0]["kind"] == "conditional"
    assert hosts["gpu-04"] == {"name": "gpu-04", "status": "unreachable",
                               "error": "Could not connect (timed out)", "drift": [],
                               "conditional": []}


def test_markdown_is_fit_for_a_ticket():
    text = r.markdown_report(RECORDED)
    assert text.startswith("## Drift check: CHECK FAILED\n")
    assert f"**{RECORDED.summary}**" in text
    assert "- **gpu-04** (unreachable): Could not connect (timed out)" in text
    # Pipes inside cells are escaped, so the table keeps its columns.
    assert "| Model weights \\| Model llama \\| x | change | model llama: config.json is missing |" \
        in text
    assert "No drift: gpu-05." in text
    assert "Not counted: 1 operation that run" in text


# --- What operations tell the check ------------------------------------------------------------


class _State:
    """A stand-in for pyinfra's State (weakly referenceable)."""


def test_explain_and_finding_are_recorded_per_state_host_and_operation_once():
    state = _State()
    noops = []
    host = SimpleNamespace(name="node-1", state=state, current_op_hash="abc",
                           noop=noops.append)
    with ctx_host.use(host):
        phase.explain("daemon.json: managed keys differ: log-opts")
        phase.explain("daemon.json: managed keys differ: log-opts")  # planned twice
        phase.explain("node node-2: remove x", about="node-2")
        phase.finding("nodes not in the inventory, left alone: gpu-99")
    assert phase.notes_of(state) == [
        ("node-1", "abc", phase.EXPLAIN, "daemon.json: managed keys differ: log-opts", None),
        ("node-1", "abc", phase.EXPLAIN, "node node-2: remove x", "node-2"),
        ("node-1", "abc", phase.FINDING, "nodes not in the inventory, left alone: gpu-99", None),
    ]
    assert noops == ["nodes not in the inventory, left alone: gpu-99"]  # still a noop
    assert phase.notes_of(_State()) == []


def test_explain_is_harmless_without_a_real_state():
    host = SimpleNamespace(name="h", state=1, current_op_hash=None, noop=lambda text: None)
    with ctx_host.use(host):
        phase.explain("anything")  # an int cannot be weakly referenced: nothing recorded


def test_changed_keys_names_the_paths_that_differ_never_values():
    current = {"debug": True, "log-opts": {"max-file": "99", "max-size": "100m"}}
    merged = {"debug": True, "log-driver": "json-file",
              "log-opts": {"max-file": "5", "max-size": "100m"}}
    assert changed_keys(current, merged) == ["log-driver", "log-opts.max-file"]
    assert changed_keys({"a": 1}, {"a": True}) == ["a"]


# --- Command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, json_to, markdown", [
    (["inventories/prod.py"], None, None),
    (["inventories/prod.py", "--json"], "-", None),
    (["inventories/prod.py", "--json", "drift.json", "--markdown", "drift.md"], "drift.json",
     "drift.md"),
])
def test_command_line(argv, json_to, markdown):
    args = parse_args(argv)
    assert (args.inventory, args.json, args.markdown) == ("inventories/prod.py", json_to, markdown)


# --- No noise: operations that would otherwise change something every night ---------------------


def test_a_digest_pinned_engine_image_is_not_drift_once_it_runs():
    from operations.stack import service_drift

    pinned = "reg/vllm:1@sha256:" + "ab" * 32
    want = {"spec": "s1", "replicas": 1, "image": pinned, "secrets": []}
    running = {"labels": {"gpufleet.spec": "s1"}, "replicas": 1, "image": pinned, "secrets": []}
    assert service_drift("svc", running, want) is None
    other = "reg/vllm:1@sha256:" + "cd" * 32
    assert "runs image" in service_drift("svc", {**running, "image": other}, want)


# --- Planning side helpers -----------------------------------------------------------------------


def test_data_overrides_parse_as_pyinfras_and_a_bad_pair_is_refused():
    from scripts.drift.plan import CheckFailed, override_data

    assert override_data(["ssh_key=/run/k/id", "ssh_port=2222", "nvidia_allow_reboot=false"]) == {
        "ssh_key": "/run/k/id", "ssh_port": 2222, "nvidia_allow_reboot": False}
    with pytest.raises(CheckFailed, match="'ssh_key': expected KEY=VALUE"):
        override_data(["ssh_key"])


def test_the_last_error_logged_for_a_host_says_why_it_was_not_checked():
    import logging

    from scripts.drift.plan import _HostErrors

    errors = _HostErrors()
    for message in ("[gpu-02] Could not connect (timed out)", "no host prefix here",
                    "[gpu-03] could not load fact: swarm.SwarmInfo"):
        errors.handle(logging.makeLogRecord({"msg": message, "levelno": logging.ERROR}))
    assert errors.last == {"gpu-02": "Could not connect (timed out)",
                           "gpu-03": "could not load fact: swarm.SwarmInfo"}
