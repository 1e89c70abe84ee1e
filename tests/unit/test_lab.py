"""The lab's pure pieces: addresses, names, recipe hashes, the inventory it feeds."""

import ipaddress
import json
import runpy
import sys

import pytest

from scripts.lab import fleet, host_edits, images


def test_replicas_are_capped_at_the_lab_host_count_only_when_they_do_not_fit():
    models = [{"name": "tiny-llama", "replicas": 2}, {"name": "other"}]
    assert fleet.capped_replicas(models, 3) == [{"name": "tiny-llama", "replicas": 2},
                                                {"name": "other", "replicas": 1}]
    assert fleet.capped_replicas(models, 1) == [{"name": "tiny-llama", "replicas": 1},
                                                {"name": "other", "replicas": 1}]
    assert fleet.capped_replicas(models, 0)[0]["replicas"] == 1  # every host forgotten


def test_subnets_are_stable_per_lab_and_inside_the_lab_range():
    assert fleet.subnet_for("gpulab") == fleet.subnet_for("gpulab")
    for name in ("gpulab", "gpulab-test", "gpulab-ci", "x"):
        subnet = fleet.subnet_for(name)
        assert subnet.prefixlen == 24
        assert subnet.subnet_of(ipaddress.ip_network("172.29.0.0/16"))


def test_a_taken_subnet_is_skipped_deterministically():
    preferred = fleet.subnet_for("gpulab")
    other = fleet.subnet_for("gpulab", taken=(preferred,))
    assert other != preferred
    assert fleet.subnet_for("gpulab", taken=(preferred,)) == other
    wide = ipaddress.ip_network("172.29.0.0/17")  # a network that overlaps half the range
    assert not fleet.subnet_for("gpulab", taken=(wide,)).overlaps(wide)


def test_hosts_get_fixed_addresses_after_the_service_range():
    subnet = fleet.subnet_for("gpulab")
    hosts = fleet.planned_hosts("gpulab", subnet, 3)
    assert [h.name for h in hosts] == ["node-1", "node-2", "node-3"]
    assert [h.container for h in hosts] == ["gpulab-node-1", "gpulab-node-2", "gpulab-node-3"]
    assert [int(h.address.split(".")[-1]) for h in hosts] == [11, 12, 13]
    assert all(ipaddress.ip_address(h.address) in subnet for h in hosts)
    assert fleet.service_address(subnet, 2).endswith(".2")


def test_recipe_hash_changes_with_the_recipe(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM base\n")
    first = images.recipe_hash(tmp_path)
    assert images.recipe_hash(tmp_path) == first
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN true\n")
    assert images.recipe_hash(tmp_path) != first
    assert images.recipe_hash(tmp_path, extra="other base") != images.recipe_hash(tmp_path)


def test_the_lab_inventory_maps_hosts_json_to_pyinfra_hosts(tmp_path, monkeypatch):
    lab_dir = fleet.REPO_ROOT / ".lab" / "unit-inventory-test"
    lab_dir.mkdir(parents=True, exist_ok=True)
    try:
        (lab_dir / "hosts.json").write_text(json.dumps({
            "lab": "unit-inventory-test", "ssh_user": "ops", "ssh_key": "/k", "known_hosts": "/kh",
            "hosts": [{"name": "node-1", "container": "c1", "address": "172.29.9.11"},
                      {"name": "node-2", "container": "c2", "address": "172.29.9.12"}],
        }))
        monkeypatch.setenv("LAB_NAME", "unit-inventory-test")
        inventory = runpy.run_path(str(fleet.REPO_ROOT / "inventories" / "lab.py"))
    finally:
        (lab_dir / "hosts.json").unlink()
        lab_dir.rmdir()
    assert [name for name, _ in inventory["gpu_nodes"]] == ["node-1", "node-2"]
    assert inventory["swarm_managers"] == ["node-1"]
    data = dict(inventory["gpu_nodes"])["node-2"]
    assert data["ssh_hostname"] == "172.29.9.12"
    assert data["ssh_strict_host_key_checking"] == "yes"
    assert data["ssh_known_hosts_file"] == "/kh"


def test_the_lab_inventory_says_how_to_start_a_lab_that_is_not_up(monkeypatch):
    monkeypatch.setenv("LAB_NAME", "no-such-lab")
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(fleet.REPO_ROOT / "inventories" / "lab.py"))
    assert str(stopped.value) == "lab no-such-lab is not up: run `python3 scripts/lab.py up` first"


