"""The whole run against fresh lab hosts: a failing host is left alone, the fleet converges, and
a second run changes nothing on any host.

The tests in this module share one lab and run in order: each builds on the state the previous
one left (a fresh fleet -> a converged fleet -> a hand-edited host -> repaired)."""

import json
import subprocess

import pytest

pytestmark = pytest.mark.lab


def deploy(lab, *extra):
    """Run the real deploy with machine-readable results."""
    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py", *extra)
    try:
        payload = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyinfra did not print JSON (rc={result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result, payload["results"]


def hosts_changed(results):
    return {name for op in results["operations"] for name in op["success"]}


def hosts_failed(results):
    return {name for op in results["operations"] for name in op["error"]}


def changes_by_operation(results):
    return {op["name"]: op["success"] for op in results["operations"] if op["success"]}


def reboots(lab, node):
    """How many times a lab host has rebooted: a reboot is a restart of its container."""
    container = next(h["container"] for h in lab.hosts if h["name"] == node)
    result = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", container],
                            capture_output=True, text=True)
    return int(result.stdout.strip())


def root_exec(lab, node, command):
    """Act as someone with console access to the host (not through the deploy's SSH user)."""
    container = next(h["container"] for h in lab.hosts if h["name"] == node)
    return subprocess.run(
        ["docker", "exec", container, "sh", "-c", command], capture_output=True, text=True
    )


def test_a_host_failing_preflight_is_reported_and_left_untouched(lab):
    names = [h["name"] for h in lab.hosts]
    broken, healthy = names[-1], names[:-1]
    # A host whose deploy user lost passwordless sudo: preflight must refuse it.
    assert root_exec(lab, broken, "mv /etc/sudoers.d/ops /root/ops.sudoers").returncode == 0
    try:
        result, results = deploy(lab)
    finally:
        assert root_exec(lab, broken, "mv /root/ops.sudoers /etc/sudoers.d/ops").returncode == 0

    assert result.returncode != 0
    assert hosts_failed(results) == {broken}
    output = result.stdout + result.stderr
    assert f"[{broken}] preflight failed: sudo needs a password" in output
    assert broken not in hosts_changed(results), "a host that failed preflight was changed"
    assert set(healthy) <= hosts_changed(results)
    assert root_exec(lab, broken, "command -v dockerd nvidia-smi").stdout == ""
    assert reboots(lab, broken) == 0
    for node in healthy:
        assert lab.ssh(node, "sudo docker info --format '{{.ServerVersion}}'").returncode == 0


def test_a_rerun_converges_the_fleet_with_gpus_in_docker(lab):
    result, results = deploy(lab)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hosts_failed(results) == set()
    for host in lab.hosts:
        node = host["name"]
        # The driver was installed and loaded by exactly one reboot of each host.
        assert reboots(lab, node) == 1
        uuids = lab.ssh(node, "nvidia-smi --query-gpu=uuid --format=csv,noheader").stdout.split()
        assert len(uuids) == 2, f"{node}: the simulated GPUs are not visible: {uuids}"
        info = json.loads(lab.ssh(node, "sudo docker info --format '{{json .}}'").stdout)
        assert info["LoggingDriver"] == "json-file"
        assert info["DefaultRuntime"] == "nvidia"
        assert "nvidia" in info["Runtimes"]
        advertised = sorted(r["NamedResourceSpec"]["Value"] for r in info["GenericResources"]
                            if r["NamedResourceSpec"]["Kind"] == "NVIDIA-GPU")
        assert advertised == sorted(uuids)
        config = lab.ssh(node, "grep '^swarm-resource' /etc/nvidia-container-runtime/config.toml")
        assert config.stdout.strip() == 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"'
        held = lab.ssh(node, "apt-mark showhold").stdout.split()
        assert {"nvidia-driver-cuda", "nvidia-container-toolkit"} <= set(held)


def test_a_second_run_changes_nothing_on_any_host(lab):
    result, results = deploy(lab)
    assert result.returncode == 0, result.stderr
    assert changes_by_operation(results) == {}
    assert results["totals"]["success"] == 0 and results["totals"]["error"] == 0
    assert [reboots(lab, host["name"]) for host in lab.hosts] == [1] * len(lab.hosts)


def test_a_hand_edited_daemon_json_is_repaired_and_the_operators_keys_kept(lab):
    node = lab.hosts[0]["name"]
    # An operator adds a key of their own and changes a managed one.
    edit = (
        "sed -i 's/\"max-file\": \"[0-9]*\"/\"max-file\": \"99\"/; "
        "s/^{/{\\n  \"debug\": true,/' /etc/docker/daemon.json"
    )
    assert root_exec(lab, node, edit).returncode == 0
    edited = json.loads(root_exec(lab, node, "cat /etc/docker/daemon.json").stdout)
    assert edited["debug"] is True and edited["log-opts"]["max-file"] == "99"

    result, results = deploy(lab)
    assert result.returncode == 0, result.stderr
    assert hosts_changed(results) == {node}
    repaired = json.loads(root_exec(lab, node, "cat /etc/docker/daemon.json").stdout)
    assert repaired["debug"] is True, "the operator's own key was lost"
    assert repaired["log-opts"]["max-file"] != "99"
    assert lab.ssh(node, "sudo docker info --format '{{.Debug}}'").stdout.strip() == "true"

    result, results = deploy(lab)
    assert changes_by_operation(results) == {}
