"""The value rules (operations/rules.py), the folding of problems every host shares
(operations/inventory_check.fold) and the GPU fit read from the hosts (operations/fleet_fit),
as plain functions. What each refusal looks like on the command line: test_bad_input.py."""

from __future__ import annotations

import pytest

from operations import fleet_fit, rules
from operations.inventory_check import fold
from operations.inventory_data import HostData, parse_data
from tests.unit.test_stack import model, settings


@pytest.mark.parametrize("value", ["10.20.0.11", "10.20.0.11:2377", "eth0", "eth0:2377", "bond0.12",
                                   "fd00::11", "[fd00::11]:2377", "enp65s0f0np0"])
def test_addresses_docker_accepts_are_accepted(value):
    assert rules.advertise_address_problem(value) is None


@pytest.mark.parametrize("value", ["999.1.1.1", "10.0.0", "10.0.0.5:0", "10.0.0.5:70000",
                                   "eth0/1", "a-very-long-interface-name", "[fd00::11]x"])
def test_addresses_docker_would_refuse_are_refused(value):
    assert rules.advertise_address_problem(value)


@pytest.mark.parametrize("value", ["vllm/vllm-openai:v0.11.0", "haproxy:3.2.4", "ubuntu:24.04",
                                   "ghcr.io/huggingface/text-generation-inference:3.3.6",
                                   "172.29.1.4:5000/lab/haproxy:d885c57a1fcd",
                                   "haproxy:latest@sha256:" + "a" * 64, "ollama/ollama@sha256:" + "0" * 64])
def test_pinned_images_are_accepted(value):
    assert rules.image_problem(value) is None


@pytest.mark.parametrize("value", ["haproxy", "haproxy:latest", "Ubuntu:24.04", "ubuntu 24.04",
                                   "registry:5000/x:", "x@sha256:abc"])
def test_floating_or_malformed_images_are_refused(value):
    assert rules.image_problem(value)


def test_engine_flags_the_deploy_sets_are_refused_in_every_spelling():
    assert rules.engine_args_problem("vllm", ["--enable-prefix-caching"]) is None
    assert "--port" in rules.engine_args_problem("vllm", ["--port=9000"])
    assert "-tp" in rules.engine_args_problem("vllm", ["-tp", "2"])
    assert rules.engine_args_problem("tgi", ["--max-batch-prefill-tokens", "4096"]) is None
    assert "-p" in rules.engine_args_problem("tgi", ["-p", "80"])
    assert rules.engine_args_problem("ollama", []) is None
    assert "ollama" in rules.engine_args_problem("ollama", ["--verbose"])


def test_secret_files_must_be_private_single_lines(tmp_path):
    path = tmp_path / "key"
    assert "No such file" in rules.secret_file_problem(str(path))
    path.write_text("sk-1\n")
    path.chmod(0o640)
    assert "0640" in rules.secret_file_problem(str(path))
    path.chmod(0o400)
    assert rules.secret_file_problem(str(path)) is None
    path.chmod(0o600)
    path.write_text("sk-1\nsk-2\n")
    assert "one line" in rules.secret_file_problem(str(path))
    assert "regular file" in rules.secret_file_problem(str(tmp_path))


def test_daemon_config_may_add_keys_but_not_undo_the_managed_ones():
    assert rules.daemon_config_problem({"debug": True, "data-root": "/var/lib/docker/"},
                                       "/var/lib/docker") is None
    assert rules.daemon_config_problem({"default-runtime": "nvidia"}, "/var/lib/docker") is None
    assert "data-root" in rules.daemon_config_problem({"data-root": "/d"}, "/var/lib/docker")
    assert "generic" in rules.daemon_config_problem({"node-generic-resources": []}, "/x")


def hosts(*names, source="group_data/all.py"):
    return {name: HostData(name, {"k": 1}, {"k": source}) for name in names}


def test_a_problem_every_host_shares_from_one_source_is_said_once():
    found = [(name, "k", "key 'k' = 1: expected 2") for name in ("a", "b", "c")]
    assert fold(found, hosts("a", "b", "c")) == ["group_data/all.py (every host): key 'k' = 1: expected 2"]
    # From each host's own data, or on some hosts only: per host.
    assert fold(found, hosts("a", "b", "c", source="inventory host data")) == [
        "host a: key 'k' = 1: expected 2", "host b: key 'k' = 1: expected 2",
        "host c: key 'k' = 1: expected 2"]
    assert fold(found[:2], hosts("a", "b", "c")) == [
        "host a: key 'k' = 1: expected 2", "host b: key 'k' = 1: expected 2"]
    assert fold(found[:1], hosts("a")) == ["host a: key 'k' = 1: expected 2"]


def test_data_items_parse_as_pyinfra_and_a_missing_value_is_a_problem():
    assert parse_data(["a=1", "a=2", "b=x=y"]) == ({"a": 2, "b": "x=y"}, [])
    assert parse_data(["a"])[1] == ["--data 'a': expected KEY=VALUE, e.g. --data nvidia_allow_reboot=true"]


H100 = "NVIDIA H100 80GB HBM3"


def fit(models, gpus, members=None):
    specs = settings(models, stack_converge_timeout_s=1800).models
    members = members or {spec.name: list(gpus) for spec in specs}
    return fleet_fit.gpu_fit_problems(specs, gpus, members)


def test_known_gpus_only_from_a_loaded_driver():
    assert fleet_fit.known_gpus({"driver": {"loaded": False}, "gpus": []}) is None
    fact = {"driver": {"loaded": True}, "gpus": [{}] * 8, "gpu_count": 8, "models": [H100]}
    assert fleet_fit.known_gpus(fact) == (8, [H100])


def test_a_model_wider_than_every_host_is_refused():
    problems = fit([model("big", tensor_parallel_size=8)], {"a": (4, [H100]), "b": (2, [H100])})
    assert problems == ["models[0].tensor_parallel_size = 8: expected at most the GPUs of one host "
                        "of its groups (4 on a, the most any has): a replica cannot span hosts"]


def test_an_unknown_host_might_still_fit():
    assert fit([model("big", tensor_parallel_size=8)], {"a": (4, [H100]), "b": None}) == []


def test_replicas_need_that_many_hosts_with_enough_gpus():
    problems = fit([model("m", replicas=2, tensor_parallel_size=4)],
                   {"a": (8, [H100]), "b": (2, [H100])})
    assert problems == ["models[0].replicas = 2: expected at most the hosts with 4+ GPUs in its "
                        "groups (1: a; one replica per host)"]
    assert fit([model("m", replicas=2, tensor_parallel_size=4)],
               {"a": (8, [H100]), "b": (2, [H100]), "c": None}) == []


def test_a_gpu_model_no_host_has_is_refused():
    problems = fit([model("m", gpu_model="NVIDIA B200")], {"a": (8, [H100])})
    assert problems == ["models[0].gpu_model = 'NVIDIA B200': expected a GPU model the hosts of "
                        f"its groups have ({H100})"]


def test_models_not_served_are_not_placed():
    assert fit([model("m", serve=False, tensor_parallel_size=16)], {"a": (8, [H100])}) == []
