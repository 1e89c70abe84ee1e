"""The gateway's security on the lab fleet: HTTPS with the lab's own CA, plain HTTP redirected,
named client keys (one revoked under a steady load, none of the others' requests failing), a
rate limit, engine ports closed to all but the gateway nodes, and no key in any output, service
spec or file. The module turns TLS on (`lab.py tls on`) and puts the lab back as it was after.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scripts.lab import tls  # noqa: E402
from scripts.loadclient import Endpoint, run_load  # noqa: E402

REDIRECT_PORT = 8079
GATEWAY_PORT = 8080  # group_data/all.py stack_gateway_port: the lab keeps it
BOB_PER_MIN = 30


def settings(lab) -> dict:
    lab.reload()
    return lab.state["settings"]


def deploy(lab, *extra) -> subprocess.CompletedProcess:
    result = lab.pyinfra("-y", *extra, "inventories/lab.py", "deploy.py")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result


def key(path: str) -> str:
    return Path(path).read_text().strip()


def manager(lab) -> dict:
    return lab.hosts[0]


def client(lab, ca: str | None = None) -> httpx.Client:
    """A fresh client verifying the gateway against the lab CA (or `ca`): no pooled connection
    from another test."""
    return httpx.Client(verify=ssl.create_default_context(cafile=ca or settings(lab)["stack_gateway_ca_file"]),
                        timeout=30)


def get(lab, path: str, api_key: str | None, ca: str | None = None, **kwargs) -> httpx.Response:
    s = settings(lab)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with client(lab, ca) as c:
        return c.get(f"https://{manager(lab)['address']}:{GATEWAY_PORT}{path}", headers=headers,
                     extensions={"sni_hostname": s["stack_gateway_tls_server_name"]}, **kwargs)


@pytest.fixture(scope="module")
def secured(lab):
    edits = [lab.cli("tls", "on"),
             lab.cli("set", "all", f"stack_gateway_http_redirect_port={REDIRECT_PORT}",
                     "stack_client_rate_limits=" + json.dumps({"bob": BOB_PER_MIN}))]
    try:
        assert all(e.returncode == 0 for e in edits), [e.stderr for e in edits]
        deploy(lab)
        yield lab
    finally:  # the redirect port first: without TLS it is refused
        unset = lab.cli("unset", "all", "stack_gateway_http_redirect_port",
                        "stack_client_rate_limits", "stack_client_keys")
        off = lab.cli("tls", "off")
        assert unset.returncode == 0 and off.returncode == 0, unset.stderr + off.stderr
        deploy(lab)
        assert "stack_gateway_tls_cert_file" not in settings(lab)


def test_https_passes_the_smoke_tests_verified_against_the_lab_ca(secured, tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, "scripts/smoke.py", "inventories/lab.py", "--json",
                             str(out), "--deadline", "120"], cwd=REPO, env=secured.env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and all(e["url"].startswith("https://") for e in report["endpoints"])
    assert secured.changed_operations() == []  # TLS on, a second run changes nothing


def test_the_load_test_verifies_the_gateway_and_sends_through_it_and_pinned(secured, tmp_path):
    for target in ("gateway", "engines"):
        out = tmp_path / target
        result = subprocess.run([sys.executable, "scripts/loadtest.py", "inventories/lab.py",
                                 "--target", target, "--requests", "8", "--concurrency", "2",
                                 "--max-tokens", "4", "--out", str(out)], cwd=REPO,
                                env=secured.env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        run = json.loads((out / "summary.json").read_text())["summaries"]["load"]
        assert run["requests"] == 8 and run["errors"] == 0, run
        if target == "engines":  # one endpoint per engine task (pinned), named by it
            assert all(name.startswith("engine tiny-llama@") for name in
                       json.loads((out / "summary.json").read_text())["meta"]["endpoints"].split(", "))


def test_plain_http_is_redirected_and_the_https_port_speaks_no_plain_http(secured):
    address = manager(secured)["address"]
    answer = httpx.get(f"http://{address}:{REDIRECT_PORT}/v1/models?x=1",
                       headers={"Host": "gateway.example:80"}, timeout=10)
    assert answer.status_code == 308
    assert answer.headers["location"] == f"https://gateway.example:{GATEWAY_PORT}/v1/models?x=1"
    with pytest.raises(httpx.HTTPError):  # TLS only on the gateway's port
        httpx.get(f"http://{address}:{GATEWAY_PORT}/health", timeout=10)


def test_a_wrong_ca_fails_verification(secured, tmp_path):
    ca_key, ca_cert = tls.make_ca()
    other = tls.write_pair(tmp_path, "other-ca", ca_cert, ca_key)["cert"]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        get(secured, "/health", None, ca=other)
    result = subprocess.run([sys.executable, "scripts/smoke.py", "inventories/lab.py", "--deadline",
                             "5", "--data", f"stack_gateway_ca_file={other}"], cwd=REPO,
                            env=secured.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in result.stderr, result.stderr


def test_each_named_client_works_and_bob_is_held_to_his_rate(secured):
    s = settings(secured)
    alice, bob = key(s["stack_client_keys"]["alice"]), key(s["stack_client_keys"]["bob"])
    assert get(secured, "/v1/models", alice).status_code == 200
    assert get(secured, "/v1/models", key(s["stack_engine_key_file"])).status_code == 401
    statuses = [get(secured, "/v1/models", bob).status_code for _ in range(BOB_PER_MIN + 5)]
    assert statuses[:BOB_PER_MIN - 1] == [200] * (BOB_PER_MIN - 1), statuses
    assert statuses[-1] == 429 and 429 in statuses[BOB_PER_MIN - 1:BOB_PER_MIN + 1], statuses
    assert get(secured, "/v1/models", alice).status_code == 200  # alice is not limited
    logs = secured.gateway_log(manager(secured)["name"])
    named = [line for line in logs.stdout.splitlines() if "client=alice" in line or "client=bob" in line]
    assert any("client=alice" in line for line in named), logs.stdout[-2000:]
    assert sum("client=bob" in line and " 429 " in line for line in named) >= 5, named[-10:]
    assert alice not in logs.stdout and bob not in logs.stdout
    # The same by name on the gateway's /metrics (the operator's key): bob's refused requests
    # are counted too.
    metrics = get(secured, "/metrics", key(s["stack_api_key_file"]))
    assert metrics.status_code == 200, metrics.text
    counts = {m[0]: int(m[1]) for m in re.findall(
        r'^gpufleet_gateway_client_requests_total\{client="(\w+)"\} (\d+)$', metrics.text, re.M)}
    assert counts["bob"] >= BOB_PER_MIN + 5 and counts["alice"] >= 2, counts
    assert alice not in metrics.text and bob not in metrics.text
    assert get(secured, "/metrics", alice).status_code == 403


def test_revoking_one_client_under_a_steady_load_fails_no_request_of_the_others(secured):
    s = settings(secured)
    keys = s["stack_client_keys"]
    alice, bob = key(keys["alice"]), key(keys["bob"])
    secrets = {key(s["stack_api_key_file"]), alice, bob, key(s["stack_engine_key_file"])}
    pem = Path(s["stack_gateway_tls_key_file"]).read_text().splitlines()[1]  # a line of the key
    engines_before = secured.ssh(manager(secured)["name"],
                                 "sudo docker service ps -q gpufleet_tiny-llama").stdout.split()
    endpoint = Endpoint(f"https://{manager(secured)['address']}:{GATEWAY_PORT}", ("tiny-llama",),
                        server_name=s["stack_gateway_tls_server_name"])
    verify = ssl.create_default_context(cafile=s["stack_gateway_ca_file"])
    records: list = []
    load = threading.Thread(target=lambda: records.extend(asyncio.run(run_load(
        [endpoint], alice, requests=3000, concurrency=4, max_seconds=110, stream=True,
        max_tokens=8, request_rate=5.0, verify=verify))))
    load.start()
    try:
        time.sleep(5)
        # Revoking bob is dropping his entry (and his rate limit: a limit for a client without
        # a key is refused as a likely typo).
        edit = secured.cli("set", "all", "stack_client_keys=" + json.dumps({"alice": keys["alice"]}),
                           "stack_client_rate_limits={}")
        assert edit.returncode == 0, edit.stderr
        revoked = deploy(secured, "-vvv")
    finally:
        load.join(timeout=200)
    failed = [(r.status, r.error) for r in records if not r.ok]
    assert len(records) > 100 and failed == [], (len(records), failed[:10])
    assert get(secured, "/v1/models", bob).status_code == 401
    assert get(secured, "/v1/models", alice).status_code == 200
    # Only the gateway rolled: the engines never held a client's key.
    assert secured.ssh(manager(secured)["name"], "sudo docker service ps -q gpufleet_tiny-llama"
                       ).stdout.split() == engines_before
    # No key and no line of the TLS key in the -vvv output of the run that made the new secret.
    printed = revoked.stdout + revoked.stderr
    assert "created secret gpufleet_gateway_clients_" in printed
    assert not [v for v in secrets | {pem} if v in printed]


def test_no_key_in_a_service_spec_or_a_file_outside_the_secrets_mounts(secured):
    s = settings(secured)
    values = [key(s["stack_api_key_file"]), key(s["stack_client_keys"]["alice"]),
              key(s["stack_engine_key_file"]),
              Path(s["stack_gateway_tls_key_file"]).read_text().splitlines()[1]]
    node = manager(secured)["name"]
    inspect = secured.ssh(node, "sudo docker service inspect $(sudo docker service ls -q)")
    assert inspect.returncode == 0 and "gpufleet_gateway" in inspect.stdout
    assert not [v for v in values if v in inspect.stdout]
    sanity = subprocess.run([sys.executable, "scripts/lab.py", "--name", secured.name, "ssh", node,
                             "sudo grep -rlF -f - /var/lib/docker/containers | head -1"],
                            cwd=REPO, env=secured.env, input=values[2] + "\n", capture_output=True,
                            text=True, timeout=300)
    assert "/mounts/secrets/" in sanity.stdout, sanity.stdout  # the search does find a secret
    for host in secured.hosts:
        # Swarm mounts each task's secrets on a tmpfs under its container's mounts/secrets: the
        # container's /run/secrets. Nowhere else. The values go to grep on stdin: on its command
        # line sudo would log them to the journal, the very place searched.
        found = subprocess.run(
            [sys.executable, "scripts/lab.py", "--name", secured.name, "ssh", host["name"],
             "sudo grep -rlF -f - /etc /var/log /var/lib/docker/containers /home /root /tmp /opt "
             "/var/lib/gpufleet /var/backups 2>/dev/null | grep -v '/mounts/secrets/' || true"],
            cwd=REPO, env=secured.env, input="\n".join(values) + "\n", capture_output=True,
            text=True, timeout=300)
        assert found.returncode == 0 and found.stdout.strip() == "", (host["name"], found.stdout,
                                                                      found.stderr[-500:])


def test_engine_ports_answer_only_gateway_nodes_and_only_with_the_internal_key(secured):
    nodes = secured.ssh(manager(secured)["name"],
                        "sudo docker service ps gpufleet_tiny-llama --filter desired-state=running "
                        "--format '{{.Node}}'").stdout.split()
    task = next(h for h in secured.hosts if h["name"] in nodes)
    request = "GET /v1/models HTTP/1.0\\r\\n\\r\\n"

    def status_from(node: str) -> str:
        return secured.status_from(node, task["address"], 8000, request)

    assert " 401 " in status_from(manager(secured)["name"])  # a gateway node, without the key
    others = [h["name"] for h in secured.hosts if h["name"] not in (manager(secured)["name"], task["name"])]
    assert others and all("HTTP/" not in status_from(n) for n in others)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{task['address']}:8000/health", timeout=5)
    rules = secured.ssh(task["name"], "sudo iptables -S GPUFLEET-ENGINES")
    assert "--dport 8000 -j REJECT --reject-with tcp-reset" in rules.stdout
