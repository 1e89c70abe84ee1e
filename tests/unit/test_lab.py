"""The lab's pure pieces: addresses, names, recipe hashes, the inventory it feeds."""

import ipaddress
import json
import runpy
import sys

import pytest

from scripts.lab import fleet


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
    first = fleet.recipe_hash(tmp_path)
    assert fleet.recipe_hash(tmp_path) == first
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN true\n")
    assert fleet.recipe_hash(tmp_path) != first
    assert fleet.recipe_hash(tmp_path, extra="other base") != fleet.recipe_hash(tmp_path)


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
