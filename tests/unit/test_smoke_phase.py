"""The smoke phase in a real pyinfra run (`pyinfra @local`), with the manager's fact replaced by
a stack whose endpoints are fake servers on 127.0.0.1: a pass reports no change, a failure
fails the host naming endpoint and check, --dry only says it would run."""

import json
import os
import re
import subprocess
from pathlib import Path

from tests.unit.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-phase-test-secret"

DEPLOY = """
import json, os, sys
sys.path.insert(0, {repo!r})
from operations import config, inventory_data, smoke

stack = json.loads(os.environ["SMOKE_STACK"])
smoke.read_stack = lambda managers, name: {{**stack, "reporter": "@local"}}
data = {{**inventory_data.load_group_data()["all"], **json.loads(os.environ["SMOKE_DATA"])}}
smoke.smoke(config.validate_host_data("@local", data))
"""


def stack(engine_port):
    node = {"id": "n1", "hostname": "lab-1", "host": "@local", "role": "manager",
            "availability": "active", "state": "ready", "addr": "127.0.0.1"}
    task = {"desired": "running", "state": "running", "current": "", "error": ""}
    return {"error": None, "nodes": [node], "services": [
        {"id": "s1", "name": "gpufleet_gateway", "labels": {}, "mode": "global", "replicas": None,
         "ports": []},
        {"id": "s2", "name": "gpufleet_tiny-llama", "labels": {}, "mode": "replicated",
         "replicas": 1, "ports": []}],
        "tasks": [{**task, "id": "t1", "name": "gpufleet_gateway.n1", "service": "gpufleet_gateway",
                   "node": "lab-1"},
                  {**task, "id": "t2", "name": "gpufleet_tiny-llama.1",
                   "service": "gpufleet_tiny-llama", "node": "lab-1"}]}


def pyinfra(tmp_path, engine_port, gateway_port, key, *extra):
    (tmp_path / "deploy.py").write_text(DEPLOY.format(repo=str(REPO)))
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    engine_key = tmp_path / "engine-key"
    engine_key.write_text("ek-phase-test-engine-key\n")
    engine_key.chmod(0o600)
    data = {"models": [{"name": "tiny-llama", "repo_id": "lab/tiny", "revision": "d" * 40,
                        "port": engine_port}],
            "stack_api_key_file": str(key_file), "stack_engine_key_file": str(engine_key),
            "stack_publish_mode": "host", "monitoring_grafana": False,
            "stack_gateway_port": gateway_port, "smoke_deadline_s": 1}
    env = {**os.environ, "SMOKE_STACK": json.dumps(stack(engine_port)),
           "SMOKE_DATA": json.dumps(data)}
    confirm = [] if "--dry" in extra else ["-y"]
    return subprocess.run([str(REPO / ".venv" / "bin" / "pyinfra"), *confirm, *extra, "@local",
                           "deploy.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def ports(*servers):
    return [int(s.url.rsplit(":", 1)[1]) for s in servers]


def test_a_passing_smoke_changes_nothing_and_prints_the_table(tmp_path):
    with FakeOpenAI(key=KEY) as engine, FakeOpenAI(key=KEY) as gateway:
        result = pyinfra(tmp_path, *ports(engine, gateway), KEY)
        # One completion for the gateway and one for the engine task, pinned through it.
        assert engine.requests == 0 and gateway.requests == 2
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "smoke passed: 2 endpoint(s), 8 check(s) passed, 0 failed" in output
    assert "completion tiny-llama" in output and "engine tiny-llama@lab-1" in output
    assert "[@local] No changes" in output
    # Hosts 1, Success -, Error -, No Change 1: a passing smoke is not a change.
    assert re.search(r"Grand total\s+1\s+-\s+-\s+1\s", output), output
    assert KEY not in output


def test_a_failing_check_fails_the_host_naming_endpoint_and_check(tmp_path):
    with FakeOpenAI(key=KEY) as engine, FakeOpenAI(key=KEY) as gateway:
        result = pyinfra(tmp_path, *ports(engine, gateway), "sk-wrong")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "gateway@lab-1 (http://127.0.0.1:" in output
    assert "models failed: HTTP 401 (expected 200)" in output
    assert "smoke failed: 4 check(s), named above" in output
    assert "sk-wrong" not in output


def test_dry_run_only_says_it_would_check(tmp_path):
    with FakeOpenAI(key=KEY) as engine, FakeOpenAI(key=KEY) as gateway:
        result = pyinfra(tmp_path, *ports(engine, gateway), KEY, "--dry", "-v")
        assert engine.requests == 0 and gateway.requests == 0
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "noop: checks the endpoints of 1 served model(s) when the run executes" in output
