"""Smoke tests and the load test against the lab's deployed stack: the smoke script passes on a
converged lab, fails naming the endpoint and the check when an engine task is stopped or the
API key is wrong, the load test writes its CSV, Markdown, JSON and PNGs (and its scenario
comparison, restoring the replica count it changed), and a rolling update of the engines under
load fails no request.

The module deploys first (alone, that is every phase; after test_run*.py a converged fleet
gets its stack). Tests run in file order: the stopped engine is back before the load tests.
"""

import csv
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
STACK = "gpufleet"
ENGINE_SERVICE = f"{STACK}_tiny-llama"


def script(lab, name, *args, timeout=900):
    return subprocess.run([PYTHON, str(REPO / "scripts" / name), "inventories/lab.py", *args],
                          cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=timeout)


def api_key(lab):
    return Path(lab.state["settings"]["stack_api_key_file"]).read_text().strip()


def manager_lines(lab, command):
    result = lab.ssh(lab.hosts[0]["name"], command)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def smoke_until_it_passes(lab, attempts=4):
    """Bounded: the stack converging again after a fault (restart delay, model load)."""
    for _ in range(attempts):
        result = script(lab, "smoke.py", "--deadline", "120")
        if result.returncode == 0:
            return result
        time.sleep(5)
    return result


@pytest.fixture(scope="module")
def deployed(lab):
    result = lab.pyinfra("-y", "inventories/lab.py", "deploy.py")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert smoke_until_it_passes(lab).returncode == 0
    return lab


def test_smoke_passes_on_the_deployed_lab(deployed, tmp_path):
    out = tmp_path / "smoke.json"
    result = script(deployed, "smoke.py", "--json", str(out))
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["failures"] == []
    kinds = sorted(e["kind"] for e in report["endpoints"])
    assert "gateway" in kinds and "engine" in kinds, kinds
    for endpoint in report["endpoints"]:
        checks = {c["check"]: c["result"] for c in endpoint["checks"]}
        assert checks == {"health": "pass", "models": "pass", "completion tiny-llama": "pass",
                          "auth": "pass"}, endpoint
        assert all(c["latency_ms"] is not None for c in endpoint["checks"])
    assert api_key(deployed) not in printed + out.read_text()


def test_a_wrong_api_key_fails_naming_endpoint_and_check(deployed, tmp_path):
    wrong = tmp_path / "wrong-key"
    wrong.touch(mode=0o600)
    wrong.write_text("sk-not-the-lab-key\n")
    result = script(deployed, "smoke.py", "--data", f"stack_api_key_file={wrong}",
                    "--deadline", "60")
    assert result.returncode == 1, result.stdout + result.stderr
    failures = [line for line in result.stderr.splitlines() if line.startswith("smoke failed:")]
    assert any("gateway@" in line and "models failed: HTTP 401" in line for line in failures)
    # Engine tasks are reached through the gateway: the same key is refused there, at once.
    assert any("engine tiny-llama@" in line and "health failed: HTTP 401" in line
               for line in failures), failures
    assert "sk-not-the-lab-key" not in result.stdout + result.stderr


def test_a_stopped_engine_task_fails_naming_it(deployed):
    nodes = manager_lines(deployed, f"sudo docker service ps {ENGINE_SERVICE} "
                                    "--filter desired-state=running --format '{{.Node}}'")
    assert nodes, "no engine task runs"
    stopped = nodes[0]
    stop = deployed.ssh(stopped, f"sudo docker ps -q --filter "
                                 f"label=com.docker.swarm.service.name={ENGINE_SERVICE} "
                                 "| xargs -r sudo docker stop -t 5")
    assert stop.returncode == 0 and stop.stdout.strip(), stop.stdout + stop.stderr
    try:
        # Swarm restarts it after the restart policy's delay: check before that.
        result = script(deployed, "smoke.py", "--deadline", "3")
        assert result.returncode == 1, result.stdout + result.stderr
        failures = [line for line in result.stderr.splitlines() if line.startswith("smoke failed:")]
        # The engine task itself: its health (the stopped task still listed), the service's
        # tasks (its replacement not yet scheduled), or the replacement's health, on whichever
        # node Swarm placed it, said to be not yet running.
        assert any((f"engine tiny-llama@{stopped}" in line and "health failed" in line)
                   or (ENGINE_SERVICE in line and "tasks failed" in line)
                   or ("engine tiny-llama@" in line and "health failed" in line
                       and re.search(rf"; task {ENGINE_SERVICE}\.\d+ was (?!running)", line))
                   for line in failures), failures
    finally:
        assert smoke_until_it_passes(deployed).returncode == 0, "the engine did not come back"


