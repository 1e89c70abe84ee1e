"""Every engine the README offers, served in the lab (issues 17 and 25): one model per engine in
one stack behind one gateway, each with its own health check, auth and store.

- vLLM: the lab's tiny-llama (2 replicas), as everywhere else;
- TGI: the same checkpoint as tiny-tgi (2 replicas), launched with TGI 3.3.6's own flags (the
  stand-in refuses any other, --served-model-name included);
- Ollama: the GGUF repository of the same weights as tiny-ollama (1 replica), imported into
  Ollama's own store by the weights phase, mounted read-only.

Runs after test_smoke_loadtest.py (a converged, serving fleet); the lab's own models are put
back at the end, for the tests after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scripts.lab import engine as engine_image  # noqa: E402
from scripts.lab.hub import gguf_repo, model as hub_model  # noqa: E402

pytestmark = pytest.mark.lab
PYTHON = str(REPO / ".venv" / "bin" / "python")
STACK = "gpufleet"


def script(lab, name, *args, timeout=900):
    return subprocess.run([PYTHON, str(REPO / "scripts" / name), "inventories/lab.py", *args],
                          cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=timeout)


def mixed_models(lab) -> list[dict]:
    vllm = lab.state["settings"]["models"][0]
    tgi = {"name": "tiny-tgi", "repo_id": vllm["repo_id"], "revision": vllm["revision"],
           "engine": "tgi", "port": 8001, "replicas": 2}
    ollama = {"name": "tiny-ollama", "repo_id": gguf_repo.REPO_ID,
              "revision": hub_model.commit_sha(gguf_repo.build_files()), "engine": "ollama",
              "gguf_file": gguf_repo.GGUF_FILE, "port": 8002, "replicas": 1}
    return [vllm, tgi, ollama]


def set_models(lab, models):
    done = lab.cli("set", "all", f"models={json.dumps(models)}")
    assert done.returncode == 0, done.stderr


def api_key(lab) -> str:
    return Path(lab.state["settings"]["stack_api_key_file"]).read_text().strip()


def gateway_url(lab) -> str:
    manager = lab.hosts[0]
    return f"http://{manager['address']}:{lab.state['settings'].get('stack_gateway_port', 8080)}"


@pytest.fixture(scope="module")
def mixed(lab):
    set_models(lab, mixed_models(lab))
    first = lab.pyinfra("-y", "inventories/lab.py", "deploy.py")
    try:
        output = first.stdout + first.stderr
        errors = "\n".join(line for line in output.splitlines() if "rror" in line or "failed" in line)
        assert first.returncode == 0, errors[-4000:] + output[-3000:]
        yield lab
    finally:  # the lab's own models again, on every host in one edit
        unset = lab.cli("unset", "all", "models")
        restored = lab.pyinfra("-y", "inventories/lab.py", "deploy.py")
        assert unset.returncode == 0, unset.stderr
        assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-3000:]


def test_the_tgi_stand_in_refuses_a_flag_tgi_does_not_have():
    """TGI 3.3.6's launcher has no --served-model-name (clap refuses unknown arguments): the
    stand-in refuses it the same way, so a wrong flag fails in the lab."""
    result = subprocess.run(["docker", "run", "--rm", engine_image.ensure_flavour("tgi"),
                             "--model-id", "/models/m", "--served-model-name", "m"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: unexpected argument '--served-model-name' found" in result.stderr


def test_one_model_per_engine_converges_and_the_next_run_changes_nothing(mixed):
    assert mixed.changed_operations() == []
    store = mixed.ssh(mixed.hosts[0]["name"], "sudo find /opt/models/.ollama -type f | sort")
    assert "manifests/registry.ollama.ai/library/tiny-ollama/latest" in store.stdout, store.stdout
    # The GGUF file is the store's model blob by hard link: one copy on disk.
    links = mixed.ssh(mixed.hosts[0]["name"],
                      f"stat -c %h /opt/models/tiny-ollama/{gguf_repo.GGUF_FILE}")
    assert links.stdout.strip() == "2", links.stdout + links.stderr


def engine_tasks(lab, node: str) -> list[dict]:
    """The engine containers running on `node`: the GPUs Swarm assigned each one (its
    DOCKER_RESOURCE_NVIDIA-GPU, the variable config.toml's swarm-resource names) and the GPUs
    nvidia-smi shows inside it."""
    listed = lab.ssh(node, "sudo docker ps --format '{{.ID}} {{.Label \"com.docker.swarm.service.name\"}}'")
    tasks = []
    for line in listed.stdout.splitlines():
        container, _, service = line.partition(" ")
        if not service.startswith("gpufleet_") or service == "gpufleet_gateway":
            continue
        env = lab.ssh(node, f"sudo docker inspect --format '{{{{json .Config.Env}}}}' {container}")
        assigned = next((item.split("=", 1)[1] for item in json.loads(env.stdout)
                         if item.startswith("DOCKER_RESOURCE_NVIDIA-GPU=")), "")
        seen = lab.ssh(node, f"sudo docker exec {container} nvidia-smi --query-gpu=uuid "
                             "--format=csv,noheader")
        tasks.append({"service": service, "assigned": set(filter(None, assigned.split(","))),
                      "seen": set(seen.stdout.split())})
    return tasks


def test_engine_tasks_on_one_node_get_distinct_gpus_and_see_only_those(mixed):
    """Five engine tasks on three 2-GPU nodes: some node runs two. Swarm hands each task its own
    GPU from the node's generic resources, and the container sees exactly that GPU (the nvidia
    runtime honours swarm-resource: NVIDIA/nvidia-container-toolkit#1599, fixed in 1.19)."""
    shared = 0
    for host in mixed.hosts:
        tasks = engine_tasks(mixed, host["name"])
        for task in tasks:
            assert len(task["assigned"]) == 1 and task["seen"] == task["assigned"], (host, task)
        gpus = [uuid for task in tasks for uuid in task["assigned"]]
        assert len(gpus) == len(set(gpus)), (host["name"], tasks)
        shared += len(tasks) >= 2
    assert shared >= 1, "no node runs two engine tasks"


def test_smoke_passes_for_each_engine_directly_and_through_the_gateway(mixed, tmp_path):
    out = tmp_path / "smoke.json"
    result = script(mixed, "smoke.py", "--json", str(out), "--deadline", "180")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    by_engine = {}
    for endpoint in report["endpoints"]:
        checks = {c["check"]: (c["result"], c["detail"]) for c in endpoint["checks"]}
        by_engine.setdefault(endpoint["endpoint"].split("@")[0], checks)
    # Engine ports are closed to this machine (the engine firewall admits the gateway nodes).
    for engine in ("engine tiny-tgi", "engine tiny-ollama", "engine tiny-llama"):
        assert by_engine[engine]["auth"][0] == "pass", by_engine[engine]
        assert "closed to this machine" in by_engine[engine]["auth"][1], by_engine[engine]
    assert by_engine["engine tiny-tgi"]["models"][1] == "/models/tiny-tgi"  # TGI lists its model id
    assert by_engine["engine tiny-ollama"]["models"][1] == "tiny-ollama:latest"
    gateway = by_engine["gateway"]
    assert gateway["models"][1] == "tiny-llama, tiny-ollama, tiny-tgi"
    assert all(gateway[f"completion {m}"][0] == "pass"
               for m in ("tiny-llama", "tiny-tgi", "tiny-ollama"))


def pinned_task(lab, served: str, probe: str, expect) -> tuple[dict, dict]:
    """(node, headers) of a node running a task of `served`, reached through the gateway pinned
    to it with the operator's key (placement varies; engine ports admit only the gateway)."""
    for node in lab.hosts:
        headers = {"Authorization": f"Bearer {api_key(lab)}",
                   "X-Gpufleet-Pin": f"{served}@{node['name']}"}
        try:
            if expect(httpx.get(gateway_url(lab) + probe, headers=headers, timeout=5)):
                return node, headers
        except httpx.HTTPError:
            continue
    raise AssertionError(f"no node runs a task of {served}")


def test_each_engine_answers_its_own_routes_on_its_task(mixed):
    """Beside the OpenAI routes the smoke tests use: TGI's /info and /generate, Ollama's
    /api/tags and /api/chat, on each engine's task, pinned through the gateway (which sends the
    engines' internal key); straight to an engine's port only a gateway node gets an answer, and
    TGI's is 401 without the internal key."""
    node, pin = pinned_task(mixed, "tiny-tgi", "/health", lambda r: r.status_code == 200)
    tgi = gateway_url(mixed)
    assert httpx.get(tgi + "/info", headers=pin, timeout=10).json()["model_id"] == "/models/tiny-tgi"
    generated = httpx.post(tgi + "/generate", headers=pin, timeout=60,
                           json={"inputs": "hi", "parameters": {"max_new_tokens": 4}})
    assert generated.status_code == 200 and "generated_text" in generated.json()
    body = '{"inputs": "hi"}'
    request = (f"POST /generate HTTP/1.0\\r\\nContent-Type: application/json\\r\\n"
               f"Content-Length: {len(body)}\\r\\n\\r\\n{body}")
    manager = mixed.hosts[0]["name"]  # a gateway node: the firewall admits it, the key does not
    assert " 401 " in mixed.status_from(manager, node["address"], 8001, request)
    worker = next(h["name"] for h in mixed.hosts if h["name"] not in (manager, node["name"]))
    assert "HTTP/" not in mixed.status_from(worker, node["address"], 8001, request)
    with pytest.raises(httpx.ConnectError):  # nor this machine
        httpx.get(f"http://{node['address']}:8001/info", timeout=5)
    _, pin = pinned_task(mixed, "tiny-ollama", "/", lambda r: r.text == "Ollama is running")
    tags = httpx.get(tgi + "/api/tags", headers=pin, timeout=10).json()
    assert [m["name"] for m in tags["models"]] == ["tiny-ollama:latest"]
    answer = httpx.post(tgi + "/api/chat", headers=pin, timeout=60, json={
        "model": "tiny-ollama", "stream": False, "options": {"num_predict": 4},
        "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200 and answer.json()["done"] is True


def chat(lab, body: bytes, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or api_key(lab)}",
               "Content-Type": "application/json"}
    return httpx.post(gateway_url(lab) + "/v1/chat/completions", content=body, headers=headers,
                      timeout=60)


def test_the_gateway_routes_on_the_model_of_the_whole_body(mixed):
    """The OpenAI clients send "messages" before "model": a body of 64 KB before its "model" is
    routed by it (not by the first 16 KB HAProxy would otherwise see), a body over the limit is
    refused with 413, an unknown model gets 404."""
    for name in ("tiny-llama", "tiny-tgi", "tiny-ollama"):
        padded = (b'{"messages": [{"role": "user", "content": "hi"}],' + b" " * 65536
                  + b'"model": "' + name.encode() + b'", "max_tokens": 4}')
        answer = chat(mixed, padded)
        assert answer.status_code == 200, (name, answer.status_code, answer.text[:300])
        assert answer.json()["model"] == name
    # A 64 KB prompt reaches its own engine, which refuses it with its own answer (the lab
    # model has 256 positions): not the gateway's 404 or 413, nor another engine's shape.
    prompt = "x" * 65536
    long = {"tiny-llama": (400, lambda b: "maximum context length" in b["error"]["message"]),
            "tiny-tgi": (422, lambda b: b.get("error_type") == "validation")}
    for name, (status, shaped) in long.items():
        body = json.dumps({"messages": [{"role": "user", "content": prompt}], "model": name,
                           "max_tokens": 4}).encode()
        answer = chat(mixed, body)
        assert answer.status_code == status and shaped(answer.json()), (name, answer.text[:300])
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (1100 * 1024)}],
                       "model": "tiny-tgi"}).encode()
    refused = chat(mixed, huge)
    assert refused.status_code == 413 and "stack_gateway_max_body_kb" in refused.text
    unknown = chat(mixed, b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}')
    assert unknown.status_code == 404
    assert chat(mixed, b'{"model": "tiny-ollama", "messages": []}', key="wrong").status_code == 401


