"""Smoke tests' pure parts: targets from the stack fact (host and ingress mode), each check
against a fake OpenAI-style server (httpx.MockTransport, and one real socket on 127.0.0.1),
the table and the JSON report."""

import dataclasses
import json
import socket
from pathlib import Path

import httpx
import pytest
import yaml

from operations import config, inventory_data
from operations import smoke as sm

FACTS = Path(__file__).resolve().parents[1] / "facts" / "smoke.SmokeStack"
KEY = "sk-test-0123456789"
MODEL = {"name": "tiny-llama", "repo_id": "lab/tiny-llama", "revision": "a" * 40}


def settings(**overrides):
    data = {**inventory_data.load_group_data()["all"], "models": [MODEL], "stack_api_key_file": "/k", "stack_engine_key_file": "/ek", "monitoring_grafana_admin_password_file": "/gk",
            "stack_publish_mode": "host", **overrides}
    return config.validate_host_data("test", data)


def fact(name):
    return yaml.safe_load((FACTS / name).read_text())["fact"]


# --- Targets --------------------------------------------------------------------------------


def test_host_mode_targets_each_engine_task_and_each_gateway_task():
    targets, problems = sm.stack_targets(settings(), fact("lab_host_mode.yaml"))
    assert problems == []
    by_name = {t.name: t for t in targets}
    assert sorted(by_name) == ["engine tiny-llama@node-2", "engine tiny-llama@node-3",
                               "gateway@node-1"]
    # An engine task: through the gateway, pinned to it; its own port is only probed (auth).
    assert by_name["engine tiny-llama@node-2"].url == "http://172.29.114.11:8080"
    assert by_name["engine tiny-llama@node-2"].headers == (("X-Gpufleet-Pin", "tiny-llama@node-2"),)
    assert by_name["engine tiny-llama@node-2"].direct_url == "http://172.29.114.12:8000"
    assert by_name["engine tiny-llama@node-2"].models == ("tiny-llama",)
    # Each engine target knows its task and the state the manager reported for it.
    assert (by_name["engine tiny-llama@node-3"].task,
            by_name["engine tiny-llama@node-3"].task_state) == ("gpufleet_tiny-llama.2", "starting")
    assert by_name["gateway@node-1"].url == "http://172.29.114.11:8080"
    assert by_name["gateway@node-1"].kind == "gateway"


def test_ingress_mode_targets_the_gateway_on_every_ready_manager():
    stack = fact("lab_host_mode.yaml")
    stack["nodes"][1]["role"] = "manager"  # node-2 a second manager, no gateway task of its own
    targets, _ = sm.stack_targets(settings(stack_publish_mode="ingress"), stack)
    gateways = sorted(t.url for t in targets if t.kind == "gateway")
    assert gateways == ["http://172.29.114.11:8080", "http://172.29.114.12:8080"]


def test_served_name_port_and_service_key_come_from_the_configuration():
    model = {**MODEL, "name": "Qwen2.5_7B", "served_model_name": "qwen", "port": 9001}
    stack = fact("lab_host_mode.yaml")
    for task in stack["tasks"]:
        task["service"] = task["service"].replace("tiny-llama", "qwen2-5-7b")
    stack["services"][1]["name"] = "gpufleet_qwen2-5-7b"
    targets, problems = sm.stack_targets(settings(models=[model]), stack)
    assert problems == []
    engine = next(t for t in targets if t.kind == "engine")
    assert engine.direct_url.endswith(":9001") and engine.models == ("qwen",)
    assert dict(engine.headers)["X-Gpufleet-Pin"] == f"qwen@{engine.node}"
    assert next(t for t in targets if t.kind == "gateway").models == ("qwen",)


def test_a_task_swarm_cannot_place_is_a_failing_tasks_check_with_its_reason():
    targets, problems = sm.stack_targets(settings(), fact("pending_task.yaml"))
    assert [p.check for p in problems] == ["tasks"]
    assert "insufficient resources" in problems[0].failure_line()
    assert "gpufleet_tiny-llama" in problems[0].failure_line()
    assert len([t for t in targets if t.kind == "engine"]) == 1


def test_a_missing_stack_names_every_missing_service():
    targets, problems = sm.stack_targets(settings(), fact("no_stack.yaml"))
    assert targets == []
    assert sorted(p.endpoint for p in problems) == ["gpufleet_gateway", "gpufleet_tiny-llama"]


def test_nothing_served_nothing_expected():
    targets, problems = sm.stack_targets(settings(models=[{**MODEL, "serve": False}]),
                                         fact("no_stack.yaml"))
    assert (targets, problems) == ([], [])


