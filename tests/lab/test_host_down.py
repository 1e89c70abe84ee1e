"""A run with a host down does not wait for it (issue 20).

With a lab host's container killed (a server that lost power), a deploy and the drift check wait
for nothing: a deploy takes less than a run that changes nothing (measured here on the same lab a
moment before) plus 8 s, shorter than any wait a dead host could cause (a Swarm wait, smoke
retries, pyinfra's default 10 s connect timeout; the lab's is 1 s);
the host is named once, the others converge and change nothing, and no Swarm wait runs out. The
host started again, the next run converges and the one after changes nothing. The same with
three managers and the Swarm leader's host killed.

Runs after test_drift.py (the fleet serves the stack, one manager) and before test_swarm.py,
which changes the Swarm's membership; it leaves the fleet with one manager again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

# Seconds a run with a host down may take beyond a no-change run (see assert_outage_run).
OUTAGE_SLACK_S = 8


def deploy(lab):
    """(exit code, seconds, results, output) of one real deploy."""
    started = time.monotonic()
    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py")
    elapsed = time.monotonic() - started
    try:
        results = json.loads(result.stdout)["results"]
    except json.JSONDecodeError:
        pytest.fail(f"pyinfra did not print JSON (rc={result.returncode}):\n{result.stdout}\n"
                    f"{result.stderr}")
    return result.returncode, elapsed, results, result.stdout + result.stderr


def changed(results):
    return {name for op in results["operations"] for name in op["success"]}


def failed(results):
    return {name for op in results["operations"] for name in op["error"]}


def container(lab, node):
    return next(h["container"] for h in lab.hosts if h["name"] == node)


def wait_until(check, timeout_s=120, what="the lab"):
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout_s}s")
        time.sleep(2)


def swarm_nodes(lab, via):
    listed = lab.ssh(via, "sudo docker node ls --format '{{json .}}'")
    if listed.returncode != 0:
        return []
    return [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]


def services_converged(lab, via) -> bool:
    listed = lab.ssh(via, "sudo docker service ls --format '{{.Replicas}}'")
    counts = [line.split()[0].split("/") for line in listed.stdout.split("\n") if line.strip()]
    # A global service still counts its task on a down node as running (3/2): at least wanted.
    return listed.returncode == 0 and bool(counts) and all(int(a) >= int(b) for a, b in counts)


def kill(lab, node, via):
    """Kill a host's container and wait until the Swarm (seen from `via`) has a leader, reports
    the node down and has moved its tasks: the outage a run meets, settled, not the seconds of
    an election or a rescheduling (which a run rightly waits for)."""
    subprocess.run(["docker", "kill", container(lab, node)], check=True, capture_output=True)

    def noticed():
        nodes = swarm_nodes(lab, via)
        status = {n["Hostname"]: n["Status"] for n in nodes}
        return (status.get(node) == "Down" and any(n["ManagerStatus"] == "Leader" for n in nodes)
                and services_converged(lab, via))

    wait_until(noticed, what=f"{node} down in the Swarm seen from {via}")
    wait_until(lambda: serving_without(lab, node), what=f"every endpoint but {node}'s answering")


def serving_without(lab, down) -> bool:
    """Whether every endpoint on the nodes still up passes the smoke checks from this machine:
    a replica Swarm moved off the dead node has loaded its model, and the gateways route to it
    (they find a new task by DNS and health-check it before sending it requests). Until then a
    run's smoke tests rightly retry: a wait for serving capacity, not for the dead host."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "smoke.json"
        subprocess.run([sys.executable, "scripts/smoke.py", "inventories/lab.py", "--json",
                        str(report), "--deadline", "1"], cwd=REPO, env=lab.env,
                       capture_output=True, text=True, timeout=300)
        if not report.exists():
            return False
        endpoints = json.loads(report.read_text())["endpoints"]
    live = [e for e in endpoints if e["node"] != down]
    return bool(live) and all(c["result"] != "FAIL" or (c["check"] == "tasks" and down in c["detail"])
                              for e in live for c in e["checks"])


def start(lab, node, via):
    subprocess.run(["docker", "start", container(lab, node)], check=True, capture_output=True)

    def back():
        status = {n["Hostname"]: n["Status"] for n in swarm_nodes(lab, via)}
        return status.get(node) == "Ready"

    wait_until(back, what=f"{node} Ready again")


def no_change_seconds(lab) -> float:
    code, elapsed, results, output = deploy(lab)
    assert code == 0 and changed(results) == set(), output
    return elapsed