@pytest.mark.parametrize("model", ["tiny-tgi", "tiny-ollama"])
def test_the_load_test_runs_against_each_engine(mixed, model, tmp_path):
    out = tmp_path / model
    result = script(mixed, "loadtest.py", "--model", model, "--requests", "12",
                    "--concurrency", "3", "--max-tokens", "8", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())["summaries"]["load"]
    assert summary["requests"] == 12 and summary["errors"] == 0, summary


def test_a_rolling_update_of_the_tgi_model_under_load_fails_no_request(mixed, tmp_path):
    models = mixed_models(mixed)
    models[1] = {**models[1], "gpu_memory_utilization": 0.85}
    set_models(mixed, models)
    out = tmp_path / "rollout"
    deploy = f"{REPO / '.venv' / 'bin' / 'pyinfra'} -y inventories/lab.py deploy.py"
    result = script(mixed, "loadtest.py", "--model", "tiny-tgi", "--concurrency", "4",
                    "--max-tokens", "8", "--requests", "100000", "--max-seconds", "600",
                    "--settle", "3", "--during", deploy, "--out", str(out), timeout=900)
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["during_exit_code"] == 0, (out / "during.log").read_text()[-3000:]
    assert meta["during_covered"] is True
    assert result.returncode == 0 and meta["failed_during"] == 0, result.stdout + result.stderr
    rolled = mixed.ssh(mixed.hosts[0]["name"], f"sudo docker service inspect {STACK}_tiny-tgi "
                       "--format '{{json .Spec.TaskTemplate.ContainerSpec.Args}}'")
    assert '"0.85"' in rolled.stdout, rolled.stdout