def test_recipe_hash_sees_files_in_subdirectories_and_their_place(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "unit.service").write_text("[Unit]\n")
    first = images.recipe_hash(tmp_path)
    (tmp_path / "files" / "unit.service").rename(tmp_path / "unit.service")
    assert images.recipe_hash(tmp_path) != first, "a file moved in the recipe must rebuild"


def test_the_mirror_comes_from_this_machines_apt_sources():
    deb822 = (
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
    )
    assert images.mirror_from_sources([deb822]) == "http://deb.debian.org/debian"
    one_line = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64] http://mirror.example.org/debian/ bookworm main\n"
    )
    assert images.mirror_from_sources(["", one_line]) == "http://mirror.example.org/debian"
    security_only = "deb http://security.debian.org/debian-security bookworm-security main\n"
    assert images.mirror_from_sources([security_only]) is None


def test_the_image_apt_sources_use_the_same_mirror():
    text = images.apt_sources_list("http://mirror.example.org/debian")
    assert text.splitlines() == [
        "deb http://mirror.example.org/debian bookworm main",
        "deb http://mirror.example.org/debian bookworm-updates main",
    ]


def test_the_status_table_shows_every_host_and_whether_ssh_answers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lab_cli", fleet.REPO_ROOT / "scripts" / "lab.py")
    lab_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab_cli)
    hosts = [
        {"name": "node-1", "container": "gpulab-node-1", "address": "172.29.9.11", "state": "running"},
        {"name": "node-2", "container": "gpulab-node-2", "address": "172.29.9.12", "state": "exited"},
    ]
    lines = lab_cli.status_table(hosts, [True, False]).splitlines()
    assert lines[0].split() == ["name", "container", "address", "state", "ssh"]
    assert lines[1].split() == ["node-1", "gpulab-node-1", "172.29.9.11", "running", "ok"]
    assert lines[2].split() == ["node-2", "gpulab-node-2", "172.29.9.12", "exited", "NO"]
    assert len({line.index("172.29") for line in lines[1:]}) == 1, "columns are aligned"


def test_the_host_count_is_the_highest_node_number_of_this_lab():
    names = ["gpulab-node-1", "gpulab-node-3", "gpulab-test-node-7", "gpulab-node-x"]
    assert fleet.host_count_from_names("gpulab", names) == 3  # node-2 was removed: up recreates it
    assert fleet.host_count_from_names("gpulab-test", names) == 7
    assert fleet.host_count_from_names("other", names) == 0


def test_lab_names_must_make_valid_docker_and_file_names(monkeypatch):
    monkeypatch.delenv("LAB_NAME", raising=False)
    assert fleet.lab_name() == "gpulab"
    monkeypatch.setenv("LAB_NAME", "gpulab-ci")
    assert fleet.lab_name() == "gpulab-ci"
    assert fleet.lab_name("mine") == "mine"
    for bad in ("../etc", "Has Space", "-dash", "a" * 41):
        with pytest.raises(fleet.LabError, match="lab name"):
            fleet.lab_name(bad)


def test_a_scanned_host_key_is_recorded_only_if_it_is_the_one_on_the_hosts_disk():
    scanned = "# 172.29.9.11:22 SSH-2.0-OpenSSH_9.2p1\n172.29.9.11 ssh-ed25519 AAAAkey1\n"
    on_disk = "ssh-ed25519 AAAAkey1 root@node-1\n"
    assert fleet.known_hosts_line("172.29.9.11", scanned, on_disk) == "172.29.9.11 ssh-ed25519 AAAAkey1"
    with pytest.raises(fleet.LabError, match="not the one on the host's disk"):
        fleet.known_hosts_line("172.29.9.11", scanned, "ssh-ed25519 AAAAother root@node-1")
    with pytest.raises(fleet.LabError, match="not the one on the host's disk"):
        fleet.known_hosts_line("172.29.9.12", scanned, on_disk)  # another address answered
    with pytest.raises(fleet.LabError, match="got no ed25519 host key"):
        fleet.known_hosts_line("172.29.9.11", "", on_disk)


