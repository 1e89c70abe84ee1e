"""The inference stack's stand-in images (scripts/lab/engine, scripts/lab/gateway), for real.

The engine and gateway tests build the images (cached by recipe hash) and run them with
`docker run` on this machine, on loopback only; they do not need the lab's hosts. The engine
serves the lab's tiny model (scripts/lab/hub/model.py's files, mounted read-only) and its
answers are checked against an independent pure-Python forward pass (llama_reference.py):
the same greedy tokens, and the same log-probabilities to 1e-4. The gateway is checked alone
(`haproxy -c` of the keywords the stack may use, a running gateway) and with the configuration
operations/stack.py renders, in front of two engines on a network of the test's own. The last test uses the session lab: `up`
pushed both images to the lab registry and wrote the settings that select them.

Every container and network here carries the label gpufleet.lab=<LAB_NAME> and is removed in
a finally; requests go to loopback only.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_reference import Reference  # noqa: E402

from scripts.lab import engine as engine_image  # noqa: E402
from scripts.lab import gateway  # noqa: E402
from scripts.lab.engine.labengine import protocol  # noqa: E402
from scripts.lab.hub import model as hub_model  # noqa: E402
from scripts.lab.registry import service as registry_service  # noqa: E402

LAB = os.environ.get("LAB_NAME") or "gpulab-test"
KEY = "sk-lab-engine-test-" + os.urandom(6).hex()
# The engines' internal key: only the gateway holds it (operations/gateway_access.py).
ENGINE_KEY = "ek-lab-engine-test-" + os.urandom(6).hex()
ALICE = "sk-lab-alice-test-" + os.urandom(6).hex()


def gateway_secrets() -> dict[str, str]:
    """The gateway's secrets as the stack makes them: the operator and alice, the internal key."""
    from operations import gateway_access

    return {"gateway_clients": gateway_access.clients_map({"operator": KEY, "alice": ALICE}),
            "gateway_engine_auth": gateway_access.engine_auth_map(ENGINE_KEY)}
