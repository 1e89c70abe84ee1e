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

from operations.phase import fail_host, read_fact

# Distributions the deploy is built and tested for: NVIDIA's CUDA repository and Docker's both
# publish for exactly these.
SUPPORTED_OS = (("ubuntu", "22.04"), ("ubuntu", "24.04"), ("debian", "12"))
SUPPORTED_ARCH = ("x86_64", "aarch64")

GIB = 1024**3

# POSIX sh: runs on any of the supported systems as the deploy user, never fails (each probe's
# outcome is a value), and changes nothing (apt-cache reads the lists that are there; no update).
# Disk: the directories may not exist yet, so the nearest existing parent is measured; `dev` (the
# filesystem's device number, shared by bind mounts) tells whether both live on one filesystem.
_READINESS_SCRIPT = r"""
models_dir=$1; docker_dir=$2
. /etc/os-release 2>/dev/null
echo "os_id=${ID:-unknown}"
echo "os_version=${VERSION_ID:-unknown}"
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
nearest() { p=$1; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; echo "$p"; }
disk() {
  d=$(nearest "$2")
  echo "$1_dev=$(stat -c %d "$d" 2>/dev/null)"
  df -Pk "$d" 2>/dev/null |
    awk -v k="$1" 'NR==2 {print k "_fs=" $1 " " $6; print k "_avail_kib=" $4}'
}
disk models "$models_dir"
disk docker "$docker_dir"
if [ -e "/lib/modules/$(uname -r)/build" ]; then echo "headers=installed"
elif apt-cache policy "linux-headers-$(uname -r)" 2>/dev/null | grep -q 'Candidate: [0-9]'
then echo "headers=available"
else echo "headers=missing"; fi
virt=$(systemd-detect-virt --container 2>/dev/null) || virt=none
if [ "$virt" = none ]; then
  if [ -e /.dockerenv ]; then virt=docker; elif [ -e /run/.containerenv ]; then virt=podman; fi
fi
echo "container=$virt"
echo "ntp_synchronized=$(timedatectl show -p NTPSynchronized --value 2>/dev/null || echo unknown)"
for unit in chrony chronyd systemd-timesyncd ntp ntpd ntpsec; do
  if systemctl is-active --quiet "$unit" 2>/dev/null; then echo "time_daemon=$unit"; break; fi
done
if [ "$(id -u)" = 0 ]; then echo "sudo=root"
elif ! command -v sudo >/dev/null 2>&1; then echo "sudo=missing"
elif sudo -n true 2>/dev/null; then echo "sudo=ok"
else echo "sudo=password"; fi
exit 0
"""


class HostReadiness(FactBase):
    """Everything preflight judges, in one round trip, as a dict of strings.

    Disk figures are for the filesystem holding each directory (or its nearest existing parent:
    on a fresh host neither exists yet). Must run without sudo: whether sudo works is one of the
    questions.
    """

    def command(self, models_dir: str, docker_data_root: str) -> StringCommand:
        return StringCommand(
            "sh",
            "-c",
            QuoteString(_READINESS_SCRIPT),
            "preflight",
            QuoteString(models_dir),
            QuoteString(docker_data_root),
        )

    def default(self) -> dict[str, str]:
        # No output at all (a shell that printed nothing): every check then fails with a reason.
        return {}

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


def _mount(readiness: dict[str, str], which: str) -> str:
    """The mount point df named for a directory ("device mountpoint" -> "mountpoint")."""
    return readiness.get(f"{which}_fs", "?").split(" ")[-1]


def same_filesystem(readiness: dict[str, str]) -> bool:
    """Whether models_dir and docker_data_root share one filesystem (and so its free space).

    The device number decides (a bind mount shares it; two tmpfs or overlay mounts do not);
    without it, df's "device mountpoint" does.
    """
    models_dev, docker_dev = readiness.get("models_dev"), readiness.get("docker_dev")
    if models_dev and docker_dev:
        return models_dev == docker_dev
    return readiness.get("models_fs", "?") == readiness.get("docker_fs", "?")


