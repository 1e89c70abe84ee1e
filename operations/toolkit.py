"""NVIDIA Container Toolkit: NVIDIA's libnvidia-container apt repository, the toolkit pinned and
held, and /etc/nvidia-container-runtime/config.toml told which environment variable Docker Swarm
uses to hand a task its GPUs (`swarm-resource`).

Why 1.19 or later: 1.18 made `jit-cdi` the runtime's default mode and that mode ignored Swarm's
generic resources (NVIDIA/nvidia-container-toolkit#1599); 1.19.0 added Swarm support back to it
(#1600). `toolkit_packages` refuses an older version.

How Swarm hands GPUs to a task: each node advertises its GPUs in daemon.json as generic resources
(`"node-generic-resources": ["NVIDIA-GPU=GPU-<uuid>", ...]`); a service reserving `NVIDIA-GPU`
gets the chosen UUIDs in the variable `DOCKER_RESOURCE_NVIDIA-GPU`; the nvidia runtime (default
runtime, so Swarm tasks go through it) reads that variable because config.toml names it in
`swarm-resource`. `gpu_daemon_config(gpus)` gives the daemon.json keys; the Docker Engine phase
merges them.
"""

from __future__ import annotations

import re
import tomllib
from io import StringIO
from typing import Any, Callable

from pyinfra import host
from pyinfra.api import (
    FactBase,
    FileUploadCommand,
    OperationError,
    QuoteString,
    StringCommand,
    deploy,
    operation,
)

from operations.apt_pins import apt_install
from operations.gpu_health import GPU_RESOURCE_KIND, GpuHealth, current_serving_gpus, unhealthy_gpus
from operations.nvidia import NvidiaHost
from operations.nvidia_repos import REPO_TOOL_PACKAGES, signed_flat_repository
from operations.phase import PhaseResult, fails_only_this_host, read_fact

TOOLKIT_KEYRING = "/etc/apt/keyrings/nvidia-container-toolkit.gpg"
TOOLKIT_SOURCES_NAME = "nvidia-container-toolkit"  # -> .../sources.list.d/<name>.sources
RUNTIME_CONFIG = "/etc/nvidia-container-runtime/config.toml"

# Installed together at one version and held, as NVIDIA's install guide pins them.
TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
MIN_TOOLKIT_VERSION = (1, 19, 0)

# The variable Docker sets for a task holding generic resources of GPU_RESOURCE_KIND (the kind
# the nodes advertise and services reserve: operations/gpu_health.py).
SWARM_RESOURCE = f"DOCKER_RESOURCE_{GPU_RESOURCE_KIND}"

RUNTIME_NAME = "nvidia"
RUNTIME_PATH = "nvidia-container-runtime"


# --- Pure logic -----------------------------------------------------------------------------


def toolkit_version_tuple(version: str) -> tuple[int, int, int]:
    """"1.19.1-1" -> (1, 19, 1); raises ValueError for anything else."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:~rc\.\d+)?-\d+$", version)
    if not match:
        raise ValueError(
            f"nvidia_container_toolkit_version must be an apt version such as '1.19.1-1', "
            f"not {version!r}"
        )
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def toolkit_repo_uri(base_url: str, dpkg_arch: str) -> str:
    """The flat repository directory for an architecture: NVIDIA's `$(ARCH)`, spelt out."""
    if dpkg_arch not in ("amd64", "arm64"):
        raise ValueError(
            "the NVIDIA Container Toolkit repository has no packages for "
            f"{dpkg_arch or '(unknown)'}"
        )
    return f"{base_url.rstrip('/')}/{dpkg_arch}"


