"""scripts/smoke.py end to end, with the manager's fact replaced by a stack whose endpoints are
fake servers on 127.0.0.1: table, JSON, exit codes, one line per failing check, the key never
in the output."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from operations import inventory_data
from operations import smoke as sm
from scripts import fleet_access
from tests.unit.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-script-test-secret"
REVISION = "b" * 40


def inventory(tmp_path, key=KEY, **data):
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    engine_key = tmp_path / "engine-key"
    engine_key.write_text("ek-script-test-engine-key\n")
    engine_key.chmod(0o600)
    host_data = {"models": [{"name": "tiny-llama", "repo_id": "lab/tiny", "revision": REVISION}],
                 "stack_api_key_file": str(key_file), "stack_engine_key_file": str(engine_key),
                 "stack_publish_mode": "host", "monitoring_grafana": False, **data}
    path = tmp_path / "inv.py"
    path.write_text(f"gpu_nodes = [('node-1', {host_data!r})]\nswarm_managers = ['node-1']\n")
    return path


def stack_for(engine_port, gateway_port):
    node = {"id": "n1", "hostname": "node-1", "host": "node-1", "role": "manager",
            "availability": "active", "state": "ready", "addr": "127.0.0.1"}
    return {"error": None, "nodes": [node], "services": [
        {"id": "s1", "name": "gpufleet_gateway", "labels": {}, "mode": "global",
         "replicas": None, "ports": []},
        {"id": "s2", "name": "gpufleet_tiny-llama", "labels": {}, "mode": "replicated",
         "replicas": 1, "ports": []}],
        "tasks": [
            {"id": "t1", "name": "gpufleet_gateway.n1", "service": "gpufleet_gateway",
             "node": "node-1", "desired": "running", "state": "running", "current": "", "error": ""},
            {"id": "t2", "name": "gpufleet_tiny-llama.1", "service": "gpufleet_tiny-llama",
             "node": "node-1", "desired": "running", "state": "running", "current": "",
             "error": ""}]}


@pytest.fixture
def servers(monkeypatch):
    from scripts import smoke as script

    with FakeOpenAI(key=KEY) as engine, FakeOpenAI(key=KEY) as gateway:
        engine_port = int(engine.url.rsplit(":", 1)[1])
        gateway_port = int(gateway.url.rsplit(":", 1)[1])
        stack = stack_for(engine_port, gateway_port)
        monkeypatch.setattr(fleet_access.Fleet, "read_from_manager",
                            lambda self, fact, **kw: ("node-1", stack))
        yield script, engine_port, gateway_port


def run(script, tmp_path, capsys, *extra, key=KEY, engine_port=0, gateway_port=0):
    inv = inventory(tmp_path, key=key, stack_gateway_port=gateway_port,
                    models=[{"name": "tiny-llama", "repo_id": "lab/tiny", "revision": REVISION,
                             "port": engine_port}])
    out = tmp_path / "smoke.json"
    code = script.run([str(inv), "--json", str(out), "--deadline", "1", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, json.loads(out.read_text())


def test_every_check_passes_against_healthy_endpoints(servers, tmp_path, capsys):
    script, engine_port, gateway_port = servers
    code, out, err, report = run(script, tmp_path, capsys, engine_port=engine_port,
                                 gateway_port=gateway_port)
    assert code == 0, out + err
    assert report["ok"] is True and report["failures"] == []
    assert {e["endpoint"] for e in report["endpoints"]} == {"engine tiny-llama@node-1",
                                                             "gateway@node-1"}
    assert "completion tiny-llama" in out and "pass" in out
    assert KEY not in out + err + json.dumps(report)


def test_a_wrong_key_exits_1_naming_endpoint_and_check(servers, tmp_path, capsys):
    script, engine_port, gateway_port = servers
    code, out, err, report = run(script, tmp_path, capsys, key="sk-wrong", engine_port=engine_port,
                                 gateway_port=gateway_port)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4  # models + completion, at the engine and at the gateway
    assert any(line.startswith(f"smoke failed: gateway@node-1 (http://127.0.0.1:{gateway_port}): "
                               "models failed: HTTP 401") for line in lines)
    assert report["failures"] == [line.removeprefix("smoke failed: ") for line in lines]
    assert "sk-wrong" not in out + err


def test_an_engine_down_exits_1_naming_it(servers, tmp_path, capsys, monkeypatch):
    script, engine_port, _ = servers
    # The engine task is reached through the gateway, which answers 503 for it while it is down.
    with FakeOpenAI(key=KEY, dead_pins={"tiny-llama@node-1"}) as gateway:
        gateway_port = int(gateway.url.rsplit(":", 1)[1])
        stack = stack_for(engine_port, gateway_port)
        monkeypatch.setattr(fleet_access.Fleet, "read_from_manager",
                            lambda self, fact, **kw: ("node-1", stack))
        code, out, err, report = run(script, tmp_path, capsys, engine_port=engine_port,
                                     gateway_port=gateway_port)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(
        f"smoke failed: engine tiny-llama@node-1 (http://127.0.0.1:{gateway_port}): health failed")
    assert "HTTP 503" in line


def test_a_bad_configuration_exits_2_with_one_line_and_no_traceback(tmp_path):
    inv = inventory(tmp_path, smoke_deadline_s="soon")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke.py"), str(inv)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: host node-1: key 'smoke_deadline_s' = 'soon': expected a whole "
        "number (unquoted)"]


def test_a_bad_data_override_exits_2(tmp_path):
    inv = inventory(tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke.py"), str(inv),
                             "--data", "stack_publish_mode=mesh"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "stack_publish_mode" in result.stderr and "Traceback" not in result.stderr


def test_data_overrides_parse_like_pyinfra():
    from pyinfra_cli.util import parse_cli_arg  # the reference (imported only in this test)

    items = ["a=1", "b=true", "c=/x/y", "d=[1, 2]", 'e={"vllm": "x"}', "f=1.5", "g=False"]
    expected = {item.split("=", 1)[0]: parse_cli_arg(item.split("=", 1)[1]) for item in items}
    assert inventory_data.parse_data(items) == (expected, [])
    assert expected["b"] is True and expected["e"] == {"vllm": "x"}