def disk_failures(readiness: dict[str, str], req: Requirements) -> list[str]:
    models, docker = _free_gib(readiness, "models"), _free_gib(readiness, "docker")
    if models is None or docker is None:
        return ["free disk could not be measured (df failed)"]
    if same_filesystem(readiness):
        need = req.min_free_gb_models + req.min_free_gb_docker
        if models < need:
            summed = f"models {req.min_free_gb_models} + docker {req.min_free_gb_docker}"
            mount = _mount(readiness, "models")
            return [
                f"{models:.1f} GiB free on {mount}, need {need} GiB ({summed}: same filesystem)"
            ]
        return []
    failures = []
    for label, free, need in (
        ("models", models, req.min_free_gb_models),
        ("docker", docker, req.min_free_gb_docker),
    ):
        if free < need:
            failures.append(
                f"{free:.1f} GiB free for {label} on {_mount(readiness, label)}, need {need} GiB"
            )
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
    if req.require_kernel_headers and readiness.get("headers") not in ("installed", "available"):
        kernel = readiness.get("kernel")
        failures.append(
            f"no kernel headers for the running kernel {kernel} "
            f"(linux-headers-{kernel} is neither installed nor available from apt)"
            if kernel
            else "kernel headers could not be checked (running kernel unknown)"
        )
    if req.require_time_sync and not clock_is_synchronised(readiness):
        failures.append("clock not synchronised (no chrony, ntpd or systemd-timesyncd active)")
    sudo = readiness.get("sudo")
    if sudo == "missing":
        failures.append("sudo is not installed (the deploy user needs passwordless sudo)")
    elif sudo not in ("ok", "root"):
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
    """What a passing host was found to be, for its noop line."""
    parts = [f"{readiness.get('os_id')} {readiness.get('os_version')} {readiness.get('arch')}"]
    models, docker = _free_gib(readiness, "models") or 0, _free_gib(readiness, "docker") or 0
    if same_filesystem(readiness):
        parts.append(
            f"{models:.0f} GiB free on {_mount(readiness, 'models')} for models and docker"
        )
    else:
        parts.append(f"{models:.0f} GiB free for models on {_mount(readiness, 'models')}")
        parts.append(f"{docker:.0f} GiB free for docker on {_mount(readiness, 'docker')}")
    if req.require_kernel_headers:
        parts.append(f"headers {readiness.get('headers')}")
    if req.require_time_sync:
        container = readiness.get("container", "none")
        if readiness.get("ntp_synchronized") == "yes" or readiness.get("time_daemon"):
            parts.append(f"clock synchronised ({readiness.get('time_daemon') or 'NTP'})")
        else:
            parts.append(f"clock from the {container} host (a container shares its host's clock)")
    parts.append("sudo ok" if readiness.get("sudo") == "ok" else "connected as root")
    return ", ".join(parts)


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
    return read_fact(
        host, HostReadiness, models_dir=models_dir, docker_data_root=docker_data_root, _sudo=False
    )


@deploy("Preflight")
def preflight(settings) -> bool:
    """Check the host; returns whether it passed, so that deploy.py plans no further phase for
    a host that did not.

    `verify` alone stops the host at execution time. The fact is also read here, at plan
    time, because when pyinfra detects changes (--dry, or no -y) it runs every later phase's
    operations at plan time: on a host refused for its sudo, their sudo fact reads prompt for a
    password and abort the whole run (seen against the lab), and an unsupported OS would make
    them raise. `read_fact` runs the script once: `verify` is the first operation, so nothing
    has changed in between. In those change-detecting runs the reasons are also
    printed now, since --dry never reaches `verify`'s execution.
    """
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
    failures = readiness_failures(
        _readiness(settings.models_dir, settings.docker_data_root), requirements
    )
    if failures and host.state.should_check_for_changes():
        host.log_styled(
            "preflight will fail: " + "; ".join(failures), fg="yellow", log_func=logger.warning
        )
    return not failures