def gpu_daemon_config(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """The daemon.json keys this layer owns: the nvidia runtime, made the default (Swarm tasks
    cannot choose a runtime), and one generic resource per GPU, named by its UUID."""
    return {
        "runtimes": {RUNTIME_NAME: {"path": RUNTIME_PATH, "runtimeArgs": []}},
        "default-runtime": RUNTIME_NAME,
        "node-generic-resources": [
            f"{GPU_RESOURCE_KIND}={gpu['uuid']}"
            for gpu in sorted(gpus, key=lambda gpu: gpu["index"])
        ],
    }


def swarm_resource_value(text: str | None) -> str | None:
    """The top-level `swarm-resource` of a config.toml, or None (absent, or not TOML)."""
    if not text:
        return None
    try:
        value = tomllib.loads(text).get("swarm-resource")
    except tomllib.TOMLDecodeError:
        return None
    return value if isinstance(value, str) else None


_TABLE = re.compile(r"^\s*\[")
_KEY = re.compile(r"^\s*swarm-resource\s*=")
_COMMENTED_KEY = re.compile(r"^\s*#\s*swarm-resource\s*=")


def set_swarm_resource(text: str | None, value: str) -> str:
    """config.toml with the top-level `swarm-resource = "<value>"`: an existing setting is
    replaced, else NVIDIA's commented default (`#swarm-resource = "DOCKER_RESOURCE_GPU"`) is
    uncommented in place, else the key is added at the end of the top-level keys (before the
    first table). Everything else is kept byte for byte."""
    line = f'swarm-resource = "{value}"'
    lines = (text or "").splitlines()
    top_end = next((i for i, item in enumerate(lines) if _TABLE.match(item)), len(lines))
    for pattern in (_KEY, _COMMENTED_KEY):
        for i in range(top_end):
            if pattern.match(lines[i]):
                lines[i] = line
                return "\n".join(lines) + "\n"
    insert_at = top_end
    while insert_at > 0 and not lines[insert_at - 1].strip():
        insert_at -= 1
    lines.insert(insert_at, line)
    return "\n".join(lines) + "\n"


def parse_toolkit_host(lines: list[str]) -> dict[str, Any]:
    """Parse the ToolkitHost fact output."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith("##") and line[2:].strip() in ("arch", "pkg", "keyring", "config"):
            current = line[2:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)

    packages = {}
    for line in sections.get("pkg", []):
        parts = line.split()
        if len(parts) == 3 and len(parts[2]) >= 2 and parts[2][1] == "i":
            packages[parts[0]] = {"version": parts[1], "held": parts[2][0] == "h"}

    keyring = [line.strip() for line in sections.get("keyring", []) if line.strip()]
    config = sections.get("config")
    if config is not None:
        while config and not config[-1].strip():
            config = config[:-1]
    arch = next((line.strip() for line in sections.get("arch", []) if line.strip()), "")
    return {
        "arch": arch,
        "packages": packages,
        "keyring": {
            "present": "present" in keyring,
            "fingerprints": sorted(
                line.split(":", 1)[1].upper() for line in keyring if line.startswith("fpr:")
            ),
        },
        "config": None if config is None else "\n".join(config) + "\n",
    }


# --- Facts ----------------------------------------------------------------------------------


class ToolkitHost(FactBase):
    """The Container Toolkit's state on a host, in one command: dpkg architecture, the toolkit
    (and key tool) packages with their hold state, the repository keyring and its fingerprints,
    and /etc/nvidia-container-runtime/config.toml (None when absent).

    .. code:: python

        {
            "arch": "amd64",
            "packages": {"nvidia-container-toolkit": {"version": "1.19.1-1", "held": True}},
            "keyring": {"present": True, "fingerprints": ["C95B...96ECB0"]},
            "config": "swarm-resource = \\"DOCKER_RESOURCE_NVIDIA-GPU\\"\\n...",
        }
    """

    def command(self) -> str:
        return (
            "echo '##arch'; dpkg --print-architecture 2>/dev/null; "
            "echo '##pkg'; dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' "
            + " ".join(TOOLKIT_PACKAGES + REPO_TOOL_PACKAGES)
            + " 2>/dev/null; "
            f"echo '##keyring'; if [ -s {TOOLKIT_KEYRING} ]; then echo present; "
            f"gpg --show-keys --with-colons {TOOLKIT_KEYRING} 2>/dev/null | "
            "awk -F: '$1 == \"fpr\" { print \"fpr:\" $10 }'; fi; "
            f"if [ -e {RUNTIME_CONFIG} ]; then echo '##config'; cat {RUNTIME_CONFIG}; echo; fi; "
            "true"
        )

    def process(self, output):
        return parse_toolkit_host(list(output))


# --- Operations -----------------------------------------------------------------------------


@operation()
@fails_only_this_host
def toolkit_repository(repo_url: str, key_url: str, key_fingerprint: str):
    """
    Add NVIDIA's libnvidia-container apt repository for the host's architecture: its key,
    checked against ``key_fingerprint``, as /etc/apt/keyrings/nvidia-container-toolkit.gpg,
    and a deb822 source /etc/apt/sources.list.d/nvidia-container-toolkit.sources.

    + repo_url: the repository base; "/<dpkg arch>" is appended (NVIDIA's ``$(ARCH)``)
    + key_url: the armoured signing key
    + key_fingerprint: the 40 hex digits of the signing key

    **Example:**

    .. code:: python

        toolkit_repository(
            name="NVIDIA Container Toolkit repository",
            repo_url="https://nvidia.github.io/libnvidia-container/stable/deb",
            key_url="https://nvidia.github.io/libnvidia-container/gpgkey",
            key_fingerprint="C95B321B61E88C1809C4F759DDCAE044F796ECB0",
        )
    """
    state = read_fact(host, ToolkitHost)
    try:
        uri = toolkit_repo_uri(repo_url, state["arch"])
    except ValueError as error:
        raise OperationError(str(error)) from None

    yield from signed_flat_repository(
        "the Container Toolkit repository", uri, state["keyring"], state["packages"], key_url,
        TOOLKIT_KEYRING, key_fingerprint, TOOLKIT_SOURCES_NAME,
    )


@operation()
@fails_only_this_host
def toolkit_packages(version: str):
    """
    Install the NVIDIA Container Toolkit at exactly ``version`` (all four packages, as NVIDIA's
    guide pins them) and hold them. apt-get update runs only when something must be installed.

    + version: apt version, 1.19.0-1 or later (Swarm support), e.g. "1.19.1-1"

    **Example:**

    .. code:: python

        toolkit_packages(name="NVIDIA Container Toolkit 1.19.1-1", version="1.19.1-1")
    """
    try:
        parsed = toolkit_version_tuple(version)
    except ValueError as error:
        raise OperationError(str(error)) from None
    if parsed < MIN_TOOLKIT_VERSION:
        raise OperationError(
            f"NVIDIA Container Toolkit {version} is too old: Swarm's GPU resources need 1.19.0 "
            "or later (1.18 dropped them from the default runtime mode)"
        )

    installed = read_fact(host, ToolkitHost)["packages"]
    missing = [
        name for name in TOOLKIT_PACKAGES
        if installed.get(name, {}).get("version") != version
    ]
    if missing:
        extra = []
        if any(name in installed for name in missing):
            extra.append("--allow-downgrades")
        if any(installed.get(name, {}).get("held") for name in missing):
            extra.append("--allow-change-held-packages")
        yield "apt-get update"
        yield apt_install([f"{name}={version}" for name in TOOLKIT_PACKAGES], " ".join(extra))

    to_hold = [
        name for name in TOOLKIT_PACKAGES
        if name in missing or not installed.get(name, {}).get("held")
    ]
    if to_hold:
        yield StringCommand("apt-mark hold", *to_hold)
    if not missing and not to_hold:
        host.noop(f"NVIDIA Container Toolkit {version} is installed and held")


@operation()
@fails_only_this_host
def runtime_config(swarm_resource: str = SWARM_RESOURCE, path: str = RUNTIME_CONFIG):
    """
    Set the top-level ``swarm-resource`` of the NVIDIA Container Runtime's config.toml (NVIDIA's
    commented default is uncommented in place; every other line is kept). The new file is
    staged next to the old one, checked, and moved into place; nothing happens when the key
    already has the value.

    + swarm_resource: the variable Docker Swarm sets for a task's GPUs
    + path: the runtime's configuration file

    **Example:**

    .. code:: python

        runtime_config(
            name="Swarm GPUs in config.toml",
            swarm_resource="DOCKER_RESOURCE_NVIDIA-GPU",
        )
    """
    current = read_fact(host, ToolkitHost)["config"]
    if swarm_resource_value(current) == swarm_resource:
        host.noop(f'{path} already has swarm-resource = "{swarm_resource}"')
        return
    if current is not None and current.strip():
        try:
            tomllib.loads(current)
        except tomllib.TOMLDecodeError as error:
            raise OperationError(
                f"{path} is not valid TOML ({error}); fix or remove it by hand, then run again"
            ) from None

    text = set_swarm_resource(current, swarm_resource)
    staged = f"{path}.pyinfra-new"
    quoted = QuoteString(staged)
    yield StringCommand("install -d -m 0755", QuoteString(path.rsplit("/", 1)[0]))
    yield FileUploadCommand(StringIO(text), staged)
    yield StringCommand(
        "chown root:root", quoted, "&& chmod 0644", quoted,
        "&& grep -qxF", QuoteString(f'swarm-resource = "{swarm_resource}"'), quoted,
        "&& mv -f", quoted, QuoteString(path),
    )


@operation(is_idempotent=False)
@fails_only_this_host
def verify_gpu_container(image: str, expected_gpus: int | None = None,
                         keep_out_unhealthy: bool = True):
    """
    Run a throw-away container through the nvidia runtime and list its GPUs with nvidia-smi
    (injected by the toolkit); fail when it cannot, or sees another number of GPUs than
    ``expected_gpus``. Always issues its command: call it only when something changed, with
    ``_if``. When a GPU is unhealthy (operations/gpu_health.py), the container asks for the
    healthy ones by UUID, the GPUs Swarm may hand out, and must see exactly those: asking a
    lost GPU for "all" fails on a real host.

    + image: any image with a shell (the toolkit brings nvidia-smi)
    + expected_gpus: GPUs the container must see (None: as many as nvidia-smi lists on the
      host, or at least one)
    + keep_out_unhealthy: as gpu_health_keep_out

    **Example:**

    .. code:: python

        verify_gpu_container(
            name="A container sees the GPUs",
            image="ubuntu:24.04",
            expected_gpus=8,
            _if=lambda: toolkit.changed() or engine.changed(),
        )
    """
    devices, uuids = "all", []
    if expected_gpus is None:
        # The GPUs the driver phase found (read when the check runs, after any reboot).
        serving = current_serving_gpus(keep_out_unhealthy)
        if keep_out_unhealthy and unhealthy_gpus(read_fact(host, GpuHealth)):
            if not serving:
                host.noop("no healthy GPU to hand a container (gpu_health)")
                return
            uuids = [gpu["uuid"] for gpu in serving]
            devices = ",".join(uuids)
        expected_gpus = len(serving) or None
    want = f"-eq {int(expected_gpus)}" if expected_gpus else "-ge 1"
    wanted = f"{int(expected_gpus)}" if expected_gpus else "at least 1"
    yield StringCommand(
        f"out=$(docker run --rm --runtime={RUNTIME_NAME} -e NVIDIA_VISIBLE_DEVICES={devices}",
        QuoteString(image),
        'nvidia-smi -L) || { echo "a GPU container could not run" >&2; exit 1; };',
        'echo "$out"; n=$(echo "$out" | grep -c "^GPU ");',
        f'[ "$n" {want} ] ||',
        f'{{ echo "a GPU container saw $n GPU(s), expected {wanted}" >&2; exit 1; }}',
        *(part for uuid in uuids for part in (
            '; echo "$out" | grep -qF', QuoteString(f"UUID: {uuid}"),
            f'|| {{ echo "a GPU container did not see {uuid}" >&2; exit 1; }}')),
    )


# --- Phase ----------------------------------------------------------------------------------


def current_gpu_daemon_config(keep_out_unhealthy: bool = True) -> dict[str, Any]:
    """gpu_daemon_config for the current host, read now: call it where the GPUs are known
    (inside an operation at execution time, after the driver phase), not while planning a
    fresh host, whose GPUs are invisible until the driver is loaded. Unhealthy GPUs are left
    out of the generic resources when `keep_out_unhealthy` (operations/gpu_health.py)."""
    return gpu_daemon_config(current_serving_gpus(keep_out_unhealthy))


@deploy("NVIDIA Container Toolkit")
def container_toolkit(settings) -> PhaseResult:
    """Repository, pinned toolkit, swarm-resource in config.toml. Returns a PhaseResult whose
    `changed()` tells the GPU container check whether to run."""
    ops = [
        toolkit_repository(
            name="NVIDIA Container Toolkit repository",
            repo_url=settings.nvidia_container_toolkit_repo_url,
            key_url=settings.nvidia_container_toolkit_key_url,
            key_fingerprint=settings.nvidia_container_toolkit_key_fingerprint,
        ),
        toolkit_packages(
            name=f"NVIDIA Container Toolkit {settings.nvidia_container_toolkit_version}",
            version=settings.nvidia_container_toolkit_version,
        ),
        runtime_config(
            name=f"swarm-resource = {SWARM_RESOURCE} in {RUNTIME_CONFIG}",
            swarm_resource=SWARM_RESOURCE,
        ),
    ]
    return PhaseResult(ops)


@deploy("GPU container check")
def gpu_container_check(settings, changed: Callable[[], bool]):
    """After the Docker Engine phase: run one container through the nvidia runtime, only when
    `changed()` says the driver, toolkit or engine changed on this run."""
    verify_gpu_container(
        name="A container sees the GPUs through the nvidia runtime",
        image=settings.nvidia_container_verify_image,
        keep_out_unhealthy=settings.gpu_health_keep_out,
        _if=changed,
    )
