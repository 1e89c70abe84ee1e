"""Preflight: decide, before anything is changed, whether a host can be deployed.

One remote command per host reads everything (`HostReadiness`); pure functions judge it. A host
that fails is reported with every reason at once and left untouched: the verdict makes the host
fail, pyinfra runs no later operation on a failed host, and the other hosts go on.

Checks: supported OS and architecture, free disk for the weights and for Docker's data root,
kernel headers for the running kernel (the driver is built by DKMS), a synchronised clock, and
passwordless sudo for the deploy user.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.api import FactBase, FunctionCommand, QuoteString, StringCommand, deploy, operation

# Distributions the deploy is built and tested for: NVIDIA's CUDA repository and Docker's both
# publish for exactly these.
SUPPORTED_OS = (("ubuntu", "22.04"), ("ubuntu", "24.04"), ("debian", "12"))
SUPPORTED_ARCH = ("x86_64", "aarch64")

GIB = 1024**3

# POSIX sh: runs on any of the supported systems as the deploy user, never fails (each probe's
# outcome is a value), and changes nothing (apt-cache reads the lists that are there).
_READINESS_SCRIPT = r"""
models_dir=$1; docker_dir=$2
. /etc/os-release 2>/dev/null
echo "os_id=${ID:-unknown}"
echo "os_version=${VERSION_ID:-unknown}"
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
nearest() { p=$1; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; echo "$p"; }
disk() { df -Pk "$(nearest "$2")" 2>/dev/null | awk -v k="$1" 'NR==2 {print k "_fs=" $1 " " $6; print k "_avail_kib=" $4}'; }
disk models "$models_dir"
disk docker "$docker_dir"
if [ -e "/lib/modules/$(uname -r)/build" ]; then echo "headers=installed"
elif apt-cache policy "linux-headers-$(uname -r)" 2>/dev/null | grep -q 'Candidate: [0-9]'; then echo "headers=available"
else echo "headers=missing"; fi
echo "container=$(systemd-detect-virt --container 2>/dev/null || echo none)"
echo "ntp_synchronized=$(timedatectl show -p NTPSynchronized --value 2>/dev/null || echo unknown)"
for unit in chrony chronyd systemd-timesyncd ntp ntpd ntpsec; do
  if systemctl is-active --quiet "$unit" 2>/dev/null; then echo "time_daemon=$unit"; break; fi
