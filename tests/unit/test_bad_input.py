"""Bad input on every entry point (issue 19): refused before any host is touched, one line per
problem, exit 2, never a traceback.

Each case runs the real command (pyinfra's CLI with deploy.py, or one of the scripts) against a
three-host inventory whose hosts all point at a TCP listener on loopback that counts the
connections it receives: a refused run must leave it at zero. The expected lines are exact.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).parent / "pyinfra")
REVISION = "0e9e39f249a16976918f6564b8830bc894c89659"
MODEL = {"name": "llama", "repo_id": "meta-llama/Llama-3.1-8B-Instruct", "revision": REVISION,
         "replicas": 2}

INVENTORY = """\
from operations.config import validate_inventory

_host = {{"ssh_hostname": "127.0.0.1", "ssh_port": {port}, "ssh_user": "ops",
          "ssh_paramiko_connect_kwargs": {{"timeout": 2}}}}
gpu_nodes = [("gpu-01", dict(_host)), ("gpu-02", dict(_host, **{host2!r})), ("gpu-03", dict(_host))]
swarm_managers = {managers!r}

validate_inventory(globals())
"""


class Listener:
    """A TCP port on loopback that counts connection attempts (an SSH connect is one)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture(scope="module")
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def fleet(tmp_path, listener):
    """Write the inventory (+ its group data) for a case; returns a function doing so."""
    key = tmp_path / "api-key"
    key.write_text("sk-test-key-0123456789\n")
    key.chmod(0o600)
    engine_key = tmp_path / "engine-key"
    engine_key.write_text("ek-test-key-0123456789\n")
    engine_key.chmod(0o600)

    def write(group_lines: str = "", host2: dict | None = None, managers=("gpu-01",),
              models=(MODEL,)) -> Path:
        inventories = tmp_path / "inventories"
        (inventories / "group_data").mkdir(parents=True, exist_ok=True)
        (inventories / "group_data" / "fleet.py").write_text(
            f"models = {list(models)!r}\nstack_api_key_file = {str(key)!r}\n"
            f"stack_engine_key_file = {str(engine_key)!r}\nmonitoring_grafana = False\n" + group_lines)
        path = inventories / "fleet.py"
        path.write_text(INVENTORY.format(port=listener.port, host2=host2 or {},
                                         managers=list(managers)))
        return path

    write.tmp = tmp_path
    return write


