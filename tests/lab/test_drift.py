"""The nightly drift check against the lab: silent on a converged fleet, night after night; names
each host and item that was changed by hand; fails (exit 1) on an unreachable host or a bad
configuration while still checking the other hosts; quiet again once a deploy has repaired it.

The tests share one lab and run in order (converged -> changed by hand -> repaired). The lab is
left converged for the test files after this one.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
TIMINGS: dict = {}

# The test's inventory: the lab's own, read through inventories/lab.py, with changes of a test's
# choosing. Named lab.py so that pyinfra gives its hosts group_data/lab.py, like the real one.
WRAPPER = """\
import runpy as _runpy
_lab = _runpy.run_path({lab_inventory!r})
_changes = {changes!r}
_serve = {serve!r}


def _host(name, data):
    data = {{**data, **_changes.get(name, {{}})}}
    if not _serve and "models" in data:
        data["models"] = [{{**model, "serve": False}} for model in data["models"]]
    return name, data


gpu_nodes = [_host(name, data) for name, data in _lab["gpu_nodes"]]
swarm_managers = _lab["swarm_managers"]
{validate}
"""


def lab_serves(lab) -> bool:
    """Whether the lab can run the inference stack: the lab names engine images its own
    registry holds (in its settings, or in group_data/lab.py). Until it does, the test's
    inventory serves no model, so the deploy does not wait (stack_converge_timeout_s) for
    images no lab registry has, and the stack item of the check (an engine service stopped by
    hand) is not exercised. DRIFT_LAB_SERVE=0 turns serving off on a lab that has images too
    (a stack that cannot converge on this machine would make every deploy wait for it)."""
    if os.environ.get("DRIFT_LAB_SERVE") == "0":
        return False
    return ("stack_engine_images" in lab.state.get("settings", {})
            or "stack_engine_images" in (REPO / "group_data" / "lab.py").read_text())


def write_inventory(lab, directory: Path, changes=None, validate=False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lab.py"
    path.write_text(WRAPPER.format(
        lab_inventory=str(REPO / "inventories" / "lab.py"), changes=changes or {},
        serve=lab_serves(lab),
        validate=("from operations.config import validate_inventory\n"
                  "validate_inventory(globals())" if validate else ""),
    ))
    return path


@pytest.fixture(scope="module")
def inventory(lab, tmp_path_factory):
    return write_inventory(lab, tmp_path_factory.mktemp("drift-inventory"))


def deploy(lab, inventory):
    started = time.monotonic()
    result = lab.pyinfra("-y", str(inventory), "deploy.py")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return time.monotonic() - started


def drift_check(lab, inventory, tmp_path):
    """Run the check as a scheduler would; (exit code, stdout lines, stderr, JSON, Markdown)."""
    report_json, report_md = tmp_path / "drift.json", tmp_path / "drift.md"
    report_json.unlink(missing_ok=True)
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "scripts/drift_check.py", str(inventory),
         "--json", str(report_json), "--markdown", str(report_md)],
        cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=600,
    )
    # The fastest check of the quiet fleet (two nights) is compared with the no-change deploy:
    # other labs on the same two cores make single timings noisy.
    TIMINGS.setdefault("checks", []).append(time.monotonic() - started)
    assert "Traceback" not in result.stderr, result.stderr
    data = json.loads(report_json.read_text()) if report_json.exists() else None
    markdown = report_md.read_text() if report_md.exists() else ""
    return result.returncode, result.stdout.splitlines(), result.stderr, data, markdown


def root_exec(lab, node, command):
    container = next(h["container"] for h in lab.hosts if h["name"] == node)
    result = subprocess.run(["docker", "exec", container, "sh", "-c", command],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def items(data, host):
    entry = next(h for h in data["hosts"] if h["name"] == host)
    return entry["drift"]


def test_a_converged_fleet_shows_no_drift_two_nights_in_a_row(lab, inventory, tmp_path):
    deploy(lab, inventory)  # a fresh lab converges in one run (lab hosts may reboot)
    TIMINGS["deploy_no_change"] = deploy(lab, inventory)
    for night in (1, 2):
        code, out, err, data, markdown = drift_check(lab, inventory, tmp_path)
        assert code == 0, "\n".join(out) + err
        assert out[-1] == f"no drift on {len(lab.hosts)} hosts"
        assert data["totals"]["drift_items"] == 0 and data["exit_code"] == 0
        assert markdown.startswith("## Drift check: OK")
    # Operations that only run after a change are reported apart, never as drift.
    assert all(item["kind"] == "conditional" for h in data["hosts"] for item in h["conditional"])


def test_the_check_takes_no_longer_than_a_deploy_that_changes_nothing():
    # Both connect to every host and read the same facts; the check sends no command that
    # changes anything. Loose bound: two cores shared with other labs make timings noisy.
    check = min(TIMINGS["checks"][:2])
    print(f"drift check {check:.1f}s, no-change deploy {TIMINGS['deploy_no_change']:.1f}s")
    assert check <= 1.5 * TIMINGS["deploy_no_change"] + 10


def test_changes_by_hand_are_found_and_named_per_host_and_item(lab, inventory, tmp_path):
    node1, node2, node3 = (h["name"] for h in lab.hosts[:3])
    # An operator changes a managed daemon.json key on a worker (not on the manager: the repair
    # restarts that host's Docker, and a manager that just restarted sees its workers as down
    # for a moment, too soon for the stack phase that follows) ...
    root_exec(lab, node2, "sed -i 's/\"max-file\": \"[0-9]*\"/\"max-file\": \"99\"/' "
                          "/etc/docker/daemon.json")
    # ... a file of a model's weights goes missing on another host ...
    root_exec(lab, node3, "rm /opt/models/tiny-llama/config.json")
    # ... and a label in the project's namespace is added by hand to a node.
    node2_id = root_exec(lab, node2, "docker info --format '{{.Swarm.NodeID}}'").strip()
    root_exec(lab, node1, f"docker node update --label-add gpufleet.handmade=yes {node2_id}")
    expected = [(node2, "daemon.json"), (node2, "Swarm node labels"), (node3, "Model tiny-llama")]
    if lab_serves(lab):
        # ... and an engine service is stopped.
        root_exec(lab, node1, "docker service scale --detach gpufleet_tiny-llama=0")
        expected.append((node1, "Deploy the inference stack"))
        # ... and a scrape target is dropped from Prometheus' configuration by hand.
        root_exec(lab, node1, "sed -i '/node-3/d' /etc/gpufleet/monitoring/targets/node.json")
        expected.append((node1, "Deploy the monitoring stack"))

    code, out, err, data, markdown = drift_check(lab, inventory, tmp_path)
    assert code == 2, "\n".join(out) + err
    hosts = len({node for node, _ in expected})
    assert out[-1] == f"drift: {hosts} hosts, {len(expected)} items"

    on_node2 = items(data, node2)
    assert any("Merge /etc/docker/daemon.json" in i["operation"]
               and "log-opts.max-file" in i["detail"] for i in on_node2), on_node2
    assert ("Docker Swarm | Swarm node labels", f"node {node2}: remove gpufleet.handmade",
            node1) in [(i["operation"], i["detail"], i["via"]) for i in on_node2]
    assert [i["detail"] for i in items(data, node3)] == [
        "model tiny-llama (gpufleet-lab/tiny-llama@4eab0cd005a1): config.json is missing"]
    if lab_serves(lab):
        assert any("gpufleet_tiny-llama is scaled to 0" in i["detail"]
                   for i in items(data, node1)), items(data, node1)
        assert any("/etc/gpufleet/monitoring/targets/node.json differs" in i["detail"]
                   for i in items(data, node1)), items(data, node1)
    # The table names each host and item; so does the Markdown report.
    table = "\n".join(out)
    for node, operation in expected:
        assert any(line.startswith(node) and operation in line for line in out), table
        assert f"### {node}" in markdown
    assert markdown.startswith("## Drift check: DRIFT")

    # The check changed nothing.
    assert '"max-file": "99"' in root_exec(lab, node2, "cat /etc/docker/daemon.json")
    assert "config.json" not in root_exec(lab, node3, "ls /opt/models/tiny-llama").split()
    assert "gpufleet.handmade" in root_exec(
        lab, node1, f"docker node inspect -f '{{{{json .Spec.Labels}}}}' {node2_id}")


def test_an_unreachable_host_fails_the_check_and_the_others_are_still_checked(lab, tmp_path):
    node1, node2, node3 = (h["name"] for h in lab.hosts[:3])
    unreachable = write_inventory(lab, tmp_path / "unreachable", {node3: {"ssh_port": 1}})
    code, out, err, data, markdown = drift_check(lab, unreachable, tmp_path)
    assert code == 1, "\n".join(out) + err
    assert out[-1].startswith(f"check failed: {node3} (unreachable); drift: ")
    assert out[-1].endswith("on the 2 other hosts")
    assert next(h for h in data["hosts"] if h["name"] == node3)["status"] == "unreachable"
    assert items(data, node2)  # still checked, still drifted
    assert f"- **{node3}** (unreachable)" in markdown


def test_a_bad_configuration_fails_the_check_with_its_own_lines(lab, tmp_path):
    node2 = lab.hosts[1]["name"]
    bad = write_inventory(lab, tmp_path / "bad", {node2: {"modls_dir": "/data"}}, validate=True)
    code, out, err, data, markdown = drift_check(lab, bad, tmp_path)
    assert code == 1
    line = f"host {node2}: unknown key 'modls_dir' = '/data': did you mean 'models_dir'?"
    assert f"configuration error: {line}" in err
    assert out[-1] == f"check failed: bad configuration: {line}"
    assert data["hosts"] == [] and data["exit_code"] == 1


def test_a_deploy_repairs_the_drift_and_the_check_is_quiet_again(lab, inventory, tmp_path):
    deploy(lab, inventory)
    code, out, err, data, markdown = drift_check(lab, inventory, tmp_path)
    assert code == 0, "\n".join(out) + err
    assert out[-1] == f"no drift on {len(lab.hosts)} hosts"
