"""The inference stack on the lab: it converges, every engine task answers through the gateway,
a rotated API key rolls the services and the old key stops working, a broken image rolls back
while the endpoint keeps answering, and a run after each changes nothing more.

Runs after test_run*.py (alphabetical order), on the fleet they converged."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.lab.test_run import deploy, hosts_changed, hosts_failed

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"


def api_key(lab) -> str:
    return (REPO / ".lab" / lab.name / "api-key").read_text().strip()


def gateway(lab) -> str:
    manager = lab.hosts[0]["address"]
    return f"http://{manager}:8080"


def complete(base: str, key: str, prompt: str = "Hello", max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def manager_sh(lab, command: str) -> str:
    result = lab.ssh(lab.hosts[0]["name"], f"sudo sh -c {json.dumps(command)}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def converged_run(lab, *extra):
    result, results = deploy(lab, *extra)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert hosts_failed(results) == set()
    return results


def test_the_stack_converges_and_every_engine_task_answers_through_the_gateway(lab):
    converged_run(lab)
    base, key = gateway(lab), api_key(lab)
    status = json.loads(lab.cli("status", "--json").stdout)
    assert status["endpoint"] == base
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert [m["id"] for m in models.json()["data"]] == [MODEL]
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401

    answered_by = set()
    for attempt in range(24):
        response = complete(base, key, prompt=f"Request {attempt}:")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["text"]
        answered_by.add(response.headers.get("x-engine-task"))
    tasks = manager_sh(lab, "docker service ps gpufleet_tiny-llama --filter desired-state=running -q | wc -l")
    assert len(answered_by) == int(tasks.strip()) == 2, answered_by

    # What the containers got: /dev/shm sized by the rule, the weights read-only, the key as a
    # 0400 file and not in the environment.
    node = lab.hosts[0]["name"]
    inspect = json.loads(manager_sh(lab, "docker service inspect gpufleet_tiny-llama"))[0]
    mounts = {m["Target"]: m for m in inspect["Spec"]["TaskTemplate"]["ContainerSpec"]["Mounts"]}
    assert mounts["/dev/shm"]["TmpfsOptions"]["SizeBytes"] == 1024**3
    assert mounts["/models/tiny-llama"]["ReadOnly"] is True
    env = inspect["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env") or []
    assert not any(key in item for item in env)
    del node


def test_a_second_run_changes_nothing_and_the_stack_file_is_on_the_manager(lab):
    results = converged_run(lab)
    assert hosts_changed(results) == set(), [op for op in results["operations"] if op["success"]]
    text = manager_sh(lab, "cat /etc/gpufleet/stack/gpufleet.yml")
    assert "gpufleet.spec" in text and api_key(lab) not in text


def test_rotating_the_api_key_rolls_the_services_and_the_old_key_stops_working(lab):
    key_file = REPO / ".lab" / lab.name / "api-key"
    old = api_key(lab)
    old_secrets = manager_sh(lab, "docker secret ls --format '{{.Name}}'").split()
    new = "sk-lab-rotated-" + str(int(time.time()))
    key_file.write_text(new + "\n")
    try:
        results = converged_run(lab)
        assert hosts_changed(results) == {lab.hosts[0]["name"]}
        base = gateway(lab)
        assert complete(base, new).status_code == 200
        assert complete(base, old).status_code == 401
        # The engines never held a client's key (they have the internal one): they did not roll.
        engine_key = [s for s in old_secrets if s.startswith("gpufleet_engine_key_")]
        secrets = manager_sh(lab, "docker secret ls --format '{{.Name}}'").split()
        assert engine_key and set(engine_key) <= set(secrets)
        rotated = [s for s in old_secrets if s.startswith("gpufleet_gateway_clients_")]
        assert rotated and not set(rotated) & set(secrets), "the old key's secret was not removed"
        assert converged_run(lab) and hosts_changed(converged_run(lab)) == set()
    finally:
        key_file.write_text(old + "\n")
    converged_run(lab)  # back to the lab's key for the tests after this one
    assert complete(gateway(lab), old).status_code == 200


def test_a_broken_image_rolls_back_and_the_endpoint_keeps_answering(lab):
    base, key = gateway(lab), api_key(lab)
    image = json.loads((REPO / ".lab" / lab.name / "hosts.json").read_text())["settings"]["stack_engine_images"]["vllm"]
    broken = image.rsplit(":", 1)[0] + ":does-not-exist"
    outcomes: list[int | str] = []
    stop = threading.Event()

    def steady_load():
        # Bounded: at most 600 requests, and it stops when the deploy returns.
        for _ in range(600):
            if stop.is_set():
                return
            try:
                outcomes.append(complete(base, key, max_tokens=2).status_code)
            except httpx.HTTPError as error:
                outcomes.append(type(error).__name__)
            time.sleep(0.2)

    loader = threading.Thread(target=steady_load, daemon=True)
    loader.start()
    try:
        result, results = deploy(lab, "--data", "stack_engine_images=" + json.dumps({"vllm": broken}))
    finally:
        stop.set()
        loader.join(timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert hosts_failed(results) == {lab.hosts[0]["name"]}
    assert "gpufleet_tiny-llama: update rollback" in output, output[-3000:]
    images = manager_sh(lab, "docker service inspect gpufleet_tiny-llama --format '{{.Spec.TaskTemplate.ContainerSpec.Image}}'")
    assert images.strip().split("@")[0] == image
    assert outcomes and all(o == 200 for o in outcomes), outcomes
    # The next ordinary run puts the rendered files back (the failed run wrote the broken one)
    # and leaves the rolled-back service alone: it runs the rendered spec. Then nothing to do.
    repaired = converged_run(lab)
    assert hosts_changed(repaired) <= {lab.hosts[0]["name"]}
    assert hosts_changed(converged_run(lab)) == set()