def test_each_host_checks_its_own_endpoints_and_the_gateway():
    targets, _ = sm.stack_targets(settings(), fact("lab_host_mode.yaml"))
    assert [t.name for t in sm.targets_for_host(targets, "node-1")] == ["gateway@node-1"]
    assert [t.name for t in sm.targets_for_host(targets, "node-2")] == [
        "engine tiny-llama@node-2", "gateway@node-1"]


# --- Checks against a fake server -----------------------------------------------------------


class FakeEngine:
    """An OpenAI-style server: health, model list, chat completions, Bearer key."""

    def __init__(self, models=("tiny-llama",), key=KEY, unhealthy_for=0, enforce_key=True,
                 tokens=3):
        self.models, self.key, self.unhealthy_for = list(models), key, unhealthy_for
        self.enforce_key, self.tokens, self.seen = enforce_key, tokens, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        path = request.url.path
        if path in ("/health", "/api/version"):
            if self.unhealthy_for > 0:
                self.unhealthy_for -= 1
                return httpx.Response(503)
            return httpx.Response(200)
        if self.enforce_key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"error": "unauthorised"})
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": m, "object": "model"} for m in self.models]})
        if path == "/v1/chat/completions":
            body = json.loads(request.content)
            if body["model"] not in self.models:
                return httpx.Response(404)
            return httpx.Response(200, json={
                "choices": [{"message": {"role": "assistant", "content": "hi " * self.tokens}}],
                "usage": {"completion_tokens": self.tokens}})
        return httpx.Response(404)


def target(engine="vllm", models=("tiny-llama",)):
    return sm.Target(name="engine tiny-llama@node-2", url="http://10.0.0.2:8000", kind="engine",
                     node="node-2", host="node-2", service="gpufleet_tiny-llama",
                     models=tuple(models), engine=engine)


def check(server, tgt=None, key=KEY, deadline=5.0, sleeps=None):
    client = httpx.Client(transport=httpx.MockTransport(server))
    sleeps = [] if sleeps is None else sleeps
    return sm.check_target(client, tgt or target(), key, deadline, sleep=sleeps.append)


def outcome(results):
    return {r.check: r.result for r in results}


def test_a_healthy_engine_passes_every_check():
    results = check(FakeEngine())
    assert outcome(results) == {"health": "pass", "models": "pass",
                                "completion tiny-llama": "pass", "auth": "pass"}
    assert all(r.latency_ms is not None and r.latency_ms >= 0 for r in results)
    assert sm.SmokeReport(results).ok


def test_an_endpoint_that_does_not_refuse_a_missing_key_fails_auth():
    results = check(FakeEngine(enforce_key=False))
    assert outcome(results)["auth"] == "FAIL"
    line = sm.SmokeReport(results).failures()[0]
    assert line.startswith("engine tiny-llama@node-2 (http://10.0.0.2:8000): auth failed")
    assert "expected 401" in line


def test_a_wrong_key_fails_models_and_completion_with_401():
    results = check(FakeEngine(), key="sk-wrong")
    assert outcome(results)["models"] == "FAIL"
    assert outcome(results)["completion tiny-llama"] == "FAIL"
    assert all("HTTP 401" in line for line in sm.SmokeReport(results).failures())


def test_a_model_list_that_is_not_exactly_the_promised_one_fails():
    results = check(FakeEngine(models=("tiny-llama", "other")))
    models = next(r for r in results if r.check == "models")
    assert models.result == "FAIL" and "unexpected other" in models.detail
    results = check(FakeEngine(models=("other",)))
    models = next(r for r in results if r.check == "models")
    assert "missing tiny-llama" in models.detail


def test_slow_health_is_retried_with_growing_pauses_then_passes():
    sleeps = []
    results = check(FakeEngine(unhealthy_for=3), deadline=30.0, sleeps=sleeps)
    assert outcome(results)["health"] == "pass"
    assert "after 4 attempt(s)" in results[0].detail
    assert sleeps == [0.5, 1.0, 2.0]


def test_health_gives_up_at_the_deadline_and_skips_the_rest():
    results = check(FakeEngine(unhealthy_for=10**6), deadline=0.2)
    assert outcome(results)["health"] == "FAIL"
    assert "within 0.2s" in results[0].detail and "HTTP 503" in results[0].detail
    assert {r.result for r in results[1:]} == {"skipped"}
    assert len(sm.SmokeReport(results).failures()) == 1


