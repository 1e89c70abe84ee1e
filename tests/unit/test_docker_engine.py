"""Pure logic of the Docker Engine phase: apt versions, package decisions, daemon.json merging."""

import json

import pytest

from operations.docker_engine import (
    managed_daemon_config,
    merge_daemon_config,
    parse_daemon_json,
    render_daemon_json,
    same_config,
)
from operations.docker_packages import (
    docker_apt_version,
    other_source_conflict,
    packages_to_install,
    parse_engine_state,
    wanted_packages,
)

DEBIAN_12 = {"id": "debian", "version_id": "12", "codename": "bookworm"}
UBUNTU_2404 = {"id": "ubuntu", "version_id": "24.04", "codename": "noble"}
UBUNTU_2204 = {"id": "ubuntu", "version_id": "22.04", "codename": "jammy"}


# --- apt versions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("distro", "expected"),
    [
        (DEBIAN_12, "5:28.5.2-1~debian.12~bookworm"),
        (UBUNTU_2404, "5:28.5.2-1~ubuntu.24.04~noble"),
        (UBUNTU_2204, "5:28.5.2-1~ubuntu.22.04~jammy"),
    ],
)
def test_docker_apt_version_follows_dockers_scheme(distro, expected):
    version = docker_apt_version("28.5.2", distro["id"], distro["version_id"], distro["codename"])
    assert version == expected


@pytest.mark.parametrize("missing", ["id", "version_id", "codename"])
def test_docker_apt_version_refuses_an_incomplete_distribution(missing):
    distro = dict(DEBIAN_12, **{missing: ""})
    with pytest.raises(ValueError):
        docker_apt_version("28.5.2", distro["id"], distro["version_id"], distro["codename"])


def test_docker_source_pins_engine_and_cli_only():
    wanted = dict(wanted_packages("docker", "28.5.2", UBUNTU_2404))
    assert wanted == {
        "docker-ce": "5:28.5.2-1~ubuntu.24.04~noble",
        "docker-ce-cli": "5:28.5.2-1~ubuntu.24.04~noble",
        "containerd.io": None,
        "docker-buildx-plugin": None,
        "docker-compose-plugin": None,
    }


def test_distro_source_wants_docker_io_at_any_version():
    assert wanted_packages("distro", "28.5.2", DEBIAN_12) == [("docker.io", None)]


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="docker_engine_source"):
        wanted_packages("snap", "28.5.2", DEBIAN_12)


# --- package decisions ----------------------------------------------------------------------


def _installed(versions):
    return {name: {"version": v, "held": False} for name, v in versions.items()}


def test_nothing_to_install_when_pinned_versions_match():
    wanted = wanted_packages("docker", "28.5.2", DEBIAN_12)
    installed = {name: {"version": pin or "1.0", "held": True} for name, pin in wanted}
    assert packages_to_install(wanted, installed) == []


def test_a_wrong_pinned_version_and_a_missing_package_are_installed():
    wanted = wanted_packages("docker", "28.5.2", DEBIAN_12)
    installed = {name: {"version": pin or "1.0", "held": True} for name, pin in wanted}
    installed["docker-ce"]["version"] = "5:27.3.1-1~debian.12~bookworm"
    del installed["docker-compose-plugin"]
    assert packages_to_install(wanted, installed) == [
        ("docker-ce", "5:28.5.2-1~debian.12~bookworm"),
        ("docker-compose-plugin", None),
    ]


def test_unpinned_packages_are_not_upgraded():
    wanted = [("containerd.io", None)]
    assert packages_to_install(wanted, _installed({"containerd.io": "1.6.0-1"})) == []


def test_switching_engine_source_is_refused_not_performed():
    docker_io = _installed({"docker.io": "20.10"})
    assert "docker.io is installed" in other_source_conflict("docker", docker_io)
    assert "docker-ce" in other_source_conflict("distro", _installed({"docker-ce": "5:28.5.2-1~x"}))
    assert other_source_conflict("docker", _installed({"docker-ce": "5:28.5.2-1~x"})) is None
    assert other_source_conflict("distro", _installed({"docker.io": "20.10"})) is None


# --- daemon.json ----------------------------------------------------------------------------


def test_managed_keys_win_and_operator_keys_are_kept():
    current = {
        "debug": True,
        "log-driver": "journald",
        "log-opts": {"max-size": "10m", "tag": "{{.Name}}"},
        "registry-mirrors": ["https://a.example"],
    }
    managed = {"log-driver": "json-file", "log-opts": {"max-size": "100m", "max-file": "5"}}
    assert merge_daemon_config(current, managed) == {
        "debug": True,
        "log-driver": "json-file",
        # nested objects are merged key by key: the operator's "tag" stays
        "log-opts": {"max-size": "100m", "max-file": "5", "tag": "{{.Name}}"},
        "registry-mirrors": ["https://a.example"],
    }


def test_lists_are_replaced_not_appended():
    merged = merge_daemon_config({"dns": ["1.1.1.1", "8.8.8.8"]}, {"dns": ["10.0.0.2"]})
    assert merged == {"dns": ["10.0.0.2"]}