done
if [ "$(id -u)" = 0 ]; then echo "sudo=root"
elif sudo -n true 2>/dev/null; then echo "sudo=ok"
else echo "sudo=password"; fi
"""


class HostReadiness(FactBase):
    """Everything preflight judges, in one round trip, as a dict of strings.

    Disk figures are for the filesystem holding each directory (or its nearest existing parent:
    on a fresh host neither exists yet). Must run without sudo: whether sudo works is one of the
    questions.
    """

    def command(self, models_dir: str, docker_data_root: str) -> StringCommand:
        return StringCommand(
            "sh", "-c", QuoteString(_READINESS_SCRIPT), "preflight",
            QuoteString(models_dir), QuoteString(docker_data_root),
        )

    def process(self, output: list[str]) -> dict[str, str]:
        readiness = {}
        for line in output:
            key, sep, value = line.partition("=")
            if sep:
                readiness[key.strip()] = value.strip()
        return readiness


@dataclass(frozen=True)
class Requirements:
    min_free_gb_models: int
    min_free_gb_docker: int
    require_kernel_headers: bool
    require_time_sync: bool


def _free_gib(readiness: dict[str, str], which: str) -> float | None:
    try:
        return int(readiness[f"{which}_avail_kib"]) * 1024 / GIB
    except (KeyError, ValueError):
        return None


def disk_failures(readiness: dict[str, str], req: Requirements) -> list[str]:
    models, docker = _free_gib(readiness, "models"), _free_gib(readiness, "docker")
    if models is None or docker is None:
        return ["free disk could not be measured (df failed)"]
    models_fs, docker_fs = readiness.get("models_fs", "?"), readiness.get("docker_fs", "?")
    if models_fs == docker_fs:
        need = req.min_free_gb_models + req.min_free_gb_docker
        if models < need:
            mount = models_fs.split(" ")[-1]
            return [
                f"{models:.1f} GiB free on {mount}, need {need} GiB "
                f"(models {req.min_free_gb_models} + docker {req.min_free_gb_docker}: same filesystem)"
            ]
        return []
    failures = []
    for label, free, need, fs in (
        ("models", models, req.min_free_gb_models, models_fs),
        ("docker", docker, req.min_free_gb_docker, docker_fs),
    ):
        if free < need:
            failures.append(f"{free:.1f} GiB free for {label} on {fs.split(' ')[-1]}, need {need} GiB")
    return failures


def readiness_failures(readiness: dict[str, str], req: Requirements) -> list[str]:
    """One short reason per failing check; empty when the host can be deployed."""
    failures = []
    os_id, version = readiness.get("os_id", "unknown"), readiness.get("os_version", "unknown")
    if (os_id, version) not in SUPPORTED_OS:
        supported = ", ".join(f"{name} {ver}" for name, ver in SUPPORTED_OS)
        failures.append(f"unsupported OS {os_id} {version} (supported: {supported})")
    arch = readiness.get("arch", "unknown")
    if arch not in SUPPORTED_ARCH:
        failures.append(f"unsupported architecture {arch} (supported: {', '.join(SUPPORTED_ARCH)})")
    failures += disk_failures(readiness, req)
    if req.require_kernel_headers and readiness.get("headers") == "missing":
        failures.append(
            f"no kernel headers for the running kernel {readiness.get('kernel', '?')} "
            f"(linux-headers-{readiness.get('kernel', '?')} is neither installed nor available from apt)"
        )
    if req.require_time_sync and not clock_is_synchronised(readiness):
        failures.append("clock not synchronised (no chrony, ntpd or systemd-timesyncd active)")
    if readiness.get("sudo") not in ("ok", "root"):
        failures.append("sudo needs a password for the deploy user (passwordless sudo is required)")
    return failures


def clock_is_synchronised(readiness: dict[str, str]) -> bool:
    # A container has no clock of its own: it reads its host's kernel clock.
    return (
        readiness.get("ntp_synchronized") == "yes"
        or bool(readiness.get("time_daemon"))
        or readiness.get("container", "none") != "none"
    )


def readiness_summary(readiness: dict[str, str], req: Requirements) -> str:
    parts = [
        f"{readiness.get('os_id')} {readiness.get('os_version')} {readiness.get('arch')}",
        f"{_free_gib(readiness, 'models'):.0f} GiB free for models",
    ]
    if req.require_kernel_headers:
        parts.append(f"headers {readiness.get('headers')}")
    if req.require_time_sync:
        container = readiness.get("container", "none")
        parts.append(
            f"clock from the {container} host" if container != "none"
            else f"clock synchronised ({readiness.get('time_daemon') or 'NTP'})"
        )
    parts.append("sudo ok")
    return ", ".join(parts)


def fail_host(state, host, reason: str) -> bool:
    """A FunctionCommand that fails the host it runs for, and only it: pyinfra then runs no
    later operation on that host and the other hosts go on. (Raising OperationError from an
    operation at execution time would abort the run for every host.) pyinfra passes
    state and host, and honours the return value, only to functions that take both."""
    host.log_styled(reason, fg="red", log_func=logger.error)
    return False


@operation()
def verify(
    models_dir: str,
    docker_data_root: str,
    min_free_gb_models: int,
    min_free_gb_docker: int,
    require_kernel_headers: bool = True,
    require_time_sync: bool = True,
):
    """
    Check that the host can be deployed; fail the host (and only it) with every reason if not.

    + models_dir: where model weights will live (free space is measured there)
    + docker_data_root: Docker's data root (free space is measured there)
    + min_free_gb_models / min_free_gb_docker: GiB needed on each; summed on one filesystem
    + require_kernel_headers: headers for the running kernel must be installed or installable
    + require_time_sync: the clock must be synchronised

    **Example:**

    .. code:: python

        preflight.verify(
            name="Host is ready for the deploy",
            models_dir="/opt/models",
            docker_data_root="/var/lib/docker",
            min_free_gb_models=100,
            min_free_gb_docker=50,
        )
    """
    requirements = Requirements(
        min_free_gb_models, min_free_gb_docker, require_kernel_headers, require_time_sync
    )
    readiness = _readiness(models_dir, docker_data_root)
    failures = readiness_failures(readiness, requirements)
    if failures:
        yield FunctionCommand(fail_host, ("preflight failed: " + "; ".join(failures),), {})
        return
    host.noop("preflight passed: " + readiness_summary(readiness, requirements))


def _readiness(models_dir: str, docker_data_root: str) -> dict[str, str]:
    return host.get_fact(
        HostReadiness, models_dir=models_dir, docker_data_root=docker_data_root, _sudo=False
    )


@deploy("Preflight")
def preflight(settings) -> bool:
    """Check the host; returns whether it passed, so that deploy.py plans no further phase for
    a host that did not (not even the fact reads of later phases, which would need sudo)."""
    verify(
        name="Host is ready for the deploy",
        models_dir=settings.models_dir,
        docker_data_root=settings.docker_data_root,
        min_free_gb_models=settings.preflight_min_free_gb_models,
        min_free_gb_docker=settings.preflight_min_free_gb_docker,
        require_kernel_headers=settings.preflight_require_kernel_headers,
        require_time_sync=settings.preflight_require_time_sync,
    )
    requirements = Requirements(
        settings.preflight_min_free_gb_models,
        settings.preflight_min_free_gb_docker,
        settings.preflight_require_kernel_headers,
        settings.preflight_require_time_sync,
    )
    readiness = _readiness(settings.models_dir, settings.docker_data_root)
    return not readiness_failures(readiness, requirements)