def test_a_failed_health_check_says_when_the_task_was_not_running_yet():
    # Swarm's replacement for a stopped task may start on another node: its failure says so.
    starting = dataclasses.replace(target(), task="gpufleet_tiny-llama.1", task_state="starting")
    results = check(FakeEngine(unhealthy_for=10**6), deadline=0.2, tgt=starting)
    assert results[0].detail.endswith("; task gpufleet_tiny-llama.1 was starting")
    running = dataclasses.replace(starting, task_state="running")
    results = check(FakeEngine(unhealthy_for=10**6), deadline=0.2, tgt=running)
    assert "task" not in results[0].detail


def test_no_token_fails_the_completion():
    results = check(FakeEngine(tokens=0))
    assert outcome(results)["completion tiny-llama"] == "FAIL"


def test_an_engine_port_that_answers_without_a_key_fails_auth_even_ollama():
    # Ollama has no key of its own: only the engine firewall keeps its port from answering.
    results = check(FakeEngine(enforce_key=False), tgt=target(engine="ollama"))
    assert outcome(results)["auth"] == "FAIL"
    assert results[0].detail.startswith("200")  # /api/version answered


def test_an_engine_port_closed_to_this_machine_passes_auth():
    pinned = dataclasses.replace(target(), url="http://10.0.0.1:8080",
                                 headers=(("X-Gpufleet-Pin", "tiny-llama@node-2"),),
                                 direct_url="http://10.0.0.2:8000")
    engine = FakeEngine()

    def server(request):
        if request.url.port == 8000:  # the engine's own port: the firewall resets it
            raise httpx.ConnectError("connection refused", request=request)
        assert request.headers["x-gpufleet-pin"] == "tiny-llama@node-2"
        return engine(request)

    results = check(server, tgt=pinned)
    assert outcome(results) == {"health": "pass", "models": "pass",
                                "completion tiny-llama": "pass", "auth": "pass"}
    assert results[-1].detail.startswith("http://10.0.0.2:8000: closed to this machine")
    assert results[-1].url == "http://10.0.0.1:8080"  # reported with the task's other checks


def test_an_engine_that_is_down_fails_health_naming_the_endpoint():
    # A real socket: a port on 127.0.0.1 that nothing listens on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = sm.Target(name="engine tiny-llama@node-3", url=f"http://127.0.0.1:{port}",
                     kind="engine", node="node-3", host="node-3", service="s",
                     models=("tiny-llama",))
    results = sm.run_checks([down], KEY, deadline_s=0.3)
    failures = sm.SmokeReport(results).failures()
    assert len(failures) == 1
    assert failures[0].startswith(f"engine tiny-llama@node-3 (http://127.0.0.1:{port}): health failed")
    assert "ConnectError" in failures[0]


def test_the_key_is_sent_only_as_a_header_and_never_reported():
    server = FakeEngine()
    results = check(server, key=KEY)
    keyed = [r for r in server.seen if r.headers.get("authorization")]
    assert keyed and all(KEY not in str(r.url) for r in server.seen)
    rendered = sm.render_table(results) + json.dumps(sm.report_json(results))
    assert KEY not in rendered


# --- Reports --------------------------------------------------------------------------------


def test_table_and_json_carry_every_check_with_its_latency():
    results = check(FakeEngine(enforce_key=False))
    table = sm.render_table(results)
    assert table.splitlines()[0] == "engine tiny-llama@node-2  http://10.0.0.2:8000"
    assert "completion tiny-llama" in table and "FAIL" in table and " ms " in table
    report = sm.report_json(results, [target()])
    assert report["ok"] is False
    assert report["failures"] == sm.SmokeReport(results).failures()
    (endpoint,) = report["endpoints"]
    assert endpoint["kind"] == "engine" and endpoint["node"] == "node-2"
    assert [c["check"] for c in endpoint["checks"]] == ["health", "models",
                                                        "completion tiny-llama", "auth"]
    assert json.loads(json.dumps(report)) == report


def test_read_api_key_strips_the_file(tmp_path):
    path = tmp_path / "key"
    path.write_text(f"  {KEY}\n")
    assert sm.read_api_key(str(path)) == KEY
    assert sm.read_api_key(None) is None
    with pytest.raises(OSError):
        sm.read_api_key(str(tmp_path / "missing"))


def test_tasks_swarm_keeps_restarting_are_failures_with_swarms_reason():
    # Recorded on the lab: no node could pull the images, Swarm retries (desired Ready).
    targets, problems = sm.stack_targets(settings(), fact("images_missing.yaml"))
    lines = [p.failure_line() for p in problems]
    assert any(line.startswith("gpufleet_tiny-llama: tasks failed: task gpufleet_tiny-llama.1 on "
                               "node-3 rejected: assigned node no longer meets constraints")
               for line in lines), lines
    assert not any(t.kind == "engine" for t in targets)