def test_a_managed_object_replaces_an_operator_scalar_and_vice_versa():
    assert merge_daemon_config({"runtimes": "x"}, {"runtimes": {"nvidia": {}}}) == {
        "runtimes": {"nvidia": {}}
    }
    assert merge_daemon_config({"default-runtime": {"a": 1}}, {"default-runtime": "nvidia"}) == {
        "default-runtime": "nvidia"
    }


def test_merge_modifies_neither_argument():
    current = {"log-opts": {"max-size": "10m"}}
    managed = {"log-opts": {"max-file": "3"}, "runtimes": {"nvidia": {"path": "x"}}}
    before = json.dumps([current, managed], sort_keys=True)
    merged = merge_daemon_config(current, managed)
    merged["runtimes"]["nvidia"]["path"] = "changed"
    merged["log-opts"]["max-size"] = "changed"
    assert json.dumps([current, managed], sort_keys=True) == before


def test_merging_twice_changes_nothing():
    current = {"debug": True, "log-opts": {"tag": "t"}}
    managed = managed_daemon_config("100m", 5)
    once = merge_daemon_config(current, managed)
    assert merge_daemon_config(once, managed) == once


def test_managed_config_from_settings():
    assert managed_daemon_config("100m", 5) == {
        "log-driver": "json-file",
        "log-opts": {"max-size": "100m", "max-file": "5"},
    }


def test_log_opts_are_strings_as_dockerd_requires():
    opts = managed_daemon_config("50m", 3)["log-opts"]
    assert opts == {"max-size": "50m", "max-file": "3"}
    assert all(isinstance(value, str) for value in opts.values())


def test_operator_config_wins_over_phase_extras_which_win_over_defaults():
    managed = managed_daemon_config(
        "100m",
        5,
        daemon_config={"default-runtime": "runc", "log-opts": {"max-file": "9"}},
        extra={
            "default-runtime": "nvidia",
            "runtimes": {"nvidia": {"path": "nvidia-container-runtime"}},
            "log-opts": {"max-file": "7"},
        },
    )
    assert managed["default-runtime"] == "runc"
    assert managed["runtimes"] == {"nvidia": {"path": "nvidia-container-runtime"}}
    assert managed["log-opts"] == {"max-size": "100m", "max-file": "9"}


def test_data_root_is_managed_only_when_not_dockers_default():
    assert "data-root" not in managed_daemon_config("100m", 5, data_root="/var/lib/docker")
    assert "data-root" not in managed_daemon_config("100m", 5, data_root="/var/lib/docker/")
    assert managed_daemon_config("100m", 5, data_root="/data/docker")["data-root"] == "/data/docker"


def test_render_is_sorted_indented_and_ends_with_a_newline():
    text = render_daemon_json({"log-opts": {"max-size": "1m", "max-file": "2"}, "debug": True})
    assert text == (
        "{\n"
        '  "debug": true,\n'
        '  "log-opts": {\n'
        '    "max-file": "2",\n'
        '    "max-size": "1m"\n'
        "  }\n"
        "}\n"
    )


def test_configs_compare_as_data():
    assert same_config({"a": 1, "b": {"c": "d"}}, {"b": {"c": "d"}, "a": 1})
    assert not same_config({"debug": True}, {"debug": 1})
    assert not same_config({"max-file": "5"}, {"max-file": 5})


def test_parse_daemon_json_joins_lines_and_never_raises():
    assert parse_daemon_json(["#present", "{", '"a": [1,', "2]}"]) == {
        "exists": True,
        "config": {"a": [1, 2]},
        "error": None,
    }
    broken = parse_daemon_json(["#present", "{'a': 1}"])
    assert broken["config"] is None and broken["error"].startswith("invalid JSON")
    assert parse_daemon_json([]) == {"exists": False, "config": {}, "error": None}


def test_parse_engine_state_ignores_packages_not_installed():
    state = parse_engine_state(
        [
            "os=debian 12 bookworm",
            "pkg=docker.io  un ",
            "pkg=docker-ce 5:28.5.2-1~debian.12~bookworm rc ",
            "pkg=curl 7.88.1-10+deb12u14 ii ",
            "pkg=docker-ce-cli 5:28.5.2-1~debian.12~bookworm hi ",
            "garbage line",
        ]
    )
    assert state["packages"] == {
        "curl": {"version": "7.88.1-10+deb12u14", "held": False},
        "docker-ce-cli": {"version": "5:28.5.2-1~debian.12~bookworm", "held": True},
    }
    assert state["distro"] == DEBIAN_12


def test_an_engine_older_than_23_is_named_for_what_it_does_to_gpu_tasks():
    from operations.docker_packages import swarm_gpu_warning

    debian = swarm_gpu_warning({"docker.io": {"version": "20.10.24+dfsg1-1+deb12u1", "held": False}})
    assert debian.startswith("Docker Engine 20.10.24 (docker.io) is older than 23.0")
    assert "moby/moby#44378" in debian
    assert swarm_gpu_warning({"docker-ce": {"version": "5:28.5.2-1~debian.12~bookworm"}}) is None
    assert swarm_gpu_warning({"docker.io": {"version": "26.1.3-0ubuntu1~24.04.1"}}) is None
    assert swarm_gpu_warning({"docker-ce": {"version": "5:23.0.0-1~debian.12~bookworm"}}) is None
    assert swarm_gpu_warning({}) is None
