"""The Swarm phase against the lab: after the deploy the three hosts are one Swarm (one manager,
as the lab inventory says), every node carries the labels of its simulated GPUs, no join token
shows in pyinfra's output or in a file on the hosts, and a second run changes nothing.

Runs after test_run.py in a session (the fleet is converged and already one Swarm: two short
deploys); alone, the first deploy does every phase.
"""

import json

import pytest

pytestmark = pytest.mark.lab

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


def test_a_new_host_joins_with_limit_and_no_other_host_changes(lab):
    up = lab.cli("up", "--hosts", str(len(lab.hosts) + 1), "--no-deploy")
    assert up.returncode == 0, up.stdout + up.stderr
    lab.reload()
    new = lab.hosts[-1]["name"]

    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py", "--limit", new)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(result.stdout)["results"]
    assert hosts_changed(results) == {new}, "a host outside --limit was changed"
    nodes = manager_json(lab, "sudo docker node ls --format '{{json .}}'")
    assert {n["Hostname"]: n["Status"] for n in nodes}.get(new) == "Ready"

    # The next full run labels the new node from the manager, and changes nothing else.
    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hosts_changed(results) <= {lab.hosts[0]["name"]}
    labels = manager_json(lab, f"sudo docker node inspect --format '{{{{json .Spec.Labels}}}}' {new}")[0]
    assert labels["gpufleet.gpu.count"] == "2" and labels["gpufleet.host"] == new

    result, results = deploy(lab)
    assert hosts_changed(results) == set()