def test_the_drift_check_sees_each_engine(mixed, tmp_path):
    def check():
        result = subprocess.run([PYTHON, "scripts/drift_check.py", "inventories/lab.py",
                                 "--json", str(tmp_path / "drift.json")], cwd=REPO,
                                env=mixed.env, capture_output=True, text=True, timeout=600)
        assert "Traceback" not in result.stderr, result.stderr
        return result, json.loads((tmp_path / "drift.json").read_text())

    quiet, _ = check()
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    manager = mixed.hosts[0]["name"]
    for service in ("tiny-tgi", "tiny-ollama"):
        scaled = mixed.ssh(manager, f"sudo docker service scale -d {STACK}_{service}=0")
        assert scaled.returncode == 0, scaled.stderr
    try:
        found, _ = check()
        assert found.returncode == 2, found.stdout + found.stderr  # 2: drift found
        assert "stack: gpufleet_tiny-tgi is scaled to 0 (wanted 2)" in found.stdout
        assert "stack: gpufleet_tiny-ollama is scaled to 0 (wanted 1)" in found.stdout
    finally:
        assert mixed.pyinfra("-y", "inventories/lab.py", "deploy.py").returncode == 0


def test_a_host_with_nvidias_own_repository_files_converges(lab):
    """Issue 25: NVIDIA's install guides leave cuda-keyring's cuda-<distro>-<arch>.list and the
    toolkit's nvidia-container-toolkit.list for the same URIs with their own Signed-By; apt then
    refuses every update. The deploy moves them aside and converges; the run after changes
    nothing. (Runs after the module's stack: its own deploys are the ones that must converge.)"""
    node = lab.hosts[-1]["name"]
    settings = lab.state["settings"]
    cuda = f"{settings['nvidia_cuda_repo_url']}/debian12/x86_64/"
    toolkit = f"{settings['nvidia_container_toolkit_repo_url']}/$(ARCH)"
    seeded = lab.ssh(node, (
        "echo 'deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] " + cuda + " /' | "
        "sudo tee /etc/apt/sources.list.d/cuda-debian12-x86_64.list >/dev/null && "
        "echo 'deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] "
        + toolkit + " /' | sudo tee /etc/apt/sources.list.d/nvidia-container-toolkit.list "
        ">/dev/null"))
    assert seeded.returncode == 0, seeded.stderr
    refused = lab.ssh(node, "sudo apt-get update 2>&1")
    assert "Conflicting values set for option Signed-By" in refused.stdout, refused.stdout[-2000:]

    deployed = lab.pyinfra("-y", "inventories/lab.py", "deploy.py")
    assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-2000:]
    moved = lab.ssh(node, "ls /var/backups/gpufleet/apt-sources/").stdout.split()
    assert sorted(moved) == ["cuda-debian12-x86_64.list", "nvidia-container-toolkit.list"], moved
    listed = lab.ssh(node, "ls /etc/apt/sources.list.d/").stdout.split()
    assert "cuda-debian12-x86_64.list" not in listed
    assert "nvidia-container-toolkit.list" not in listed
    updated = lab.ssh(node, "sudo apt-get update 2>&1")
    assert updated.returncode == 0 and "Conflicting" not in updated.stdout, updated.stdout[-2000:]
    assert lab.changed_operations() == []