def test_routes_of_this_machine_count_as_taken_subnets():
    proc_net_route = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        "wg0\t00001DAC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    )
    routes = fleet.routed_subnets(proc_net_route)
    assert routes == [("docker0", ipaddress.ip_network("172.17.0.0/16")),
                      ("wg0", ipaddress.ip_network("172.29.0.0/16"))]  # the default route is not
    with pytest.raises(fleet.LabError, match="no free /24"):
        fleet.subnet_for("gpulab", taken=tuple(net for _, net in routes))


def _lab_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lab_cli", fleet.REPO_ROOT / "scripts" / "lab.py")
    lab_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab_cli)
    return lab_cli


def test_bootstrap_sees_a_venv_that_drifted_from_the_pins():
    lab_cli = _lab_cli()
    pins = ["pyinfra==3.10.0", "PyYAML==6.0.3", "huggingface_hub==2.4.0"]
    exact = {"pyinfra": "3.10.0", "pyyaml": "6.0.3", "huggingface-hub": "2.4.0"}
    assert lab_cli.pin_mismatches(pins, exact) == []
    drifted = {**exact, "pyinfra": "3.9.0"}
    del drifted["pyyaml"]
    assert lab_cli.pin_mismatches(pins, drifted) == [
        "pyinfra: 3.9.0 installed, 3.10.0 pinned",
        "PyYAML: not installed, 6.0.3 pinned",
    ]
    assert lab_cli.pin_mismatches(pins, {}) != []  # no .venv yet: everything is installed
    with pytest.raises(lab_cli.LabError, match="not pinned"):
        lab_cli.pin_mismatches(["pyinfra>=3"], exact)


def test_the_pins_bootstrap_installs_are_pyprojects_and_all_exact():
    lab_cli = _lab_cli()
    pins = lab_cli.pinned_requirements()
    assert "pyinfra==3.10.0" in pins and any(p.startswith("pytest==") for p in pins)
    assert all("==" in pin for pin in pins)


# --- Operator edits of the lab inventory --------------------------------------------------


def _state():
    return {
        "lab": "unit-edits", "ssh_user": "ops", "ssh_key": "/k", "known_hosts": "/kh",
        "hosts": [{"name": f"node-{i}", "container": f"c{i}", "address": f"172.29.9.{10 + i}"}
                  for i in (1, 2, 3, 4)],
    }


def test_assignments_are_json_when_they_parse_else_strings():
    assert host_edits.parse_assignment("swarm_retire=true") == ("swarm_retire", True)
    assert host_edits.parse_assignment("swarm_drain_timeout_s=30") == ("swarm_drain_timeout_s", 30)
    assert host_edits.parse_assignment('swarm_node_labels={"rack": "a1"}') == (
        "swarm_node_labels", {"rack": "a1"})
    assert host_edits.parse_assignment("models_dir=/data/models") == ("models_dir", "/data/models")
    for bad in ("swarm_retire", "Bad=1", "=1", "ssh_port=22", "lab_container=x"):
        with pytest.raises(fleet.LabError):
            host_edits.parse_assignment(bad)


def test_set_and_unset_edit_one_hosts_data():
    state = host_edits.set_host_data(_state(), "node-4", ["swarm_retire=true", "models_dir=/m"])
    assert state["hosts"][3]["data"] == {"swarm_retire": True, "models_dir": "/m"}
    assert "data" not in state["hosts"][0]
    state = host_edits.unset_host_data(state, "node-4", ["models_dir"])
    assert state["hosts"][3]["data"] == {"swarm_retire": True}
    state = host_edits.unset_host_data(state, "node-4", ["swarm_retire"])
    assert "data" not in state["hosts"][3]
    with pytest.raises(fleet.LabError, match="no data key"):
        host_edits.unset_host_data(state, "node-4", ["swarm_retire"])
    with pytest.raises(fleet.LabError, match="no host node-9"):
        host_edits.set_host_data(state, "node-9", ["swarm_retire=true"])


def test_set_edits_several_hosts_or_all_in_one_edit():
    """A key the stack reads fleet-wide must change everywhere at once: the inventory refuses
    an edit that leaves hosts disagreeing (scripts/lab.py validates every edit)."""
    state = host_edits.set_host_data(_state(), "node-1,node-3", ["models_dir=/m"])
    assert [h.get("data") for h in state["hosts"]] == [{"models_dir": "/m"}, None,
                                                       {"models_dir": "/m"}, None]
    state = host_edits.set_host_data(state, "all", ["models_dir=/n"])
    assert {h["data"]["models_dir"] for h in state["hosts"]} == {"/n"}
    with pytest.raises(fleet.LabError, match="no host node-9"):
        host_edits.set_host_data(_state(), "node-1,node-9", ["models_dir=/m"])
    state = host_edits.unset_host_data(state, "all", ["models_dir"])
    assert all("data" not in h for h in state["hosts"])
    with pytest.raises(fleet.LabError, match="node-1 has no data key models_dir"):
        host_edits.unset_host_data(state, "all", ["models_dir"])


