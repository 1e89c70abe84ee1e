"""Preflight's judgement: each rule on its own, with the numbers in the reason."""

import pytest

from operations.preflight import (
    Requirements,
    readiness_failures,
    readiness_summary,
    same_filesystem,
)

GIB_IN_KIB = 1024 * 1024
REQ = Requirements(
    min_free_gb_models=100,
    min_free_gb_docker=50,
    require_kernel_headers=True,
    require_time_sync=True,
)


def host(**overrides):
    readiness = {
        "os_id": "ubuntu",
        "os_version": "24.04",
        "arch": "x86_64",
        "kernel": "6.8.0-49-generic",
        "models_dev": "66305",
        "models_fs": "/dev/nvme1n1 /opt",
        "models_avail_kib": str(500 * GIB_IN_KIB),
        "docker_dev": "66306",
        "docker_fs": "/dev/nvme0n1p2 /",
        "docker_avail_kib": str(200 * GIB_IN_KIB),
        "headers": "available",
        "container": "none",
        "ntp_synchronized": "yes",
        "sudo": "ok",
    }
    readiness.update(overrides)
    return {key: value for key, value in readiness.items() if value is not None}


def test_a_ready_host_passes():
    assert readiness_failures(host(), REQ) == []


@pytest.mark.parametrize(
    ("os_id", "version"), [("ubuntu", "22.04"), ("ubuntu", "24.04"), ("debian", "12")]
)
def test_supported_systems_pass(os_id, version):
    assert readiness_failures(host(os_id=os_id, os_version=version), REQ) == []


@pytest.mark.parametrize(
    ("os_id", "version"), [("ubuntu", "20.04"), ("debian", "11"), ("rocky", "9")]
)
def test_other_systems_are_refused_with_the_supported_list(os_id, version):
    assert readiness_failures(host(os_id=os_id, os_version=version), REQ) == [
        f"unsupported OS {os_id} {version} (supported: ubuntu 22.04, ubuntu 24.04, debian 12)"
    ]


def test_arm64_servers_pass_and_other_architectures_do_not():
    assert readiness_failures(host(arch="aarch64"), REQ) == []
    assert readiness_failures(host(arch="ppc64le"), REQ) == [
        "unsupported architecture ppc64le (supported: x86_64, aarch64)"
    ]


def test_separate_filesystems_are_checked_each_against_its_own_need():
    failures = readiness_failures(host(models_avail_kib=str(60 * GIB_IN_KIB)), REQ)
    assert failures == ["60.0 GiB free for models on /opt, need 100 GiB"]
    failures = readiness_failures(host(docker_avail_kib=str(10 * GIB_IN_KIB)), REQ)
    assert failures == ["10.0 GiB free for docker on /, need 50 GiB"]


def test_one_filesystem_must_hold_both_needs():
    shared = {
        "models_dev": "2049",
        "models_fs": "/dev/sda1 /",
        "docker_dev": "2049",
        "docker_fs": "/dev/sda1 /",
    }
    assert readiness_failures(host(**shared, models_avail_kib=str(160 * GIB_IN_KIB)), REQ) == []
    assert readiness_failures(host(**shared, models_avail_kib=str(120 * GIB_IN_KIB)), REQ) == [
        "120.0 GiB free on /, need 150 GiB (models 100 + docker 50: same filesystem)"
    ]


@pytest.mark.parametrize(
    ("models", "docker", "same"),
    [
        # A bind mount: two mount points, one device number, one pool of free space.
        (("2049", "/dev/sda1 /"), ("2049", "/dev/sda1 /var/lib/docker"), True),
        # Two tmpfs (or overlay) mounts share a device name but not a filesystem.
        (("41", "tmpfs /opt"), ("42", "tmpfs /var/lib/docker"), False),
        # Without device numbers (stat failed), df's "device mountpoint" decides.
        (("", "/dev/sda1 /"), ("", "/dev/sda1 /"), True),
        ((None, "/dev/sda1 /"), (None, "/dev/sdb1 /var/lib/docker"), False),
    ],
)
def test_the_device_number_decides_what_is_one_filesystem(models, docker, same):
    readiness = host(
        models_dev=models[0], models_fs=models[1], docker_dev=docker[0], docker_fs=docker[1]
    )
    assert same_filesystem(readiness) is same