def run(command: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYINFRA_PROGRESS": "off"})


def refused_lines(result: subprocess.CompletedProcess) -> list[str]:
    prefix = "configuration error: "
    return [line[len(prefix):] for line in (result.stdout + result.stderr).splitlines()
            if line.startswith(prefix)]


def assert_refused(result, listener, before: int, expected: list[str], code: int = 2):
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert refused_lines(result) == expected, output
    assert "Traceback" not in output and "Connecting to hosts" not in output, output
    assert listener.accepted == before, "a refused run connected to a host"


def model(**fields):
    return {**MODEL, **fields}


KEY_PATH = "{tmp}/api-key"

# (case id, where the bad value is: {"data": [...], "group": "...", "host2": {...}, "models":
# [...], "managers": [...]}, the exact lines expected)
CASES = [
    ("typo-in-data", {"data": ["modls_dir=/x"]},
     ["--data (every host): unknown key 'modls_dir' = '/x': did you mean 'models_dir'?"]),
    ("bool-in-data", {"data": ["nvidia_allow_reboot=yes"]},
     ["--data (every host): key 'nvidia_allow_reboot' = 'yes': expected True or False"]),
    ("choice-in-data", {"data": ["docker_engine_source=snap"]},
     ["--data (every host): key 'docker_engine_source' = 'snap': expected 'docker' or 'distro'"]),
    ("relative-path", {"data": ["models_dir=opt/models"]},
     ["--data (every host): key 'models_dir' = 'opt/models': expected an absolute path such as "
      "/opt/models"]),
    ("root-path", {"group": "models_dir = '/'\n"},
     ["group_data/fleet.py (every host): key 'models_dir' = '/': expected a directory below /, "
      "not / itself"]),
    ("driver-off-branch", {"data": ["nvidia_driver_version=570.86.15"]},
     ["--data (every host): key 'nvidia_driver_version' = '570.86.15': expected a version on "
      "nvidia_driver_branch 580 (starting with '580.')"]),
    ("driver-older-than-image-cuda",
     {"group": "nvidia_driver_branch = '570'\nnvidia_driver_version = '570.172.08'\n"},
     ["group_data/fleet.py (every host): key 'nvidia_driver_version' = '570.172.08': expected "
      "575.51.03 or later: model llama runs vllm/vllm-openai:v0.11.0, built on CUDA 12.9 "
      "(stack_image_cuda), and CUDA 12.9 needs that driver (CUDA Toolkit Release Notes); the "
      "container toolkit would refuse to start it"]),
    ("image-cuda-unknown", {"group": "stack_image_cuda = {'lab/engine:1': '11.2'}\n"},
     ["group_data/fleet.py (every host): key 'stack_image_cuda.lab/engine:1' = '11.2': expected "
      "a CUDA version of the driver table: 11.8, 12.0, 12.1, 12.2, 12.3, 12.4, 12.5, 12.6, 12.8, "
      "12.9, 13.0 (not '11.2')"]),
    ("old-toolkit", {"data": ["nvidia_container_toolkit_version=1.18.0-1"]},
     ["--data (every host): key 'nvidia_container_toolkit_version' = '1.18.0-1': expected "
      "1.19.0-1 or later (1.18 dropped Docker Swarm support in its default mode)"]),
    ("publish-mode", {"data": ["stack_publish_mode=mesh"]},
     ["--data (every host): key 'stack_publish_mode' = 'mesh': expected 'ingress' or 'host'"]),
    ("url", {"data": ["hf_endpoint=huggingface.co"]},
     ["--data (every host): key 'hf_endpoint' = 'huggingface.co': expected an http(s) URL such "
      "as 'https://download.docker.com/linux'"]),
    ("log-size", {"data": ["docker_log_max_size=10X"]},
     ["--data (every host): key 'docker_log_max_size' = '10X': expected a size such as '100m' "
      "(a number followed by k, m or g)"]),
    ("advertise-not-ipv4", {"host2": {"swarm_advertise_address": "999.1.1.1"}},
     ["host gpu-02: key 'swarm_advertise_address' = '999.1.1.1': expected an IPv4 address of "
      "four numbers from 0 to 255 ('999.1.1.1' is not one)"]),
    ("advertise-port", {"host2": {"swarm_advertise_address": "10.20.0.12:70000"}},
     ["host gpu-02: key 'swarm_advertise_address' = '10.20.0.12:70000': expected a port from 1 "
      "to 65535 after the address ('70000' is not)"]),
    ("advertise-garbage", {"host2": {"swarm_advertise_address": "eth0/1"}},
     ["host gpu-02: key 'swarm_advertise_address' = 'eth0/1': expected an IP address or interface "
      "name (up to 15 letters, digits, '.', '_', '-'), optionally :port"]),
    ("engine-args-port", {"models": [model(engine_args=["--port", "9000", "--api-key", "x"])]},
     ["group_data/fleet.py (every host): key 'models[0].engine_args' = ['--port', '9000', "
      "'--api-key', 'x']: expected engine flags the deploy does not set itself: --port comes "
      "from models[].port"]),
    ("engine-args-api-key", {"models": [model(engine_args=["--api-key=sk-1"])]},
     ["group_data/fleet.py (every host): key 'models[0].engine_args' = ['--api-key=sk-1']: "
      "expected engine flags the deploy does not set itself: --api-key comes from "
      "stack_api_key_file (a Docker secret)"]),
    ("engine-args-tp-alias", {"models": [model(engine_args=["-tp", "2"])]},
     ["group_data/fleet.py (every host): key 'models[0].engine_args' = ['-tp', '2']: expected "
      "engine flags the deploy does not set itself: -tp comes from tensor_parallel_size"]),
    ("engine-args-tgi", {"models": [model(engine="tgi", engine_args=["--num-shard", "2"])]},
     ["group_data/fleet.py (every host): key 'models[0].engine_args' = ['--num-shard', '2']: "
      "expected engine flags the deploy does not set itself: --num-shard comes from "
      "tensor_parallel_size"]),
    ("ollama-without-gguf", {"models": [model(engine="ollama")]},
     ["group_data/fleet.py (every host): key 'models[0].gguf_file' = None: expected a GGUF file "
      "of the repository (e.g. 'model-Q4_K_M.gguf') for a served model of engine 'ollama': "
      "Ollama serves only its own store, imported from a GGUF file"]),
    ("gguf-for-vllm", {"models": [model(gguf_file="m.gguf")]},
     ["group_data/fleet.py (every host): key 'models[0].gguf_file' = 'm.gguf': expected no "
      "gguf_file for engine 'vllm' (it serves the safetensors checkpoint)"]),
    ("tgi-served-model-name-flag",
     {"models": [model(engine="tgi", engine_args=["--served-model-name", "x"])]},
     ["group_data/fleet.py (every host): key 'models[0].engine_args' = ['--served-model-name', "
      "'x']: expected engine flags the deploy does not set itself: --served-model-name comes "
      "from served_model_name (TGI has no such flag: the gateway answers the served name)"]),
    ("gateway-body-limit", {"data": ["stack_gateway_max_body_kb=8"]},
     ["--data (every host): key 'stack_gateway_max_body_kb' = 8: expected a number >= 16"]),
    ("engine-args-ollama", {"models": [model(engine="ollama", engine_args=["--verbose"])]},
     ["group_data/fleet.py (every host): key 'models[0].engine_args' = ['--verbose']: expected "
      "no engine_args for engine 'ollama' (`ollama serve` takes no flags)"]),
    ("model-port-swarm", {"models": [model(port=7946)]},
     ["group_data/fleet.py (every host): key 'models[0].port' = 7946: expected a port not used "
      "on the nodes themselves (7946 is Swarm node gossip)"]),
    ("model-port-low", {"models": [model(port=80)]},
     ["group_data/fleet.py (every host): key 'models[0].port' = 80: expected a number >= 1024"]),
    ("gateway-port-ssh", {"data": ["stack_gateway_port=22"]},
     ["--data (every host): key 'stack_gateway_port' = 22: expected a port not used on the nodes "
      "themselves (22 is sshd)"]),
    ("gateway-port-model", {"data": ["stack_gateway_port=8000"]},
     ["--data (every host): key 'stack_gateway_port' = 8000: expected a port that no served "
      "model uses (models[].port)"]),
    ("ports-clash", {"models": [model(), model(name="qwen", served_model_name="qwen")]},
     ["group_data/fleet.py (every host): key 'models' = " + repr([model(), model(
         name="qwen", served_model_name="qwen")]) + ": expected a different port for each "
      "served model; 8000 used more than once"]),
    ("served-names-clash", {"models": [model(), model(name="llama2", port=8001,
                                                     served_model_name="llama")]},
     ["group_data/fleet.py (every host): key 'models' = " + repr([model(), model(
         name="llama2", port=8001, served_model_name="llama")]) + ": expected a different "
      "served_model_name for each served model; llama used more than once"]),
    ("model-names-clash", {"models": [model(), model(port=8001, served_model_name="b")]},
     ["group_data/fleet.py (every host): key 'models' = " + repr([model(), model(
         port=8001, served_model_name="b")]) + ": expected one entry per model name; llama "
      "appear more than once"]),
    ("revision-branch", {"models": [model(revision="main")]},
     ["group_data/fleet.py (every host): key 'models[0].revision' = 'main': expected a pinned "
      "40-hex commit (not a branch or tag)"]),
    ("engine-unknown", {"models": [model(engine="sglang")]},
     ["group_data/fleet.py (every host): key 'models[0].engine' = 'sglang': expected 'vllm', "
      "'tgi' or 'ollama'"]),
    ("image-untagged", {"data": ['stack_engine_images={"vllm": "vllm/vllm-openai"}']},
     ["--data (every host): key 'stack_engine_images.vllm' = 'vllm/vllm-openai': expected an "
      "image pinned by tag or digest ('vllm/vllm-openai' has neither: it would float)"]),
    ("image-latest", {"data": ["stack_gateway_image=haproxy:latest"]},
     ["--data (every host): key 'stack_gateway_image' = 'haproxy:latest': expected an image "
      "pinned by a tag other than 'latest' or by digest ('haproxy:latest' would float)"]),
    ("image-uppercase", {"data": ["nvidia_container_verify_image=Ubuntu:24.04"]},
     ["--data (every host): key 'nvidia_container_verify_image' = 'Ubuntu:24.04': expected an "
      "image reference such as 'vllm/vllm-openai:v0.11.0' (lowercase name, then :tag and/or "
      "@sha256:digest)"]),
    ("api-key-missing", {"data": ["stack_api_key_file=/nonexistent/api-key"]},
     ["--data (every host): key 'stack_api_key_file' = '/nonexistent/api-key': expected a "
      "readable file on the control machine (No such file or directory)"]),
    ("api-key-readable-by-all", {"mode": 0o644},
     ["group_data/fleet.py (every host): key 'stack_api_key_file' = '" + KEY_PATH + "': expected "
      "a private file (mode 0600 or 0400; this one is 0644): chmod 600 " + KEY_PATH]),
    ("hf-token-empty", {"token": ""},
     ["group_data/fleet.py (every host): key 'hf_token_file' = '{tmp}/hf-token': expected a file "
      "holding the secret on one line (as operations/stack_secrets.py reads it)"]),
    ("no-api-key-file", {"group": "stack_api_key_file = None\n"},
     ["group_data/fleet.py (every host): key 'stack_api_key_file' = None: expected a file on the "
      "control machine holding the API key, since models are served"]),
    ("no-engine-key-file", {"group": "stack_engine_key_file = None\n"},
     ["group_data/fleet.py (every host): key 'stack_engine_key_file' = None: expected a file on "
      "the control machine holding the engines' internal key, since models are served (make "
      "one: openssl rand -hex 32 > FILE; chmod 600 FILE)"]),
    ("client-key-readable-by-all", {"client_key": ("sk-alice-0123456789", 0o644)},
     ["group_data/fleet.py (every host): key 'stack_client_keys[alice]' = '{tmp}/alice.key': "
      "expected a private file (mode 0600 or 0400; this one is 0644): chmod 600 {tmp}/alice.key"]),
    ("client-key-is-another-clients", {"client_key": ("sk-test-key-0123456789", 0o600)},
     ["group_data/fleet.py (every host): key 'stack_client_keys[alice]' = '{tmp}/alice.key': "
      "expected a key of its own; stack_api_key_file holds the same key"]),
    ("tls-key-not-the-certificates", {"tls": "mismatch"},
     ["group_data/fleet.py (every host): key 'stack_gateway_tls_key_file' = '{tmp}/tls/other.key': "
      "expected the private key of the certificate in {tmp}/tls/gateway.pem (its first "
      "certificate, CN=gateway.test.lab); this key belongs to another"]),
    ("tls-certificate-expired", {"tls": "expired"},
     ["group_data/fleet.py (every host): key 'stack_gateway_tls_cert_file' = '{tmp}/tls/gateway.pem': "
      "expected a certificate valid now; CN=gateway.test.lab expired 2020-01-31 00:00 UTC"]),
    ("client-named-twice", {"data": ['stack_client_keys={"alice": "/a", "alice": "/b"}']},
     ["--data stack_client_keys: key(s) 'alice' given more than once in one JSON object: "
      "expected each once (JSON keeps only the last, silently)"]),
    ("replicas-over-hosts", {"models": [model(replicas=4)]},
     ["models[0].replicas = 4: expected at most one replica per host of its groups (gpu_nodes: "
      "3 host(s) that stay in the Swarm)"]),
    ("unknown-group", {"models": [model(groups=["big_gpus"])]},
     ["models[0].groups = ['big_gpus']: expected groups of fleet.py (all, fleet, gpu_nodes, "
      "swarm_managers); big_gpus is not one"]),
    ("converge-before-loaded", {"data": ["stack_converge_timeout_s=600"]},
     ["--data (every host): key 'stack_converge_timeout_s' = 600: expected at least the longest "
      "models[].health_start_period_s (1200 s): the deploy would give up on replicas Swarm "
      "still lets load"]),
    ("seeder-without-chain", {"data": ["weights_source=seeder", "weights_distribution=control"]},
     ["--data (every host): key 'weights_source' = 'seeder': expected \"control\" with "
      "weights_distribution \"control\": the seeder is the head of the hosts' chain "
      "(weights_distribution \"peers\")"]),
    ("monitoring-port-clash", {"data": ["monitoring_prometheus_port=8080"]},
     ["--data (every host): key 'monitoring_prometheus_port' = 8080: expected a port nothing "
      "else on the nodes uses; 8080 is also stack_gateway_port"]),
    ("grafana-without-password", {"group": "monitoring_grafana = True\n"},
     # (Named where the None comes from: the default in group_data/all.py.)
     ["group_data/all.py (every host): key 'monitoring_grafana_admin_password_file' = None: "
      "expected a file (0600) on the control machine holding Grafana's admin password, since "
      "models are served with monitoring_grafana on (or monitoring_grafana = False)"]),
    ("receiver-secret-missing", {"data": ["monitoring_alert_receiver=pagerduty",
                                          "monitoring_alert_receiver_file=/nonexistent/key"]},
     ["--data (every host): key 'monitoring_alert_receiver_file' = '/nonexistent/key': expected "
      "a readable file on the control machine (No such file or directory)"]),
    ("daemon-data-root", {"data": ['docker_daemon_config={"data-root": "/data/docker"}']},
     ["--data (every host): key 'docker_daemon_config' = {'data-root': '/data/docker'}: expected "
      "no 'data-root' other than docker_data_root (/var/lib/docker): set docker_data_root"]),
    ("daemon-runtime", {"data": ['docker_daemon_config={"default-runtime": "runc"}']},
     ["--data (every host): key 'docker_daemon_config' = {'default-runtime': 'runc'}: expected "
      "no 'default-runtime' other than 'nvidia' (engines would not see their GPUs)"]),
    ("fleet-wide-differs", {"host2": {"models_dir": "/data/models"}},
     ["host gpu-02: key 'models_dir' = '/data/models': expected the same value on every host "
      "(gpu-01 has '/opt/models'): one stack serves the fleet"]),
    ("labels-namespace", {"host2": {"swarm_node_labels": {"gpufleet.gpu.count": "9"}}},
     ["host gpu-02: key 'swarm_node_labels' = {'gpufleet.gpu.count': '9'}: expected label keys "
      "in lowercase reverse-DNS form, not under gpufleet. ('gpufleet.gpu.count')"]),
    ("one-host-typo", {"host2": {"docker_versoin": "28.5.2"}},
     ["host gpu-02: unknown key 'docker_versoin' = '28.5.2': did you mean 'docker_version'?"]),
    ("two-problems", {"data": ["modls_dir=/x", "docker_log_max_file=0"]},
     ["--data (every host): unknown key 'modls_dir' = '/x': did you mean 'models_dir'?",
      "--data (every host): key 'docker_log_max_file' = 0: expected a number >= 1"]),
]


def tls_files(directory: Path, kind: str) -> str:
    """A certificate and key as the case wants them (the lab CA's tools), as group data lines."""
    import datetime as dt

    from scripts.lab import tls

    directory.mkdir()
    ca_key, ca_cert = tls.make_ca()
    key = tls.new_key()
    start = (dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc) if kind == "expired"
             else ca_cert.not_valid_before_utc)
    paths = tls.write_pair(directory, "gateway", tls.issue(ca_key, ca_cert, "gateway.test.lab", key,
                                                             start, 30), key)
    if kind == "mismatch":
        paths["key"] = tls.write_pair(directory, "other", ca_cert, tls.new_key())["key"]
    return (f"stack_gateway_tls_cert_file = {paths['cert']!r}\n"
            f"stack_gateway_tls_key_file = {paths['key']!r}\n")


