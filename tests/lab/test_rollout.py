"""Rolling maintenance (scripts/rollout.py) against the CI lab, under load through the gateway.

A new host joins at the older versions (its host data: driver 580.82.07, toolkit 1.19.0-1, Docker
26.1.5 from the stand-ins), with an engine task moved onto it; then its data goes back to the
defaults (580.95.05, 1.19.1-1, 28.5.2), as an operator's change would. A rollout finds that host alone;
it loses its GPUs at the reboot (a lab fault: scripts/lab/gpu_faults.py): the rollout stops with it drained, exit 1, the fleet serving.
GPUs back, the rollout again resumes it: upgraded, rebooted, verified, active. No request of the
load fails; the deploys after change nothing. The whole story on 4 hosts with every host upgraded
is `scripts/rollout_bench.py` (docs/benchmarks/rollout.md).

Runs after test_swarm.py (three hosts serving, the fourth retired), last.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest

from scripts.lab.gpu_faults import PULL_GPUS_AT_BOOT, RETURN_GPUS
from tests.lab.conftest import REPO

pytestmark = pytest.mark.lab

FROM_DATA = ["nvidia_driver_version=580.82.07", "nvidia_container_toolkit_version=1.19.0-1",
             "docker_version=26.1.5"]
ENGINE = "gpufleet_tiny-llama"


def deploy(lab, *args):
    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py", *args)
    return result, json.loads(result.stdout)["results"] if result.stdout.strip().startswith("{") else None


def changed_hosts(results):
    return {name for op in results["operations"] for name in op["success"]}


def rollout(lab, out, *args):
    done = subprocess.run([sys.executable, "scripts/rollout.py", "inventories/lab.py", "--out",
                           str(out), *args], cwd=REPO, env=lab.env, capture_output=True, text=True,
                          timeout=1200)
    return done, json.loads((out / "rollout.json").read_text())


def engine_nodes(lab):
    done = lab.ssh(lab.hosts[0]["name"], f"sudo docker service ps {ENGINE} --filter "
                   "desired-state=running --format '{{.Node}} {{.CurrentState}}'")
    return sorted(line.split()[0] for line in done.stdout.splitlines() if " Running" in line)


def move_a_replica_to(lab, new):
    """Drain a node with an engine task until the task runs on `new` (the only free one left),
    then set it active again: the new host serves, as any host a rollout meets."""
    nodes = engine_nodes(lab)
    victim = next((n for n in reversed(nodes) if n != lab.hosts[0]["name"]), nodes[-1])  # a worker
    listed = lab.ssh(lab.hosts[0]["name"], "sudo docker node ls --format '{{.Hostname}}'")
    others = [name for name in listed.stdout.split() if name not in nodes and name != new]
    for name in others:  # every other free node out for a moment: the task can only go to `new`
        lab.ssh(lab.hosts[0]["name"], f"sudo docker node update --availability pause {name}")
    try:
        lab.ssh(lab.hosts[0]["name"], f"sudo docker node update --availability drain {victim}")
        deadline = time.monotonic() + 180
        while new not in engine_nodes(lab) or len(engine_nodes(lab)) < 2:
            assert time.monotonic() < deadline, f"no engine task moved to {new}: {engine_nodes(lab)}"
            time.sleep(3)
    finally:
        for name in [victim, *others]:
            lab.ssh(lab.hosts[0]["name"], f"sudo docker node update --availability active {name}")


def test_a_rollout_stops_at_a_host_that_fails_then_resumes_it_under_load(lab, tmp_path):
    from scripts.drill.lab import DrillLab
    from scripts.drill.load import BackgroundLoad

    up = lab.cli("up", "--hosts", str(len(lab.hosts) + 1), "--no-deploy")
    assert up.returncode == 0, up.stdout + up.stderr
    lab.reload()
    new = lab.hosts[-1]["name"]
    # The new host's own data pins the older versions: it joins at them, labelled, in the gateway.
    assert lab.cli("set", new, *FROM_DATA).returncode == 0
    result, _ = deploy(lab)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    move_a_replica_to(lab, new)
    # The operator's change: the defaults (580.95.05, 1.19.1-1, 28.5.2) for that host too.
    assert lab.cli("unset", new, *[d.split("=")[0] for d in FROM_DATA]).returncode == 0

    drill = DrillLab(lab.name)
    waited, why = drill.wait_healthy(180)
    assert waited is not None, why
    _, stack = drill.stack()
    load = BackgroundLoad(drill.gateways(stack), drill.key, drill.verify, max_seconds=900).start()
    try:
        time.sleep(3)
        planned = subprocess.run([sys.executable, "scripts/rollout.py", "inventories/lab.py", "--plan"],
                                 cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=600)
        assert planned.returncode == 0 and f"plan: {new}\n" in planned.stdout, planned.stdout + planned.stderr

        fault = lab.ssh(new, f"sudo sh -c {shlex.quote(PULL_GPUS_AT_BOOT)}")  # gone at the reboot
        assert fault.returncode == 0, fault.stdout + fault.stderr
        done, record = rollout(lab, tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 1, output
        assert record["result"] == "stopped" and list(record["hosts"]) == [new], output
        host = record["hosts"][new]
        assert host["status"] == "failed" and host["deploy_exit"] != 0, output
        nodes = {n["Hostname"]: n for n in map(json.loads, lab.ssh(
            lab.hosts[0]["name"], "sudo docker node ls --format '{{json .}}'").stdout.splitlines())}
        assert nodes[new]["Availability"] == "Drain", nodes[new]
        assert new not in engine_nodes(lab) and len(engine_nodes(lab)) == 2

        back = lab.ssh(new, f"sudo sh -c {shlex.quote(RETURN_GPUS)}")
        assert back.returncode == 0, back.stdout + back.stderr
        done, record = rollout(lab, tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "resuming: " + new in output, output
        host = record["hosts"][new]
        assert host["status"] == "done" and host["rebooted"], output
        assert host["after"]["driver"] == "580.95.05" and host["after"]["docker"].startswith("28.5.2"), host
        assert host["after"]["toolkit"] == "1.19.1-1", host
        time.sleep(3)
    finally:
        requests = load.stop()
    failed = [r.record for r in requests if not r.record.ok]
    assert len(requests) > 100 and failed == [], failed[:5]

    done, record = rollout(lab, tmp_path)  # everything done: nothing to do
    assert done.returncode == 0 and record["result"] == "nothing to do", done.stdout
    result, results = deploy(lab)
    assert result.returncode == 0 and changed_hosts(results) == set(), result.stdout[-3000:]