MAX_MODEL_LEN = 200
STACK_HEALTHCHECK = ("import urllib.request; "
                     "urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, body=None, key: str | None = KEY, timeout: float = 60,
         headers: dict | None = None):
    """(status, headers, body bytes)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {**({"Content-Type": "application/json"} if data else {}), **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def docker(*args: str, env: dict | None = None, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}... failed: {result.stderr.strip()}")
    return result.stdout.strip()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return hub_model.build_files()


@pytest.fixture(scope="module")
def reference(files) -> Reference:
    return Reference(files)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, files):
    """The engine image running the stack's command line on the tiny model: its base URL."""
    started = time.monotonic()
    image = engine_image.ensure_image()
    built_s = time.monotonic() - started
    root = tmp_path_factory.mktemp("hub")
    revision = hub_model.write_repo(root, files)
    model_dir = root / hub_model.REPO_ID / revision
    port = free_port()
    name = f"{LAB}-engine-test-{os.getpid()}"
    # The key reaches the container through the environment, never the command line.
    env = {**os.environ, "VLLM_API_KEY": KEY}
    try:
        docker("run", "-d", "--name", name, "--hostname", "engine-task-1",
               "--label", f"gpufleet.lab={LAB}", "--label", "gpufleet.role=engine-test",
               "-e", "VLLM_API_KEY", "-e", "HF_HUB_OFFLINE=1", "--read-only", "--tmpfs", "/tmp",
               "-v", f"{model_dir}:/models/tiny-llama:ro", "-p", f"127.0.0.1:{port}:8000",
               image, "/models/tiny-llama", "--served-model-name", "tiny-llama",
               "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "1",
               "--gpu-memory-utilization", "0.9", "--max-model-len", str(MAX_MODEL_LEN),
               "--enforce-eager", "--disable-log-requests", env=env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if http("GET", base + "/health", key=None, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or docker("inspect", "-f", "{{.State.Running}}",
                                                     name, check=False) != "true":
                pytest.fail(f"engine did not become healthy:\n{docker('logs', name, check=False)}")
            time.sleep(0.3)
        print(f"engine image {image} ready (build or reuse {built_s:.1f}s, healthy "
              f"{time.monotonic() - started:.1f}s after start)")
        yield {"base": base, "name": name, "image": image, "env": env}
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def completion(engine, body: dict) -> dict:
    status, _, raw = http("POST", engine["base"] + "/v1/completions",
                          {"model": "tiny-llama", **body})
    assert status == 200, raw
    return json.loads(raw)


def test_engine_starts_as_the_stack_runs_it_and_says_it_is_a_stand_in(engine):
    logs = subprocess.run(["docker", "logs", engine["name"]], capture_output=True,
                          text=True).stdout
    assert "LAB STAND-IN" in logs and "not vLLM" in logs
    assert "ignoring --tensor-parallel-size 1" in logs and "ignoring --enforce-eager" in logs
    assert KEY not in logs
    description = docker("image", "inspect", "-f",
                         '{{index .Config.Labels "org.opencontainers.image.description"}}',
                         engine["image"])
    assert "LAB STAND-IN for vllm/vllm-openai" in description
    # The stack's healthcheck, inside the container; and it runs as a non-root user.
    docker("exec", engine["name"], "python3", "-c", STACK_HEALTHCHECK)
    assert docker("exec", engine["name"], "id", "-u") != "0"
    assert KEY not in docker("inspect", "-f", "{{json .Config.Cmd}}", engine["name"])


def test_engine_refuses_a_flag_vllm_does_not_have(engine):
    """vLLM 0.11.0's argparse refuses an unknown flag (exit 2): so does the stand-in (issue 25),
    before loading anything."""
    refused = subprocess.run(["docker", "run", "--rm", engine["image"], "/models/m",
                              "--some-future-flag", "x"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "vllm serve: error: unrecognized arguments: --some-future-flag x" in refused.stderr


def test_health_version_metrics_need_no_key_v1_does(engine):
    base = engine["base"]
    status, headers, body = http("GET", base + "/health", key=None)
    assert (status, body) == (200, b"")
    assert headers["x-lab-stand-in"] == "gpufleet lab CPU engine"
    assert headers["x-engine-task"] == "engine-task-1"
    assert http("GET", base + "/version", key=None)[0] == 200
    assert b"vllm:prompt_tokens_total" in http("GET", base + "/metrics", key=None)[2]
    for method, path, body in (("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"prompt": "x"}),
                               ("POST", "/v1/chat/completions", {"messages": []})):
        for key in (None, "wrong"):
            status, _, raw = http(method, base + path, body, key=key)
            assert status == 401 and json.loads(raw) == {"error": "Unauthorized"}


def _series(text: str, name: str) -> float:
    """The value of one vLLM series of the engine's own model (labels engine and model_name)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and 'model_name="tiny-llama"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def test_vllm_metrics_move_by_the_requests_and_tokens_served(engine):
    """vLLM's series (names, labels, histograms) move when load flows: three completions add
    three to each request histogram and their completion tokens to the token counter."""
    base = engine["base"]
    before = http("GET", base + "/metrics", key=None)[2].decode()
    tokens = 0
    for _ in range(3):
        status, _, raw = http("POST", base + "/v1/completions",
                              {"prompt": "The quick", "max_tokens": 5, "ignore_eos": True})
        assert status == 200
        tokens += json.loads(raw)["usage"]["completion_tokens"]
    after = http("GET", base + "/metrics", key=None)[2].decode()
    for name in ("vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:request_generation_tokens_count"):
        assert _series(after, name) - _series(before, name) == 3, name
    assert _series(after, "vllm:generation_tokens_total") - \
        _series(before, "vllm:generation_tokens_total") == tokens == 15
    assert _series(after, "vllm:inter_token_latency_seconds_count") - \
        _series(before, "vllm:inter_token_latency_seconds_count") == tokens - 3
    assert _series(after, "vllm:num_requests_running") == 0


def test_models_lists_the_served_name(engine):
    status, _, raw = http("GET", engine["base"] + "/v1/models")
    card = json.loads(raw)["data"][0]
    assert status == 200 and card["id"] == "tiny-llama" and card["object"] == "model"
    assert (card["owned_by"], card["root"], card["max_model_len"]) == \
        ("vllm", "/models/tiny-llama", MAX_MODEL_LEN)
    status, _, raw = http("POST", engine["base"] + "/v1/completions",
                          {"model": "llama-70b", "prompt": "x"})
    assert status == 404 and json.loads(raw)["error"]["type"] == "NotFoundError"


def test_greedy_completion_is_the_reference_forward_pass(engine, reference):
    prompt = "The quick brown fox"
    out = completion(engine, {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                              "logprobs": 1})
    want_ids, want_logprobs = reference.greedy(reference.encode(prompt, True), 12)
    choice = out["choices"][0]
    assert out["usage"]["prompt_tokens"] == len(reference.encode(prompt, True)) == 20
    assert out["usage"]["completion_tokens"] == len(want_ids)
    stop = want_ids[-1] in reference.eos_ids
    assert choice["finish_reason"] == ("stop" if stop else "length")
    assert choice["text"] == reference.decode(want_ids[:-1] if stop else want_ids)
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == len(want_logprobs)
    assert max(abs(a - b) for a, b in zip(got, want_logprobs)) < 1e-4, (got, want_logprobs)


def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    assert completion(engine, body)["choices"][0]["text"] == \
        completion(engine, body)["choices"][0]["text"]
    seeded = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9,
              "seed": 1234}
    first = completion(engine, seeded)["choices"][0]
    assert completion(engine, seeded)["choices"][0]["text"] == first["text"]
    assert completion(engine, {**seeded, "seed": 99})["usage"]["completion_tokens"] >= 1


def test_streaming_sends_the_same_text_as_sse_with_usage(engine):
    body = {"model": "tiny-llama", "prompt": "Streaming test", "max_tokens": 10,
            "temperature": 0}
    whole = completion(engine, body)
    status, headers, raw = http("POST", engine["base"] + "/v1/completions",
                                {**body, "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n")
    events = protocol.parse_sse(raw)
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        **whole["usage"], "prompt_tokens_details": None}


def test_chat_uses_the_models_template_and_the_reference_agrees(engine, reference):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello."}]
    status, _, raw = http("POST", engine["base"] + "/v1/chat/completions",
                          {"model": "tiny-llama", "messages": messages, "max_tokens": 8,
                           "temperature": 0})
    assert status == 200, raw
    out = json.loads(raw)
    prompt_text = protocol.render_chat_template(reference.chat_template, messages, True,
                                                reference.bos, reference.eos)
    prompt = reference.encode(prompt_text, False)
    want, _ = reference.greedy(prompt, 8)
    assert out["object"] == "chat.completion"
    assert out["usage"]["prompt_tokens"] == len(prompt)
    assert out["usage"]["completion_tokens"] == len(want)
    stop = want[-1] in reference.eos_ids
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == reference.decode(want[:-1] if stop else want)
    # Streamed chat: the role first, then the same content.
    status, _, raw = http("POST", engine["base"] + "/v1/chat/completions",
                          {"model": "tiny-llama", "messages": messages, "max_tokens": 8,
                           "temperature": 0, "stream": True})
    chunks = protocol.parse_sse(raw)[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        message["content"]


def test_context_length_is_honoured(engine):
    status, _, raw = http("POST", engine["base"] + "/v1/completions",
                          {"prompt": "x" * 150, "max_tokens": 100})
    assert status == 400 and f"maximum context length is {MAX_MODEL_LEN}" in raw.decode()


def test_overlapping_requests_all_answer_and_health_stays_up(engine):
    results, errors = [], []

    def worker(i):
        try:
            out = completion(engine, {"prompt": f"request {i}", "max_tokens": 40,
                                      "temperature": 0.8, "seed": i, "ignore_eos": True})
            results.append(out["usage"]["completion_tokens"])
        except Exception as error:  # collected: a thread cannot fail the test itself
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    health = []
    while any(t.is_alive() for t in threads) and len(health) < 50:
        t0 = time.monotonic()
        health.append((http("GET", engine["base"] + "/health", key=None, timeout=5)[0],
                       time.monotonic() - t0))
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and results == [40] * 8
    assert health and all(status == 200 for status, _ in health)
    assert max(seconds for _, seconds in health) < 2.0


def test_a_bad_model_directory_exits_non_zero_with_the_reason(engine, tmp_path):
    name = f"{LAB}-engine-bad-{os.getpid()}"
    try:
        result = subprocess.run(
            ["docker", "run", "--name", name, "--label", f"gpufleet.lab={LAB}",
             "--network", "none", engine["image"], "/models/missing"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "no config.json" in result.stdout + result.stderr
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_engine_stops_promptly_on_sigterm_cutting_what_it_has_as_vllm_does(engine):
    """Last of the engine tests: Swarm's rolling update stops tasks with SIGTERM, and vLLM 0.11
    aborts the requests in flight then (the deploy's drain agent is there for that): so does
    the stand-in, or the lab would show rolling updates kinder than real vLLM's."""
    request = urllib.request.Request(
        engine["base"] + "/v1/completions", method="POST",
        # Several choices of the longest the context allows: seconds of work, not a blink.
        data=json.dumps({"model": "tiny-llama", "prompt": "a", "max_tokens": 190, "n": 8,
                         "ignore_eos": True, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    stream = urllib.request.urlopen(request, timeout=60)
    first = stream.readline()  # the stream has begun
    started = time.monotonic()
    stopper = threading.Thread(target=docker, args=("stop", "-t", "30", engine["name"]))
    stopper.start()
    rest = b""
    try:
        while chunk := stream.read(256):
            rest += chunk
    except Exception:  # http.client.IncompleteRead: the chunked body was cut
        pass
    stopper.join(timeout=60)
    # Cut (no [DONE]) or ended with vLLM's error event: either way not the answer asked for.
    assert first.startswith(b"data: ")
    assert b"data: [DONE]" not in rest or b'data: {"error"' in rest, rest[-300:]
    assert rest.count(b'"finish_reason":"length"') < 8
    assert time.monotonic() - started < 15
    assert docker("inspect", "-f", "{{.State.ExitCode}}", engine["name"]) == "0"


# ------------------------------------------------------------------ the gateway


def test_debians_haproxy_accepts_what_the_stacks_gateway_config_uses():
    image = gateway.ensure_image()
    labels = {"gpufleet.lab": LAB}
    rc, output = gateway.check_config(image, gateway.CHECK_CONFIG, labels=labels)
    assert rc == 0, output
    assert "Configuration file is valid" in output
    rc, output = gateway.check_config(
        image, gateway.CHECK_CONFIG.replace("server-template", "server-templat"), labels=labels)
    assert rc != 0 and "server-templat" in output


def test_gateway_runs_in_the_foreground_as_haproxy_and_stops_on_sigusr1(tmp_path):
    image = gateway.ensure_image()
    config = tmp_path / "haproxy.cfg"
    config.write_text("""\
global
    log stdout format raw local0
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend api
    bind :8080
    acl authorized req.hdr(authorization) -m str -f /usr/local/etc/haproxy/api-keys.lst
    http-request return status 401 content-type application/json string '{"error":"Unauthorized"}' unless authorized
    http-request return status 200 content-type text/plain string "gateway ok"
""")
    (tmp_path / "api-keys.lst").write_text(f"Bearer {KEY}\n")
    for path in (tmp_path, config, tmp_path / "api-keys.lst"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    name = f"{LAB}-gateway-test-{os.getpid()}"
    try:
        docker("run", "-d", "--name", name, "--label", f"gpufleet.lab={LAB}",
               "-v", f"{tmp_path}:/usr/local/etc/haproxy:ro", "-p", f"127.0.0.1:{port}:8080",
               image)
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, body = http("GET", f"http://127.0.0.1:{port}/", key=KEY, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(docker("logs", name, check=False))
                time.sleep(0.3)
        assert (status, body) == (200, b"gateway ok")
        assert http("GET", f"http://127.0.0.1:{port}/v1/models", key="nope")[0] == 401
        # PID 1 is haproxy in master-worker, foreground mode, as user haproxy.
        cmdline = docker("exec", name, "cat", "/proc/1/cmdline").replace("\0", " ")
        assert cmdline.startswith("haproxy -W -db -f /usr/local/etc/haproxy/haproxy.cfg")
        assert docker("exec", name, "id", "-un") == "haproxy"
        assert docker("inspect", "-f", "{{.Config.StopSignal}}", name) == "SIGUSR1"
        started = time.monotonic()
        docker("stop", "-t", "20", name)
        assert time.monotonic() - started < 10  # a graceful stop, not the SIGKILL timeout
        assert docker("inspect", "-f", "{{.State.ExitCode}}", name) == "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def stack_gateway_config(models: list[dict], addresses: dict[str, str]) -> str:
    """The gateway configuration the stack renders (operations/stack.render_gateway) for
    `models`, over nodes named and addressed as `addresses` (hostname -> address), each with
    two simulated H100s."""
    from operations import gateway as gw
    from operations.config import validate_host_data
    from operations.inventory_data import load_group_data
    from operations.sizing import GIB, Node

    entries = [{"repo_id": f"org/{m['name']}", "revision": "0" * 40, **m} for m in models]
    settings = validate_host_data("lab", {**load_group_data()["all"], "models": entries,
                                          "stack_api_key_file": "/etc/key",
                                          "stack_engine_key_file": "/etc/engine-key",
                                          "monitoring_grafana": False})
    nodes = [Node(name, 2, "NVIDIA H100 80GB HBM3", 81559, 64 * GIB, addr=addr)
             for name, addr in addresses.items()]
    # carol: a client with a key file but no request yet (her counter reads 0).
    # The exporter's listener too: Debian's HAProxy must know its prometheus-exporter service.
    access = gw.GatewayAccess(clients=("operator", "alice", "carol"), metrics_port=8405,
                              metrics_sources=("10.9.0.0/16",))
    return gw.render_gateway([m for m in settings.models if m.serve], nodes, 8080, access=access)


ONE_MODEL = [{"name": "tiny-llama"}]
TWO_MODELS = [{"name": "tiny-llama", "port": 8001}, {"name": "other-model", "port": 8002}]
@pytest.mark.parametrize("models", [ONE_MODEL, TWO_MODELS], ids=["one-model", "two-models"])
def test_stacks_gateway_config_passes_haproxy_check_in_the_lab_image(models):
    config = stack_gateway_config(models, {"node-1": "10.0.0.1", "node-2": "10.0.0.2"})
    rc, output = gateway.check_config(gateway.ensure_image(), config, labels={"gpufleet.lab": LAB},
                                      secrets=gateway_secrets())
    assert rc == 0, output


@pytest.mark.parametrize("receiver", [None, "slack", "pagerduty"])
def test_the_monitoring_files_pass_prometheus_and_alertmanager_own_checks(tmp_path, receiver):
    """promtool and amtool of the lab's images (Prometheus 2.42, Alertmanager 0.25) on the files
    the monitoring phase renders. (webhook's url_file needs Alertmanager 0.26 or later, which
    production's image is: the lab's cannot check it.)"""
    from operations import monitoring_render
    from operations.config import validate_host_data
    from operations.inventory_data import load_group_data
    from operations.sizing import GIB, Node
    from scripts.lab import dcgm

    settings = validate_host_data("lab", {
        **load_group_data()["all"], "models": [{"name": "tiny-llama", "repo_id": "org/tiny",
                                                "revision": "0" * 40}],
        "stack_api_key_file": "/etc/key", "stack_engine_key_file": "/etc/engine-key",
        "monitoring_grafana": False, "monitoring_alert_receiver": receiver,
        "monitoring_alert_receiver_file": "/etc/receiver" if receiver else None})
    nodes = [Node("node-1", 2, "NVIDIA H100 80GB HBM3", 81559, 64 * GIB, addr="10.0.0.1", manager=True)]
    directory = tmp_path / "monitoring"
    for path, text in monitoring_render.render_files(settings, nodes, "node-1").items():
        target = directory / path.removeprefix(monitoring_render.MONITORING_DIR + "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    tags = dcgm.ensure_images()
    mount = ["-v", f"{directory}:{monitoring_render.MONITORING_DIR}:ro"]
    checks = [(tags["prometheus"], "promtool", ["check", "config", "prometheus.yml"]),
              (tags["alertmanager"], "amtool", ["check-config", "alertmanager.yml"])]
    for image, tool, args in checks:
        result = subprocess.run(["docker", "run", "--rm", "--network", "none", *mount, "-w",
                                 monitoring_render.MONITORING_DIR, "--entrypoint", tool, image, *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.parametrize("models", [ONE_MODEL, TWO_MODELS], ids=["one-model", "two-models"])
def test_stacks_gateway_routes_to_the_engines_of_every_node(tmp_path, files, models):
    """The two stand-ins as the stack runs them: the gateway with the configuration the stack
    renders (a server per node at the model's port, httpchk /health, the key from
    /run/secrets/gateway_auth, routing by the body's "model") in front of two engine tasks of
    tiny-llama, on a network of the test's own."""
    engine_tag, gateway_tag = engine_image.ensure_image(), gateway.ensure_image()
    port_of_tiny = str(models[0].get("port", 8000))
    revision = hub_model.write_repo(tmp_path / "hub", files)
    model_dir = tmp_path / "hub" / hub_model.REPO_ID / revision
    tag = f"{LAB}-gw-e2e-{os.getpid()}"
    network, port = tag, free_port()
    env = {**os.environ, "VLLM_API_KEY": ENGINE_KEY}
    containers = [f"{tag}-engine-1", f"{tag}-engine-2", f"{tag}-gateway"]
    try:
        docker("network", "create", "--label", f"gpufleet.lab={LAB}", network)
        addresses = {}
        for name in containers[:2]:
            docker("run", "-d", "--name", name, "--hostname", name, "--label",
                   f"gpufleet.lab={LAB}", "--network", network,
                   "-e", "VLLM_API_KEY", "-v", f"{model_dir}:/models/tiny-llama:ro",
                   engine_tag, "/models/tiny-llama", "--served-model-name", "tiny-llama",
                   "--port", port_of_tiny, env=env)
            addresses[name] = docker("inspect", "-f", "{{(index .NetworkSettings.Networks \""
                                     + network + "\").IPAddress}}", name)
        conf, secrets = tmp_path / "conf", tmp_path / "secrets"
        for directory, files in ((conf, {"haproxy.cfg": stack_gateway_config(models, addresses)}),
                                 (secrets, gateway_secrets())):
            directory.mkdir(mode=0o755)
            directory.chmod(0o755)
            for name, text in files.items():
                (directory / name).write_text(text)
                (directory / name).chmod(0o644)
        docker("run", "-d", "--name", containers[2], "--label", f"gpufleet.lab={LAB}",
               "--network", network, "-v", f"{conf}:/usr/local/etc/haproxy:ro",
               "-v", f"{secrets}:/run/secrets:ro", "-p", f"127.0.0.1:{port}:8080", gateway_tag)
        base = f"http://127.0.0.1:{port}"
        body = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
        tasks, texts, answers = set(), set(), []
        deadline = time.monotonic() + 30
        while len(tasks) < 2 and time.monotonic() < deadline:
            try:
                status, headers, raw = http("POST", base + "/v1/completions", body, timeout=10)
            except OSError as error:  # the gateway is still starting
                status, headers, raw = 0, {}, str(error).encode()
            answers.append((status, raw[:120]))
            if status == 200:
                tasks.add(headers["x-engine-task"])
                texts.add(json.loads(raw)["choices"][0]["text"])
            else:
                time.sleep(0.5)
        assert tasks == set(containers[:2]), answers[-3:]  # both engines answer
        assert len(texts) == 1  # the same model: the same greedy text
        status, headers, raw = http("POST", base + "/v1/completions", body, key=None)
        assert status == 401 and json.loads(raw) == {"error": "Unauthorized"}
        assert "x-engine-task" not in {k.lower() for k in headers}  # the gateway answered
        # A named client's key works; the engines never see it (the gateway sends their own).
        assert http("POST", base + "/v1/completions", body, key=ALICE)[0] == 200
        assert http("POST", base + "/v1/completions", body, key=ENGINE_KEY)[0] == 401
        # The operator pins a request to one engine task by name; nobody else may.
        for name in containers[:2]:
            status, headers, _ = http("POST", base + "/v1/completions", body,
                                      headers={"X-Gpufleet-Pin": f"tiny-llama@{name}"})
            assert status == 200 and headers["x-engine-task"] == name
            assert headers["x-gpufleet-server"] == name
        assert http("POST", base + "/v1/completions", body, key=ALICE,
                    headers={"X-Gpufleet-Pin": f"tiny-llama@{containers[0]}"})[0] == 403
        assert http("GET", base + "/health", key=KEY, headers={"X-Gpufleet-Pin": "nope@x"})[0] == 404
        # The gateway's own health: 200 only while every model has a healthy engine.
        assert http("GET", base + "/health", key=None)[0] == 200
        # Requests per client by name, in Prometheus' text format, for the operator's key only;
        # alice's two (one refused) are counted, a key the gateway does not know is not.
        status, headers, raw = http("GET", base + "/metrics")
        text = raw.decode()
        assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4", text
        counts = dict(re.findall(r'^gpufleet_gateway_client_requests_total\{client="([a-z]+)"\} '
                                 r"(\d+)$", text, re.M))
        assert counts["alice"] == "2" and counts["carol"] == "0" and int(counts["operator"]) > 2
        assert all(line.startswith("# ") or re.fullmatch(r'\w+\{client="[a-z]+"\} \d+', line)
                   for line in text.splitlines()), text
        assert not {KEY, ALICE, ENGINE_KEY} & set(re.split(r'[\s"]', text))
        assert http("GET", base + "/metrics", key=ALICE)[0] == 403
        assert http("GET", base + "/metrics", key=None)[0] == 401
    finally:
        for name in containers:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "network", "rm", network], capture_output=True)


# ------------------------------------------------------------------ the lab's registry


def test_up_pushed_every_image_and_points_the_stack_at_them(lab):
    settings = lab.state["settings"]
    registry = settings["docker_daemon_config"]["insecure-registries"][0]
    engines = settings["stack_engine_images"]
    engine_ref = engines["vllm"]
    gateway_ref = settings["stack_gateway_image"]
    assert engine_ref.startswith(f"{registry}/lab/vllm-openai:")
    assert engines["tgi"].startswith(f"{registry}/lab/text-generation-inference:")
    assert engines["ollama"].startswith(f"{registry}/lab/ollama:")
    assert gateway_ref.startswith(f"{registry}/lab/haproxy:")
    assert engine_ref.rpartition(":")[2] == engine_image.ensure_image().rpartition(":")[2]
    for flavour in ("tgi", "ollama"):
        assert engines[flavour].rpartition(":")[2] == \
            engine_image.ensure_flavour(flavour).rpartition(":")[2]
    assert gateway_ref.rpartition(":")[2] == gateway.ensure_image().rpartition(":")[2]
    push = registry_service.running_push_address(lab.name)
    for ref in (engine_ref, engines["tgi"], engines["ollama"], gateway_ref):
        repository, tag = ref[len(registry) + 1:].rsplit(":", 1)
        assert registry_service.remote_digest(push, repository, tag), ref
    # A second `up` pushes nothing and gives the same references.
    again = lab.cli("up", "--hosts", "3", "--no-deploy")
    assert again.returncode == 0, again.stderr
    assert "nothing pushed" in again.stdout and "pushed gpufleet-lab-engine" not in again.stdout
    lab.reload()
    assert lab.state["settings"]["stack_engine_images"] == engines
    assert lab.state["settings"]["stack_gateway_image"] == gateway_ref