def test_the_load_test_writes_csv_markdown_json_and_pngs(deployed, tmp_path):
    out = tmp_path / "load"
    result = script(deployed, "loadtest.py", "--requests", "24", "--concurrency", "4",
                    "--max-tokens", "8", "--out", str(out), timeout=600)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 24 and {r["status"] for r in rows} == {"200"}
    assert all(float(r["ttft_s"]) <= float(r["latency_s"]) and int(r["tokens"]) >= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())["summaries"]["load"]
    assert summary["requests"] == 24 and summary["errors"] == 0
    assert summary["latency_s"]["p95"] > 0 and summary["tokens_per_s"] > 0
    markdown = (out / "summary.md").read_text()
    assert "p95 ms" in markdown and "| load | 24 | 0 |" in markdown
    for png in ("latency_hist.png", "latency_over_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert api_key(deployed) not in printed + (out / "requests.csv").read_text()


def test_an_open_loop_load_reports_the_serving_metrics_and_gates_them(deployed, tmp_path):
    """The lab engine streams real tokens: every vLLM-style metric is measured, goodput against
    an SLO, and a gate no engine can meet stops the run with exit 3."""
    from scripts import loadmetrics as lm

    out = tmp_path / "open"
    result = script(deployed, "loadtest.py", "--requests", "24", "--request-rate", "4",
                    "--concurrency", "8", "--max-tokens", "8", "--input-tokens", "16",
                    "--slo", "ttft=5s,tpot=2s", "--gate", "failed<=0", "--out", str(out),
                    timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "summary.json").read_text())["summaries"]["load"]["metrics"]
    for name in lm.metric_names():
        assert lm.metric_value(metrics, name) is not None, name
    assert metrics["completed"] == 24 and metrics["goodput_share"] == 1.0
    assert metrics["itl_ms"]["p99"] > 0 and metrics["tpot_ms"]["median"] > 0
    assert metrics["input_tokens"] > 0, "the engine reported no prompt tokens"
    for png in ("ttft_hist.png", "itl_hist.png", "throughput_over_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    regressed = script(deployed, "loadtest.py", "--requests", "8", "--concurrency", "4",
                       "--max-tokens", "8", "--gate", "itl_p99<=0.001ms",
                       "--baseline", str(out / "summary.json"), "--out", str(tmp_path / "gated"),
                       timeout=600)
    assert regressed.returncode == 3, regressed.stdout + regressed.stderr
    assert "loadtest: gate itl_p99<=0.001 failed" in regressed.stderr


def test_the_scenarios_compare_replicas_and_paths_and_restore_the_count(deployed, tmp_path):
    before = manager_lines(deployed, f"sudo docker service inspect {ENGINE_SERVICE} "
                                     "--format '{{.Spec.Mode.Replicated.Replicas}}'")
    out = tmp_path / "scenarios"
    result = script(deployed, "loadtest.py", "--scenarios", "--replicas", "2", "--requests", "8",
                    "--concurrency", "2", "--max-tokens", "8", "--settle", "6",
                    "--out", str(out), timeout=900)
    printed = result.stdout + result.stderr
    after = manager_lines(deployed, f"sudo docker service inspect {ENGINE_SERVICE} "
                                    "--format '{{.Spec.Mode.Replicated.Replicas}}'")
    assert after == before, "the replica count was not restored"
    assert result.returncode == 0, printed
    scenarios = json.loads((out / "summary.json").read_text())["scenarios"]
    assert [(s["replicas"], s["path"]) for s in scenarios] == [
        (1, "gateway"), (1, "engines"), (2, "gateway"), (2, "engines")]
    assert len(scenarios[3]["endpoints"]) == 2 and len(scenarios[1]["endpoints"]) == 1
    assert all(s["usage_totals"]["samples"] > 0 for s in scenarios), scenarios
    assert "## Scenarios" in (out / "summary.md").read_text()
    assert smoke_until_it_passes(deployed).returncode == 0


def engine_args(lab):
    return manager_lines(lab, f"sudo docker service inspect {ENGINE_SERVICE} "
                              "--format '{{json .Spec.TaskTemplate.ContainerSpec.Args}}'")[0]


def set_models(lab, models):
    """On every host in one edit: the inventory refuses hosts whose `models` disagree."""
    done = lab.cli("set", "all", f"models={json.dumps(models)}")
    assert done.returncode == 0, done.stderr


def gateway_trouble(lab):
    """The gateway's log lines of requests that did not end cleanly (HAProxy's termination
    state other than ---- or a local answer, LR--): which side closed, at which stage."""
    logs = lab.gateway_log(lab.hosts[0]["name"])
    if logs.returncode != 0:
        return f"\ngateway log not read: {(logs.stdout + logs.stderr)[-300:]}"
    lines = [line for line in logs.stdout.splitlines()
             if (m := re.search(r" ([-A-Za-z]{4}) \d+/\d+/\d+/\d+/\d+ ", line))
             and m.group(1) not in ("----", "LR--")]
    return "\ngateway, requests not ended cleanly:\n" + "\n".join(lines[-20:])


def test_a_rolling_update_under_load_fails_no_request(deployed, tmp_path):
    """The engine's setting changes and the deploy rolls every replica (stop-first, one at a
    time) while four streamed requests are always in flight through the gateway: the gateway
    retries new requests away from the replica being replaced, which finishes the ones it has."""
    models = deployed.state["settings"]["models"]
    changed = [{**models[0], "gpu_memory_utilization": 0.85}, *models[1:]]
    before = engine_args(deployed)
    out = tmp_path / "rollout"
    try:
        set_models(deployed, changed)
        deploy = f"{REPO / '.venv' / 'bin' / 'pyinfra'} -y inventories/lab.py deploy.py"
        result = script(deployed, "loadtest.py", "--concurrency", "4", "--max-tokens", "8",
                        "--requests", "100000", "--max-seconds", "600", "--settle", "3",
                        "--during", deploy, "--out", str(out), timeout=900)
        printed = result.stdout + result.stderr
        meta = json.loads((out / "summary.json").read_text())["meta"]
        rolled = engine_args(deployed)
    finally:  # the lab's own models again (on every host in one edit), for the tests after this
        unset = deployed.cli("unset", "all", "models")
        restored = deployed.pyinfra("-y", "inventories/lab.py", "deploy.py")
    assert unset.returncode == 0, unset.stderr
    assert meta["during_exit_code"] == 0, (out / "during.log").read_text()[-3000:]
    assert '"0.85"' in rolled and rolled != before, "the deploy did not roll the engine"
    assert meta["during_covered"] is True
    assert result.returncode == 0 and meta["failed_during"] == 0, printed + gateway_trouble(deployed)
    assert json.loads((out / "summary.json").read_text())["summaries"]["load"]["requests"] > 40
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert smoke_until_it_passes(deployed).returncode == 0