def test_an_unmeasurable_disk_is_a_failure_not_a_pass():
    assert readiness_failures(host(models_avail_kib=None), REQ) == [
        "free disk could not be measured (df failed)"
    ]


def test_missing_kernel_headers_fail_only_when_required():
    assert readiness_failures(host(headers="missing"), REQ) == [
        (
            "no kernel headers for the running kernel 6.8.0-49-generic "
            "(linux-headers-6.8.0-49-generic is neither installed nor available from apt)"
        )
    ]
    relaxed = Requirements(100, 50, require_kernel_headers=False, require_time_sync=True)
    assert readiness_failures(host(headers="missing"), relaxed) == []


def test_an_unknown_headers_probe_is_not_a_pass():
    assert len(readiness_failures(host(headers=None), REQ)) == 1


def test_clock_sync_by_ntp_a_daemon_or_the_container_host():
    unsynced = {"ntp_synchronized": "no"}
    assert readiness_failures(host(**unsynced), REQ) == [
        "clock not synchronised (no chrony, ntpd or systemd-timesyncd active)"
    ]
    assert readiness_failures(host(**unsynced, time_daemon="chrony"), REQ) == []
    assert readiness_failures(host(**unsynced, container="docker"), REQ) == []
    relaxed = Requirements(100, 50, require_kernel_headers=True, require_time_sync=False)
    assert readiness_failures(host(**unsynced), relaxed) == []


@pytest.mark.parametrize(
    ("sudo", "passes"), [("ok", True), ("root", True), ("password", False), (None, False)]
)
def test_passwordless_sudo_is_required(sudo, passes):
    failures = readiness_failures(host(sudo=sudo), REQ)
    assert (failures == []) is passes
    if not passes:
        assert failures == [
            "sudo needs a password for the deploy user (passwordless sudo is required)"
        ]


def test_a_host_without_sudo_is_told_so():
    assert readiness_failures(host(sudo="missing"), REQ) == [
        "sudo is not installed (the deploy user needs passwordless sudo)"
    ]


def test_every_reason_is_reported_at_once():
    failures = readiness_failures(
        host(os_id="rocky", arch="s390x", headers="missing", sudo="password"), REQ
    )
    assert len(failures) == 4


def test_the_summary_says_where_the_clock_comes_from():
    container = readiness_summary(host(container="docker", ntp_synchronized="no"), REQ)
    assert "clock from the docker host (a container shares its host's clock)" in container
    assert readiness_summary(host(time_daemon="chrony"), REQ) == (
        "ubuntu 24.04 x86_64, 500 GiB free for models on /opt, 200 GiB free for docker on /, "
        "headers available, clock synchronised (chrony), sudo ok"
    )


def test_the_summary_names_one_filesystem_once_and_skips_checks_not_required():
    shared = host(
        models_dev="7",
        docker_dev="7",
        models_fs="/dev/sda1 /",
        docker_fs="/dev/sda1 /",
        sudo="root",
    )
    relaxed = Requirements(100, 50, require_kernel_headers=False, require_time_sync=False)
    assert readiness_summary(shared, relaxed) == (
        "ubuntu 24.04 x86_64, 500 GiB free on / for models and docker, connected as root"
    )


def test_a_host_that_said_nothing_fails_every_check_with_a_reason():
    failures = readiness_failures({}, REQ)
    assert failures == [
        "unsupported OS unknown unknown (supported: ubuntu 22.04, ubuntu 24.04, debian 12)",
        "unsupported architecture unknown (supported: x86_64, aarch64)",
        "free disk could not be measured (df failed)",
        "kernel headers could not be checked (running kernel unknown)",
        "clock not synchronised (no chrony, ntpd or systemd-timesyncd active)",
        "sudo needs a password for the deploy user (passwordless sudo is required)",
    ]
