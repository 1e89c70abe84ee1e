"""The lab hosts look like fresh servers, and the lab CLI keeps its promises.

Read-only checks on fresh hosts: this module runs before test_run.py (pytest runs files in
alphabetical order), which expects hosts the deploy has never touched."""

import json
import subprocess

import pytest

pytestmark = pytest.mark.lab


def test_status_json_has_the_documented_shape(lab):
    result = lab.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["lab"] == lab.name
    assert [h["name"] for h in status["hosts"]] == ["node-1", "node-2", "node-3"]
    for host in status["hosts"]:
        assert set(host) >= {"name", "container", "address", "state"}
        assert host["state"] == "running"
    # An endpoint only where a gateway answers (earlier test files may have deployed the stack).
    gateway = f"http://{status['hosts'][0]['address']}:8080"
    answers = subprocess.run(["curl", "-s", "-o", "/dev/null", "-m", "3", f"{gateway}/health"]).returncode == 0
    assert status.get("endpoint") == (gateway if answers else None)


def test_up_again_reuses_the_same_hosts(lab):
    before = {h["container"]: _container_id(h["container"]) for h in lab.hosts}
    result = lab.cli("up", "--hosts", "3", "--no-deploy")
    assert result.returncode == 0, result.stderr
    assert "creating" not in result.stdout
    assert {c: _container_id(c) for c in before} == before


def test_hosts_are_reached_over_ssh_as_a_sudo_user(lab):
    for host in lab.hosts:
        result = lab.ssh(host["name"], "id -un; hostname; sudo -n true && echo sudo-ok")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["ops", host["name"], "sudo-ok"]


def test_hosts_boot_systemd_with_their_own_identity(lab):
    machine_ids, host_keys = set(), set()
    for host in lab.hosts:
        result = lab.ssh(
            host["name"],
            "ps -p 1 -o comm=; systemctl is-system-running; cat /etc/machine-id; "
            "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub",
        )
        pid1, system_state, machine_id, host_key = result.stdout.splitlines()
        assert pid1 == "systemd"
        assert system_state == "running"
        machine_ids.add(machine_id)
        host_keys.add(host_key.split()[1])
    assert len(machine_ids) == len(lab.hosts), "hosts share a machine-id"
    assert len(host_keys) == len(lab.hosts), "hosts share an SSH host key"


def test_fresh_hosts_have_nothing_the_deploy_installs(lab):
    for host in lab.hosts:
        result = lab.ssh(
            host["name"],
            "for c in docker dockerd nvidia-smi python3 curl gpg; do command -v $c; done; true",
        )
        assert result.stdout.strip() == "", f"{host['name']} already has: {result.stdout}"


def test_pyinfra_reaches_every_host_through_the_lab_inventory(lab):
    """The hand-off to the deploy: inventories/lab.py, the lab key, strict host key checking
    against the keys the lab recorded, sudo. Runs a read-only command, installs nothing."""
    result = lab.pyinfra("-y", "inventories/lab.py", "exec", "--", "id -un")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for host in lab.hosts:
        assert f"[{host['name']}] root" in output, output


def test_the_deploy_users_key_is_its_own(lab):
    for host in lab.hosts:
        result = lab.ssh(host["name"], "stat -c '%U %a' ~/.ssh/authorized_keys")
        assert result.stdout.split() == ["ops", "600"], result.stdout + result.stderr


def test_up_refuses_hosts_its_lost_key_made_in_one_line_and_touches_nothing(lab, tmp_path):
    """The lab's state directory lost its key (removed by hand, another checkout): `up` makes a
    new one, which the existing hosts do not admit. It says so, instead of waiting on SSH."""
    from pathlib import Path

    state = Path(__file__).resolve().parents[2] / ".lab" / lab.name
    kept = {name: (state / name).read_bytes() for name in ("id_ed25519", "id_ed25519.pub")}
    before = {h["container"]: _container_id(h["container"]) for h in lab.hosts}
    try:
        for name in kept:
            (state / name).unlink()
        result = lab.cli("up", "--hosts", "3", "--no-deploy")
    finally:
        for name, content in kept.items():
            (state / name).write_bytes(content)
            (state / name).chmod(0o600 if name == "id_ed25519" else 0o644)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "gpulab" in line and "node-1" in line and "another SSH key" in line
    assert f"--name {lab.name} down" in line
    assert {c: _container_id(c) for c in before} == before
    assert lab.ssh("node-1", "true").returncode == 0  # the kept key still reaches them


def test_ssh_to_an_unknown_node_is_a_clear_error(lab):
    result = lab.cli("ssh", "node-9", "true")
    assert result.returncode == 1
    assert "no host node-9" in result.stderr and "node-1" in result.stderr


def _container_id(name):
    import subprocess

    return subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True,
                          text=True).stdout.strip()
