"""The Swarm phase against the lab: after the deploy the three hosts are one Swarm (one manager,
as the lab inventory says), every node carries the labels of its simulated GPUs, no join token
shows in pyinfra's output or in a file on the hosts, and a second run changes nothing.

Then the fleet changes as an operator changes it, by editing the inventory (`lab.py set`,
`forget`, `managers`): a 4th host joins with --limit (its weights from a peer, not the control
machine); retiring it (swarm_retire: true) drains it, its task moves to another node, it leaves
and its node is removed, and the next run changes nothing; a host dropped from the inventory but still in the Swarm is reported, not removed; the
managers go to three and back to one.

Runs after test_run.py in a session (the fleet is converged and already one Swarm: two short
deploys); alone, the first deploy does every phase.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

GPU_MODEL = "NVIDIA H100 80GB HBM3"


def deploy(lab):
    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py")
    try:
        payload = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyinfra did not print JSON (rc={result.returncode}):\n{result.stdout}\n"
                    f"{result.stderr}")
    return result, payload["results"]


def manager_json(lab, command):
    result = lab.ssh(lab.hosts[0]["name"], command)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_the_fleet_is_one_swarm_labelled_from_its_gpus(lab):
    result, results = deploy(lab)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not {name for op in results["operations"] for name in op["error"]}
    assert "SWMTKN" not in output, "a join token reached pyinfra's output"

    nodes = manager_json(lab, "sudo docker node ls --format '{{json .}}'")
    assert sorted(n["Hostname"] for n in nodes) == sorted(h["name"] for h in lab.hosts)
    assert all(n["Status"] == "Ready" for n in nodes), nodes
    assert [n["Hostname"] for n in nodes if n["ManagerStatus"]] == [lab.hosts[0]["name"]]

    inspected = manager_json(
        lab, "sudo docker node inspect --format '{{json .}}' $(sudo docker node ls -q)"
    )
    for node in inspected:
        name = node["Description"]["Hostname"]
        labels = node["Spec"]["Labels"]
        assert labels["gpufleet.host"] == name
        assert labels["gpufleet.gpu.count"] == "2", labels
        assert labels["gpufleet.gpu.model"] == GPU_MODEL
        assert labels["gpufleet.gpu.memory-mib"] == "81559"
        assert labels["gpufleet.gpu.driver"].count(".") == 2

    for host in lab.hosts:
        found = lab.ssh(host["name"], "sudo grep -rls SWMTKN /tmp /var/tmp /root /home || true")
        assert found.stdout.strip() == "", f"{host['name']}: a join token was written to disk"


def test_a_second_run_changes_nothing_in_the_swarm(lab):
    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    changed = {op["name"]: op["success"] for op in results["operations"] if op["success"]}
    assert changed == {}


def hosts_changed(results):
    return {name for op in results["operations"] for name in op["success"]}


def monitoring_view(lab):
    """(the Prometheus container's id, the nodes in its node-exporter targets, the nodes whose
    node-exporter it scrapes): onboarding and retiring change the targets, never Prometheus."""
    manager = lab.hosts[0]["name"]
    container = lab.ssh(manager, "sudo docker ps -q --filter "
                                 "label=com.docker.swarm.service.name=gpufleet-monitoring_prometheus")
    targets = lab.ssh(manager, "sudo cat /etc/gpufleet/monitoring/targets/node.json")
    assert container.returncode == 0 and targets.returncode == 0, container.stderr + targets.stderr
    listed = sorted(entry["labels"]["node"] for entry in json.loads(targets.stdout))
    return container.stdout.strip(), listed


def test_a_new_host_joins_with_limit_and_no_other_host_changes(lab):
    up = lab.cli("up", "--hosts", str(len(lab.hosts) + 1), "--no-deploy")
    assert up.returncode == 0, up.stdout + up.stderr
    lab.reload()
    new = lab.hosts[-1]["name"]

    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py", "--limit", new)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(result.stdout)["results"]
    assert hosts_changed(results) == {new}, "a host outside --limit was changed"
    # Its weights came from a host that holds them (outside --limit, untouched: it only served
    # for the length of the transfer), not from the control machine.
    assert "seeds the chain from its verified copy" in result.stderr, result.stderr[-3000:]
    weights = re.search(r"Model weights: hub bytes \d+ .*?; LAN bytes (\d+)[^\n]*; between hosts "
                        r"(\d+)", result.stderr)
    assert weights and weights.group(1) == "0" and int(weights.group(2)) > 0, result.stderr[-3000:]
    # The nightly check of the rest of the fleet is still quiet: nothing moved on it.
    old_hosts = ",".join(h["name"] for h in lab.hosts[:-1])
    drift = subprocess.run([sys.executable, "scripts/drift_check.py", "inventories/lab.py",
                            "--limit", old_hosts], cwd=REPO, env=lab.env,
                           capture_output=True, text=True, timeout=600)
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert f"no drift on {len(lab.hosts) - 1} hosts" in drift.stdout
    nodes = manager_json(lab, "sudo docker node ls --format '{{json .}}'")
    assert {n["Hostname"]: n["Status"] for n in nodes}.get(new) == "Ready"

    # The next full run labels the new node from the manager, adds it to Prometheus' targets
    # (Prometheus itself is not restarted), and changes nothing else.
    prometheus, before = monitoring_view(lab)
    assert new not in before
    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hosts_changed(results) <= {lab.hosts[0]["name"]}
    assert monitoring_view(lab) == (prometheus, sorted([*before, new]))
    labels = manager_json(lab, f"sudo docker node inspect --format '{{{{json .Spec.Labels}}}}' {new}")[0]
    assert labels["gpufleet.gpu.count"] == "2" and labels["gpufleet.host"] == new

    result, results = deploy(lab)
    assert hosts_changed(results) == set()


PROBE = "gpufleet-retire-probe"  # a replicated service with a task on every node


def running_tasks(lab, service):
    """Node of every task of `service` that is running now."""
    result = lab.ssh(lab.hosts[0]["name"], f"sudo docker service ps {service} "
                     "--filter desired-state=running --format '{{.Node}} {{.CurrentState}}'")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    return sorted(row[0] for row in rows if len(row) > 1 and row[1] == "Running")


def wait_for_tasks(lab, service, check, timeout_s=90):
    """Poll (bounded) until check(running nodes) holds; returns the last list seen."""
    deadline = time.monotonic() + timeout_s
    nodes = running_tasks(lab, service)
    while not check(nodes) and time.monotonic() < deadline:
        time.sleep(3)
        nodes = running_tasks(lab, service)
    return nodes


def test_retiring_a_host_drains_it_moves_its_tasks_leaves_and_removes_the_node(lab):
    manager, retiring = lab.hosts[0]["name"], lab.hosts[-1]["name"]
    assert len(lab.hosts) == 4, "runs after the onboarding test (a 4th host in the Swarm)"
    image = lab.state["settings"]["nvidia_container_verify_image"]
    created = lab.ssh(manager, f"sudo docker service create --detach --quiet --name {PROBE} "
                      f"--replicas 4 {image} sleep infinity")
    assert created.returncode == 0, created.stdout + created.stderr
    # Swarm spreads the four replicas over the four idle nodes: one task on the retiring host.
    before = wait_for_tasks(lab, PROBE, lambda nodes: retiring in nodes and len(nodes) == 4)
    assert retiring in before and len(before) == 4, before

    edited = lab.cli("set", retiring, "swarm_retire=true")
    assert edited.returncode == 0, edited.stdout + edited.stderr
    prometheus, targets = monitoring_view(lab)
    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not {name for op in results["operations"] for name in op["error"]}
    assert hosts_changed(results) == {manager, retiring}
    done = {op["name"].split(" | ")[-1] for op in results["operations"] if op["success"]}
    assert {"Drain retiring nodes", "Leave the Swarm (swarm_retire)",
            "Remove retired nodes"} <= done, done

    nodes = manager_json(lab, "sudo docker node ls --format '{{json .}}'")
    assert retiring not in {n["Hostname"] for n in nodes}, "the retired node is still listed"
    # Out of Prometheus' targets too, and Prometheus was not restarted for it.
    assert monitoring_view(lab) == (prometheus, [n for n in targets if n != retiring])
    state = lab.ssh(retiring, "sudo docker info --format '{{.Swarm.LocalNodeState}}'")
    assert state.stdout.strip() == "inactive"
    # Its task moved: four running again, none on the retired host.
    after = wait_for_tasks(lab, PROBE, lambda nodes: len(nodes) == 4)
    assert len(after) == 4 and retiring not in after, after

    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hosts_changed(results) == set(), "a second run after retiring changed something"


def test_a_host_dropped_from_the_inventory_is_reported_and_left_in_the_swarm(lab):
    dropped = lab.hosts[2]["name"]  # a worker, still in the Swarm
    try:
        assert lab.cli("forget", dropped).returncode == 0
        result, results = deploy(lab)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert hosts_changed(results) == set()
        reported = [line for line in output.splitlines()
                    if "Swarm nodes not in the inventory (left alone)" in line]
        assert reported and dropped in reported[0], output
        nodes = manager_json(lab, "sudo docker node ls --format '{{json .}}'")
        assert {n["Hostname"]: n["Status"] for n in nodes}.get(dropped) == "Ready"
    finally:
        assert lab.cli("remember", dropped).returncode == 0
        lab.ssh(lab.hosts[0]["name"], f"sudo docker service rm {PROBE}")

    result, results = deploy(lab)  # back in the inventory: known again, nothing to change
    assert hosts_changed(results) == set()
    assert "Swarm nodes not in the inventory (left alone)" not in result.stdout + result.stderr


def managers_now(lab):
    nodes = manager_json(lab, "sudo docker node ls --format '{{json .}}'")
    return sorted(n["Hostname"] for n in nodes if n["ManagerStatus"]), nodes


def test_managers_go_to_three_and_back_to_one(lab):
    first_three = sorted(h["name"] for h in lab.hosts[:3])
    try:
        assert lab.cli("managers", "3").returncode == 0
        result, results = deploy(lab)
        assert result.returncode == 0, result.stdout + result.stderr
        managers, nodes = managers_now(lab)
        assert managers == first_three
        assert {n["ManagerStatus"] for n in nodes if n["ManagerStatus"]} <= {"Leader", "Reachable"}
        result, results = deploy(lab)
        assert hosts_changed(results) == set()
    finally:
        assert lab.cli("managers", "1").returncode == 0
    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert managers_now(lab)[0] == [lab.hosts[0]["name"]]
    # The gateway (placed on managers) runs on the one manager left: a task Docker kept on a
    # demoted node was stopped by the run, and the run after it changes nothing.
    gateway_nodes = manager_json(lab, "sudo docker service ps gpufleet_gateway "
                                      "--filter desired-state=running --format '{{json .Node}}'")
    assert gateway_nodes == [lab.hosts[0]["name"]], gateway_nodes
    result, results = deploy(lab)
    assert hosts_changed(results) == set(), result.stdout[-3000:]
