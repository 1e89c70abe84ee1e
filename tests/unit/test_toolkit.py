"""Pure logic of the Container Toolkit phase: daemon.json keys, config.toml editing, versions."""

import tomllib
from pathlib import Path

import pytest
import yaml

from operations import toolkit

DEFAULT_CONFIG = yaml.safe_load(
    (
        Path(__file__).parent.parent
        / "facts/toolkit.ToolkitHost/installed_default_config.yaml"
    ).read_text()
)["fact"]["config"]


def test_gpu_daemon_config_one_resource_per_gpu_in_index_order():
    gpus = [
        {"index": 1, "uuid": "GPU-bbbb"},
        {"index": 0, "uuid": "GPU-aaaa"},
    ]
    assert toolkit.gpu_daemon_config(gpus) == {
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "runtimeArgs": []}},
        "default-runtime": "nvidia",
        "node-generic-resources": ["NVIDIA-GPU=GPU-aaaa", "NVIDIA-GPU=GPU-bbbb"],
    }


def test_gpu_daemon_config_without_gpus_advertises_none():
    assert toolkit.gpu_daemon_config([])["node-generic-resources"] == []


def test_swarm_resource_matches_the_generic_resource_kind():
    assert toolkit.SWARM_RESOURCE == "DOCKER_RESOURCE_NVIDIA-GPU"


def test_set_swarm_resource_uncomments_nvidia_default_in_place():
    text = toolkit.set_swarm_resource(DEFAULT_CONFIG, "DOCKER_RESOURCE_NVIDIA-GPU")
    old, new = DEFAULT_CONFIG.splitlines(), text.splitlines()
    assert len(old) == len(new)
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert changed == [
        ('#swarm-resource = "DOCKER_RESOURCE_GPU"', 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"')
    ]
    parsed = tomllib.loads(text)
    assert parsed["swarm-resource"] == "DOCKER_RESOURCE_NVIDIA-GPU"
    # Still top-level: not swallowed by a table.
    assert "swarm-resource" not in parsed["nvidia-container-cli"]


def test_set_swarm_resource_replaces_another_value():
    text = 'swarm-resource = "DOCKER_RESOURCE_GPU"\n\n[nvidia-container-cli]\nload-kmods = true\n'
    assert toolkit.set_swarm_resource(text, "X") == (
        'swarm-resource = "X"\n\n[nvidia-container-cli]\nload-kmods = true\n'
    )


def test_set_swarm_resource_adds_the_key_before_the_first_table():
    text = "disable-require = false\n\n[nvidia-container-cli]\n#swarm-resource = \"no\"\n"
    result = toolkit.set_swarm_resource(text, "X")
    assert result == (
        'disable-require = false\nswarm-resource = "X"\n\n[nvidia-container-cli]\n'
        '#swarm-resource = "no"\n'
    )
    assert tomllib.loads(result)["swarm-resource"] == "X"


def test_set_swarm_resource_on_a_missing_file():
    assert toolkit.set_swarm_resource(None, "X") == 'swarm-resource = "X"\n'


def test_swarm_resource_value():
    assert toolkit.swarm_resource_value(DEFAULT_CONFIG) is None
    assert toolkit.swarm_resource_value('swarm-resource = "A"\n') == "A"
    assert toolkit.swarm_resource_value("[x]\nswarm-resource = \"A\"\n") is None
    assert toolkit.swarm_resource_value("not = [toml") is None
    assert toolkit.swarm_resource_value(None) is None


@pytest.mark.parametrize(
    "version, parsed",
    [("1.19.1-1", (1, 19, 1)), ("1.18.0-1", (1, 18, 0)), ("1.19.0~rc.1-1", (1, 19, 0))],
)
def test_toolkit_version_tuple(version, parsed):
    assert toolkit.toolkit_version_tuple(version) == parsed


@pytest.mark.parametrize("version", ["1.19.1", "v1.19.1-1", "latest", ""])
def test_toolkit_version_tuple_refuses(version):
    with pytest.raises(ValueError, match="apt version"):
        toolkit.toolkit_version_tuple(version)


def test_toolkit_repo_uri():
    base = "https://nvidia.github.io/libnvidia-container/stable/deb/"
    assert toolkit.toolkit_repo_uri(base, "amd64") == (
        "https://nvidia.github.io/libnvidia-container/stable/deb/amd64"
    )
    with pytest.raises(ValueError):
        toolkit.toolkit_repo_uri(base, "i386")


def test_phase_passes_the_settings_to_its_operations(monkeypatch):
    from types import SimpleNamespace

    calls = []

    def record(op_name):
        def op(**kwargs):
            calls.append((op_name, kwargs))
            return SimpleNamespace(did_change=lambda: False)

        return op

    for op_name in ("toolkit_repository", "toolkit_packages", "runtime_config"):
        monkeypatch.setattr(toolkit, op_name, record(op_name))
    settings = SimpleNamespace(
        nvidia_container_toolkit_repo_url="https://nvidia.github.io/libnvidia-container/stable/deb",
        nvidia_container_toolkit_key_url="https://nvidia.github.io/libnvidia-container/gpgkey",
        nvidia_container_toolkit_key_fingerprint="C95B321B61E88C1809C4F759DDCAE044F796ECB0",
        nvidia_container_toolkit_version="1.19.1-1",
    )
    result = toolkit.container_toolkit._inner(settings)
    assert [name for name, _ in calls] == [
        "toolkit_repository", "toolkit_packages", "runtime_config",
    ]
    assert calls[1][1]["version"] == "1.19.1-1"
    assert calls[2][1]["swarm_resource"] == "DOCKER_RESOURCE_NVIDIA-GPU"
    assert result.changed() is False
