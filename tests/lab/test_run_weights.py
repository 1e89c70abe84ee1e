"""Model weights on a deployed lab fleet: identical verified copies on every host, the Hub read
once for the whole fleet, one copy out of the control machine and the rest passed from host to
host, a damaged copy repaired from a peer, a host killed mid-distribution failing alone, the
token kept home.

Runs after test_run.py (alphabetical order), on the fleet it converged. (Not test_weights.py:
tests/unit has one, and pytest needs unique basenames.)"""

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

MODEL_DIR = "/opt/models/tiny-llama"
STAGED_WEIGHTS = "/opt/models/.staging/tiny-llama-4eab0cd005a1/model.safetensors"
LEDGER = re.compile(r"Model weights: hub bytes (\d+) .*?; LAN bytes (\d+)[^\n]*")
RELAY_PORT = 7461  # group_data/all.py weights_relay_port


def deploy(lab):
    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py")
    return result, json.loads(result.stdout)["results"]


def hub_stats(lab):
    settings = lab.state["settings"]
    token = Path(settings["hf_token_file"]).read_text().strip()
    request = urllib.request.Request(f"{settings['hf_endpoint'].rstrip('/')}/_lab/stats",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def model_size(lab):
    manifest = json.loads(lab.ssh(lab.hosts[0]["name"], f"cat {MODEL_DIR}/.gpufleet-manifest.json").stdout)
    return sum(entry["size"] for entry in manifest["files"])


def test_every_host_holds_the_same_verified_weights(lab):
    sums = set()
    for host in lab.hosts:
        check = lab.ssh(host["name"], f"cd {MODEL_DIR} && sha256sum --quiet -c .gpufleet-sha256sums && echo verified")
        assert check.stdout.strip() == "verified", f"{host['name']}: {check.stdout}{check.stderr}"
        listing = lab.ssh(host["name"], f"find {MODEL_DIR} -type f -printf '%u:%g %m %p\\n'").stdout.split("\n")
        assert all(line.startswith("root:root 644 ") for line in listing if line), listing
        assert lab.ssh(host["name"], f"find {MODEL_DIR} -type l | wc -l").stdout.strip() == "0"
        sums.add(lab.ssh(host["name"], f"cat {MODEL_DIR}/.gpufleet-sha256sums").stdout)
    assert len(sums) == 1, "hosts hold different copies"


def test_the_hub_was_read_once_for_the_whole_fleet(lab):
    served = sum(hub_stats(lab)["files"].values())
    one_copy = model_size(lab)
    assert one_copy <= served <= 1.1 * one_copy, (served, one_copy, len(lab.hosts))


def ledger(output):
    """(bytes out of the control machine, bytes between hosts) from the phase's report line."""
    match = LEDGER.search(output)
    assert match, output[-3000:]
    between = re.search(r"; between hosts (\d+)", match.group(0))
    return int(match.group(2)), int(between.group(1)) if between else 0


def assert_no_relay_left(lab):
    for host in lab.hosts:
        listening = lab.ssh(host["name"], f"ss -Hltn 'sport = :{RELAY_PORT}'; pgrep -f weights-relay")
        assert listening.stdout.strip() == "", f"{host['name']}: {listening.stdout}"


def verified(lab, node):
    check = lab.ssh(node, f"cd {MODEL_DIR} && sha256sum --quiet -c .gpufleet-sha256sums && echo verified")
    return check.stdout.strip() == "verified"


def test_a_fresh_fleet_gets_one_copy_from_the_control_machine_and_the_rest_from_peers(lab):
    for host in lab.hosts:
        assert subprocess.run(["docker", "exec", host["container"], "rm", "-rf", MODEL_DIR]).returncode == 0
    result, results = deploy(lab)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    one_copy = model_size(lab)
    from_control, between_hosts = ledger(output)
    assert from_control == one_copy, output[-3000:]
    assert between_hosts == (len(lab.hosts) - 1) * one_copy, output[-3000:]
    assert all(verified(lab, h["name"]) for h in lab.hosts)
    assert_no_relay_left(lab)


def test_a_damaged_copy_is_repaired_from_a_peer(lab):
    node = lab.hosts[1]["name"]
    container = lab.hosts[1]["container"]
    before = sum(hub_stats(lab)["files"].values())
    damage = f"printf 'X' | dd of={MODEL_DIR}/model.safetensors bs=1 seek=4096 conv=notrunc 2>/dev/null; rm {MODEL_DIR}/config.json"
    assert subprocess.run(["docker", "exec", container, "sh", "-c", damage]).returncode == 0

    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    changed = {name for op in results["operations"] for name in op["success"]}
    assert changed == {node}
    assert sum(hub_stats(lab)["files"].values()) == before, "the repair went back to the Hub"
    assert verified(lab, node)
    # A host that holds the revision seeded the repair: nothing came from the control machine.
    assert "seeds the chain from its verified copy" in result.stderr + result.stdout
    from_control, between_hosts = ledger(result.stdout + result.stderr)
    assert from_control == 0 and between_hosts > 0, (from_control, between_hosts)
    assert_no_relay_left(lab)

    token = Path(lab.state["settings"]["hf_token_file"]).read_text().strip()
    assert token not in result.stdout + result.stderr
    for host in lab.hosts:
        # The token goes to grep on stdin: on a command line, sudo would log it itself.
        found = subprocess.run(
            ["docker", "exec", "-i", host["container"], "sh", "-c",
             "grep -rlF -f - /opt/models /tmp /etc /var/log /home 2>/dev/null; true"],
            input=token + "\n", capture_output=True, text=True,
        )
        assert found.stdout.strip() == "", f"the Hub token reached {host['name']}: {found.stdout}"

    result, results = deploy(lab)
    assert {name for op in results["operations"] for name in op["success"]} == set()


def hub_control(lab, method, path, body=None):
    endpoint = lab.state["settings"]["hf_endpoint"].rstrip("/")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{endpoint}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def forget_control_cache(lab):
    """The control machine's copy is gone (a new control machine, a cleaned cache): the next
    host that needs a file makes the run ask the Hub again."""
    import shutil

    shutil.rmtree(lab.state["settings"]["weights_cache_dir"], ignore_errors=True)


def test_a_refusing_hub_fails_that_host_clearly_and_keeps_its_copy(lab):
    node, container = lab.hosts[0]["name"], lab.hosts[0]["container"]
    forget_control_cache(lab)
    assert subprocess.run(["docker", "exec", container, "rm", f"{MODEL_DIR}/tokenizer.json"]).returncode == 0
    hub_control(lab, "POST", "/_lab/faults", {"mode": "500", "times": 1000})
    try:
        result, results = deploy(lab)
    finally:
        hub_control(lab, "DELETE", "/_lab/faults")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert {name for op in results["operations"] for name in op["error"]} == {node}
    assert "500" in output, output[-2000:]
    assert "Traceback" not in output
    # The live copy is still where engines read it, damaged file aside: nothing was half-replaced.
    still = lab.ssh(node, f"ls {MODEL_DIR}/model.safetensors {MODEL_DIR}/config.json")
    assert still.returncode == 0, still.stderr

    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    check = lab.ssh(node, f"cd {MODEL_DIR} && sha256sum --quiet -c .gpufleet-sha256sums && echo verified")
    assert check.stdout.strip() == "verified"


def test_a_download_cut_in_the_middle_completes_on_the_same_run(lab):
    node, container = lab.hosts[2]["name"], lab.hosts[2]["container"]
    forget_control_cache(lab)
    assert subprocess.run(["docker", "exec", container, "rm", f"{MODEL_DIR}/model.safetensors"]).returncode == 0
    served_before = hub_stats(lab)["files"].get("gpufleet-lab/tiny-llama/model.safetensors", 0)
    hub_control(lab, "POST", "/_lab/faults", {"mode": "drop", "file": "model.safetensors", "times": 1})
    try:
        result, results = deploy(lab)
    finally:
        hub_control(lab, "DELETE", "/_lab/faults")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {name for op in results["operations"] for name in op["success"]} == {node}
    served = hub_stats(lab)["files"]["gpufleet-lab/tiny-llama/model.safetensors"] - served_before
    assert served > 0, "the cut download was not retried"
    check = lab.ssh(node, f"cd {MODEL_DIR} && sha256sum --quiet -c .gpufleet-sha256sums && echo verified")
    assert check.stdout.strip() == "verified"


def test_a_host_killed_mid_distribution_fails_alone_and_a_rerun_converges(lab):
    """Links shaped to 1 Mbit/s so the transfer takes seconds; the host is killed once part of the
    weights reached its staging directory. The others complete in the same run (from another
    peer, or the control machine when no peer is left before them); the killed host, started
    again, is filled by the next run."""
    from tests.lab.test_host_down import idle_worker, start

    victim = idle_worker(lab)
    container = next(h["container"] for h in lab.hosts if h["name"] == victim)
    for host in lab.hosts:
        assert subprocess.run(["docker", "exec", host["container"], "rm", "-f",
                               f"{MODEL_DIR}/model.safetensors"]).returncode == 0
    shaped = lab.cli("shape", "--host-mbit", "1", "--uplink-mbit", "1")
    assert shaped.returncode == 0, shaped.stdout + shaped.stderr
    try:
        run = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "pyinfra"), "--json", "-y", "inventories/lab.py",
             "scripts/bench_weights_deploy.py"],
            cwd=REPO, env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            size = subprocess.run(["docker", "exec", container, "stat", "-c", "%s", STAGED_WEIGHTS],
                                  capture_output=True, text=True).stdout.strip()
            if size.isdigit() and int(size) > 32 * 1024:
                break
            time.sleep(0.1)
        else:
            run.kill()
            pytest.fail(f"{victim} never started receiving: {run.communicate()}")
        subprocess.run(["docker", "kill", container], check=True, capture_output=True)
        stdout, stderr = run.communicate(timeout=600)
    finally:
        lab.cli("shape", "--off")
    try:
        results = json.loads(stdout)["results"]
    except json.JSONDecodeError:
        pytest.fail(f"pyinfra did not print JSON (rc={run.returncode}):\n{stdout}\n{stderr[-4000:]}")
    assert run.returncode != 0, stderr[-3000:]
    assert {name for op in results["operations"] for name in op["error"]} == {victim}, stderr[-3000:]
    for host in lab.hosts:
        if host["name"] != victim:
            assert verified(lab, host["name"]), f"{host['name']}:\n{stderr[-3000:]}"
    assert "Traceback" not in stdout + stderr

    start(lab, victim, via=lab.hosts[0]["name"])
    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert verified(lab, victim)
    assert_no_relay_left(lab)
    result, results = deploy(lab)
    assert {name for op in results["operations"] for name in op["success"]} == set()


