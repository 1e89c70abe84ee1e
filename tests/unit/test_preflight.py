"""Preflight's judgement: each rule on its own, with the numbers in the reason."""

import pytest

from operations.preflight import Requirements, readiness_failures, readiness_summary

GIB_IN_KIB = 1024 * 1024
REQ = Requirements(min_free_gb_models=100, min_free_gb_docker=50,
                   require_kernel_headers=True, require_time_sync=True)


def host(**overrides):
    readiness = {
        "os_id": "ubuntu", "os_version": "24.04", "arch": "x86_64", "kernel": "6.8.0-49-generic",
        "models_fs": "/dev/nvme1n1 /opt", "models_avail_kib": str(500 * GIB_IN_KIB),
        "docker_fs": "/dev/nvme0n1p2 /", "docker_avail_kib": str(200 * GIB_IN_KIB),
        "headers": "available", "container": "none", "ntp_synchronized": "yes", "sudo": "ok",
    }
    readiness.update(overrides)
    return {key: value for key, value in readiness.items() if value is not None}


def test_a_ready_host_passes():
    assert readiness_failures(host(), REQ) == []


@pytest.mark.parametrize(("os_id", "version"), [("ubuntu", "22.04"), ("ubuntu", "24.04"), ("debian", "12")])
def test_supported_systems_pass(os_id, version):
    assert readiness_failures(host(os_id=os_id, os_version=version), REQ) == []


@pytest.mark.parametrize(("os_id", "version"), [("ubuntu", "20.04"), ("debian", "11"), ("rocky", "9")])
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
    shared = dict(models_fs="/dev/sda1 /", docker_fs="/dev/sda1 /")
    assert readiness_failures(host(**shared, models_avail_kib=str(160 * GIB_IN_KIB)), REQ) == []
    assert readiness_failures(host(**shared, models_avail_kib=str(120 * GIB_IN_KIB)), REQ) == [
        "120.0 GiB free on /, need 150 GiB (models 100 + docker 50: same filesystem)"
    ]


def test_an_unmeasurable_disk_is_a_failure_not_a_pass():
    assert readiness_failures(host(models_avail_kib=None), REQ) == ["free disk could not be measured (df failed)"]


def test_missing_kernel_headers_fail_only_when_required():
    assert readiness_failures(host(headers="missing"), REQ) == [
        "no kernel headers for the running kernel 6.8.0-49-generic "
        "(linux-headers-6.8.0-49-generic is neither installed nor available from apt)"
    ]
    relaxed = Requirements(100, 50, require_kernel_headers=False, require_time_sync=True)
    assert readiness_failures(host(headers="missing"), relaxed) == []


def test_clock_sync_by_ntp_a_daemon_or_the_container_host():
    unsynced = dict(ntp_synchronized="no")
    assert readiness_failures(host(**unsynced), REQ) == [
        "clock not synchronised (no chrony, ntpd or systemd-timesyncd active)"
    ]
    assert readiness_failures(host(**unsynced, time_daemon="chrony"), REQ) == []
    assert readiness_failures(host(**unsynced, container="docker"), REQ) == []
    relaxed = Requirements(100, 50, require_kernel_headers=True, require_time_sync=False)
    assert readiness_failures(host(**unsynced), relaxed) == []


@pytest.mark.parametrize(("sudo", "passes"), [("ok", True), ("root", True), ("password", False), (None, False)])
def test_passwordless_sudo_is_required(sudo, passes):
    failures = readiness_failures(host(sudo=sudo), REQ)
    assert (failures == []) is passes
    if not passes:
        assert failures == ["sudo needs a password for the deploy user (passwordless sudo is required)"]


def test_every_reason_is_reported_at_once():
    failures = readiness_failures(host(os_id="rocky", arch="s390x", headers="missing", sudo="password"), REQ)
    assert len(failures) == 4


def test_the_summary_says_where_the_clock_comes_from():
    assert "clock from the docker host" in readiness_summary(host(container="docker"), REQ)
    assert readiness_summary(host(time_daemon="chrony"), REQ) == (
        "ubuntu 24.04 x86_64, 500 GiB free for models, headers available, "
        "clock synchronised (chrony), sudo ok"
    )