def prepare(fleet, case: dict) -> tuple[Path, list[str]]:
    tmp = fleet.tmp
    group = case.get("group", "")
    if "mode" in case:
        (tmp / "api-key").write_text("sk-test-key\n")
    if "client_key" in case:
        value, mode = case["client_key"]
        (tmp / "alice.key").write_text(value + "\n")
        (tmp / "alice.key").chmod(mode)
        group += f"stack_client_keys = {{'alice': {str(tmp / 'alice.key')!r}}}\n"
    if "tls" in case:
        group += tls_files(tmp / "tls", case["tls"])
    if "token" in case:
        (tmp / "hf-token").write_text(case["token"])
        (tmp / "hf-token").chmod(0o600)
        group += f"hf_token_file = {str(tmp / 'hf-token')!r}\n"
    inventory = fleet(group, host2=case.get("host2"), managers=case.get("managers", ["gpu-01"]),
                      models=case.get("models", [MODEL]))
    if "mode" in case:
        (tmp / "api-key").chmod(case["mode"])
    return inventory, [f"--data={item}" for item in case.get("data", [])]


@pytest.mark.parametrize(("case", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_deploy_refuses_before_connecting(fleet, listener, case, expected):
    inventory, data = prepare(fleet, case)
    before = listener.accepted
    result = run([PYINFRA, "-y", str(inventory), "deploy.py", *data])
    expected = [line.replace("{tmp}", str(fleet.tmp)) for line in expected]
    assert_refused(result, listener, before, expected)


def test_there_are_at_least_thirty_rules():
    assert len({case_id for case_id, *_ in CASES}) == len(CASES) >= 30


def test_the_valid_fleet_gets_as_far_as_connecting(fleet, listener):
    """The control case: the same inventory, nothing wrong with it, does try the hosts."""
    inventory = fleet()
    before = listener.accepted
    result = run([PYINFRA, "-y", str(inventory), "deploy.py"], timeout=180)
    assert refused_lines(result) == [], result.stdout + result.stderr
    assert "Connecting to hosts" in result.stdout + result.stderr
    assert listener.accepted > before


def test_an_even_manager_group_is_refused(fleet, listener):
    inventory = fleet(managers=["gpu-01", "gpu-02"])
    before = listener.accepted
    result = run([PYINFRA, "-y", str(inventory), "deploy.py"])
    lines = refused_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith(f"{inventory}: ") and "swarm_managers" in lines[0]
    assert listener.accepted == before


SCRIPT_CASES = [
    ("smoke", ["scripts/smoke.py", "{inventory}"], 2),
    ("loadtest", ["scripts/loadtest.py", "{inventory}", "--out", "{tmp}/load"], 2),
    # The drift check keeps its own contract: 1 = the check failed (bad configuration among
    # the reasons), 2 = drift found; its one-line summary repeats the refusal.
    ("drift", ["scripts/drift_check.py", "{inventory}"], 1),
]


@pytest.mark.parametrize(("argv", "code"), [c[1:] for c in SCRIPT_CASES], ids=[c[0] for c in SCRIPT_CASES])
@pytest.mark.parametrize("data", [["modls_dir=/x"], ["stack_gateway_port=2377"]], ids=["typo", "port"])
def test_every_script_refuses_bad_data_the_same_way(fleet, listener, argv, code, data):
    inventory = fleet()
    before = listener.accepted
    argv = [part.format(inventory=inventory, tmp=fleet.tmp) for part in argv]
    result = run([sys.executable, *argv, *[f"--data={item}" for item in data]])
    expected = {
        "modls_dir=/x": "--data (every host): unknown key 'modls_dir' = '/x': did you mean 'models_dir'?",
        "stack_gateway_port=2377": "--data (every host): key 'stack_gateway_port' = 2377: expected "
                                   "a port not used on the nodes themselves (2377 is Swarm cluster management)",
    }[data[0]]
    assert_refused(result, listener, before, [expected], code=code)


def test_a_data_item_without_a_value_is_one_line_for_the_scripts(fleet, listener):
    inventory = fleet()
    before = listener.accepted
    result = run([sys.executable, "scripts/smoke.py", str(inventory), "--data", "nvidia_allow_reboot"])
    assert_refused(result, listener, before, [
        "--data 'nvidia_allow_reboot': expected KEY=VALUE, e.g. --data nvidia_allow_reboot=true"])


def test_bench_refuses_sizes_that_are_not_numbers():
    result = run([sys.executable, "scripts/bench.py", "--out", "/tmp/unused", "--sizes", "1,three"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(
        "error: --sizes '1,three': expected whole numbers, comma-separated, e.g. 1,3,6,10")