def test_a_seeder_host_reads_the_large_files_from_the_hub_and_the_token_stays_in_memory(lab):
    """weights_source = "seeder": the control machine reads the listing and the small files; the
    chain's first host downloads model.safetensors from the Hub itself, with the token it got
    inside its SSH channel, and the others receive it from that host."""
    set_source = lab.cli("set", "all", "weights_source=seeder")
    assert set_source.returncode == 0, set_source.stdout + set_source.stderr
    try:
        forget_control_cache(lab)
        for host in lab.hosts:
            assert subprocess.run(["docker", "exec", host["container"], "rm", "-rf", MODEL_DIR]).returncode == 0
        hub_control(lab, "POST", "/_lab/stats/reset", {})
        result, results = deploy(lab)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        stats = hub_stats(lab)
        weights = "gpufleet-lab/tiny-llama/model.safetensors"
        size = next(e["size"] for e in json.loads(lab.ssh(lab.hosts[0]["name"], f"cat {MODEL_DIR}/"
                    ".gpufleet-manifest.json").stdout)["files"] if e["path"] == "model.safetensors")
        assert stats["files"][weights] == size, stats["files"]  # one copy, from the Hub
        readers = {entry["client"] for entry in stats["log"] if entry["path"].endswith("/model.safetensors")
                   and entry["method"] == "GET"}
        assert readers and readers <= {h["address"] for h in lab.hosts}, readers
        cache = Path(lab.state["settings"]["weights_cache_dir"])
        assert not list(cache.rglob("model.safetensors")), "the control machine downloaded the weights"
        from_control, between_hosts = ledger(output)
        assert from_control == 0 and between_hosts > 0, (from_control, between_hosts)
        assert all(verified(lab, h["name"]) for h in lab.hosts)
        token = Path(lab.state["settings"]["hf_token_file"]).read_text().strip()
        assert token not in output
        for host in lab.hosts:
            found = subprocess.run(
                ["docker", "exec", "-i", host["container"], "sh", "-c",
                 "grep -rlF -f - /opt/models /tmp /etc /var/log /home 2>/dev/null; true"],
                input=token + "\n", capture_output=True, text=True)
            assert found.stdout.strip() == "", f"the Hub token reached a disk of {host['name']}"
        assert_no_relay_left(lab)
    finally:
        unset = lab.cli("unset", "all", "weights_source")
        assert unset.returncode == 0, unset.stdout + unset.stderr