def assert_outage_run(lab, down: str, baseline: float, acting: str):
    """`acting`: the manager that deploys the stack in this run. When it is not the one that
    did before (the first manager's host is down), it is given the rendered stack files: that
    one operation may change, and nothing else on any host."""
    code, elapsed, results, output = deploy(lab)
    assert code == 1, output  # a host failed: pyinfra's own exit status
    # What a run may rightly spend beyond a no-change one: the dead host's connect timing out
    # (1 s: inventories/lab.py) and a live engine's own health retries (up to 3.5 s of back-off
    # when it is briefly busy). What this guards against is each longer: a Swarm wait, smoke
    # retries against the dead host's endpoints, pyinfra's default 10 s connect timeout.
    assert elapsed < baseline + OUTAGE_SLACK_S, (
        f"the run with {down} down took {elapsed:.1f}s, a no-change run {baseline:.1f}s:\n{output}")
    assert output.count(f"[{down}] Could not connect") == 1, output
    reported = [line for line in output.splitlines() if f"Swarm node {down} is down" in line]
    assert len(reported) == 1 and "could not be reached in this run" in reported[0], output
    assert "waiting for Swarm nodes" not in output, output
    # The others converge, and nothing about them changes because one node is gone (the stack
    # is rendered for every active node, so the gateway is not rolled).
    assert failed(results) == set(), output
    changes = {(op["name"], name) for op in results["operations"] for name in op["success"]}
    if acting == lab.hosts[0]["name"]:
        assert changes == set(), output
    else:
        assert changes <= {("Inference stack | Deploy the inference stack", acting)}, output
    assert "stack: " not in output, output  # no service differs: nothing was redeployed
    assert "smoke passed" in output, output

    drift_started = time.monotonic()
    drift = subprocess.run([sys.executable, "scripts/drift_check.py", "inventories/lab.py"],
                           cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=600)
    drift_s = time.monotonic() - drift_started
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert f"check failed: {down} (unreachable)" in drift.stdout, drift.stdout
    assert drift_s <= 2 * baseline + 2, f"drift check {drift_s:.1f}s vs {baseline:.1f}s"


def assert_recovers(lab):
    code, _, results, output = deploy(lab)
    assert code == 0 and failed(results) == set(), output
    code, _, results, output = deploy(lab)
    assert code == 0 and changed(results) == set(), output


def outage(lab, down: str, via: str):
    """A no-change run timed, `down`'s host killed (the Swarm seen from `via`, which also deploys
    the stack meanwhile), the run with it down checked, the host started, the fleet recovered."""
    baseline = no_change_seconds(lab)
    kill(lab, down, via=via)
    try:
        assert_outage_run(lab, down, baseline, acting=via)
    finally:
        start(lab, down, via=via)
    assert_recovers(lab)


def idle_worker(lab) -> str:
    """A worker that runs no engine task (the lab serves 2 replicas on 3 nodes), the last one if
    each runs one. Losing a node with a task makes Swarm start that replica elsewhere, and the
    run's smoke tests rightly wait for it to load: a wait for the serving capacity, not for the
    dead host, which is what this test is about. Where the replicas are depends on what ran
    before (tests/lab/test_engines.py moves them)."""
    listed = lab.ssh(lab.hosts[0]["name"],
                     "sudo docker service ps gpufleet_tiny-llama --filter desired-state=running "
                     "--format '{{.Node}}'")
    busy = set(listed.stdout.split())
    workers = [h["name"] for h in lab.hosts[1:]]
    return next((w for w in reversed(workers) if w not in busy), workers[-1])


def test_a_worker_host_down_costs_a_run_no_wait(lab):
    code, _, _, output = deploy(lab)  # converged (alone, this is the fleet's first deploy)
    assert code == 0, output
    outage(lab, down=idle_worker(lab), via=lab.hosts[0]["name"])


def test_the_leaders_host_down_with_three_managers_costs_a_run_no_wait(lab):
    leader, other = lab.hosts[0]["name"], lab.hosts[1]["name"]
    assert lab.cli("managers", "3").returncode == 0
    try:
        code, _, _, output = deploy(lab)  # promotes node-2 and node-3
        assert code == 0, output
        outage(lab, down=leader, via=other)
    finally:
        assert lab.cli("managers", "1").returncode == 0
    code, _, _, output = deploy(lab)
    assert code == 0, output
    managers = [n["Hostname"] for n in swarm_nodes(lab, leader) if n["ManagerStatus"]]
    assert managers == [leader]