def test_manager_count_is_bounded_by_the_listed_hosts():
    state = host_edits.set_forgotten(_state(), "node-4", True)
    assert host_edits.set_manager_count(state, 3)["swarm_managers"] == 3
    with pytest.raises(fleet.LabError):
        host_edits.set_manager_count(state, 4)  # node-4 is forgotten: 3 listed
    with pytest.raises(fleet.LabError):
        host_edits.set_manager_count(state, 0)


def test_up_keeps_the_operators_edits():
    old = host_edits.set_forgotten(host_edits.set_host_data(_state(), "node-2", ["swarm_retire=true"]),
                              "node-3", True)
    old["swarm_managers"] = 3
    new = {**_state(), "hosts": _state()["hosts"] + [
        {"name": "node-5", "container": "c5", "address": "172.29.9.15"}]}
    kept = fleet.keep_operator_edits(new, old)
    assert kept["hosts"][1]["data"] == {"swarm_retire": True}
    assert kept["hosts"][2]["forgotten"] is True
    assert kept["swarm_managers"] == 3
    assert "data" not in kept["hosts"][4] and len(kept["hosts"]) == 5
    assert fleet.keep_operator_edits(_state(), None) == _state()


def _lab_inventory(state, monkeypatch):
    lab_dir = fleet.REPO_ROOT / ".lab" / "unit-edits"
    lab_dir.mkdir(parents=True, exist_ok=True)
    try:
        (lab_dir / "hosts.json").write_text(json.dumps(state))
        monkeypatch.setenv("LAB_NAME", "unit-edits")
        return runpy.run_path(str(fleet.REPO_ROOT / "inventories" / "lab.py"))
    finally:
        (lab_dir / "hosts.json").unlink()
        lab_dir.rmdir()


def test_the_lab_inventory_applies_host_data_and_leaves_forgotten_hosts_out(monkeypatch):
    state = host_edits.set_host_data(_state(), "node-4", ["swarm_retire=true"])
    state = host_edits.set_forgotten(state, "node-2", True)
    state["settings"] = {"swarm_drain_timeout_s": 60}
    state = host_edits.set_host_data(state, "node-3", ["swarm_drain_timeout_s=30"])
    inventory = _lab_inventory(state, monkeypatch)
    hosts = dict(inventory["gpu_nodes"])
    assert list(hosts) == ["node-1", "node-3", "node-4"]
    assert inventory["swarm_managers"] == ["node-1"]
    assert hosts["node-4"]["swarm_retire"] is True
    assert hosts["node-3"]["swarm_drain_timeout_s"] == 30, "host data wins over lab settings"
    assert hosts["node-1"]["swarm_drain_timeout_s"] == 60


def test_the_lab_inventory_takes_the_first_n_listed_hosts_as_managers(monkeypatch):
    state = host_edits.set_manager_count(host_edits.set_forgotten(_state(), "node-2", True), 3)
    assert _lab_inventory(state, monkeypatch)["swarm_managers"] == ["node-1", "node-3", "node-4"]
    # A retiring manager is refused before any connection, as in a real inventory.
    state = host_edits.set_host_data(state, "node-4", ["swarm_retire=true"])
    with pytest.raises(SystemExit):
        _lab_inventory(state, monkeypatch)


def test_hosts_that_do_not_admit_the_labs_key_are_foreign(monkeypatch):
    ours = b"ssh-ed25519 AAAAC3NzaOURS gpulab-deploy\n"
    keys = {"lab-node-1": ours, "lab-node-2": b"ssh-ed25519 AAAAC3NzaOLD gpulab-deploy\n",
            "lab-node-3": b"# two keys\nssh-rsa AAAAB3Nza other\nssh-ed25519 AAAAC3NzaOURS renamed\n",
            "lab-node-4": None}  # nothing to read: not a host this check can judge
    monkeypatch.setattr(fleet, "authorized_keys", keys.get)
    assert fleet.foreign_hosts(list(keys), ours) == ["lab-node-2"]
