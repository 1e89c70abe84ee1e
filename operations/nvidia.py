"""NVIDIA driver: NVIDIA's CUDA apt repository, the pinned and held driver packages, nouveau
kept out, the persistence daemon (and Fabric Manager on NVSwitch systems), and the reboot that
loads a newly installed driver, followed by a check that the loaded driver is the pinned one.

Done the way NVIDIA's own installation guide and Ansible role do it (CUDA repository for the
host's distribution, `cuda-drivers`-style packages pinned to one version), with three things
they leave out: the repository key is checked against its fingerprint before apt trusts it,
the packages are held, and a host is rebooted only when the loaded driver is not the pinned one.

Package sets (compute only, no X stack):
- Debian 12 (NVIDIA's Debian packaging, unversioned names): `nvidia-driver-pinning-<branch>`,
  `nvidia-driver-cuda`, `nvidia-kernel-open-dkms` (or `nvidia-kernel-dkms`), `nvidia-persistenced`,
  and `nvidia-fabricmanager` on NVSwitch systems.
- Ubuntu 22.04 / 24.04 (Ubuntu-style versioned names, branches before 590):
  `nvidia-headless-<branch>-open` (or `nvidia-headless-<branch>`), `nvidia-utils-<branch>`, and
  `nvidia-fabricmanager-<branch>` on NVSwitch systems.
Every one is installed at the apt version whose upstream part is `nvidia_driver_version`
(the revision, "-1" or "-0ubuntu1", is read from the repository) and held.

Everything the phase reads about a host comes from one fact, `NvidiaHost`, one command per
read. Later phases read the GPUs from it: `read_fact(host, NvidiaHost)["gpus"]`.
"""

from __future__ import annotations

import posixpath
import re
import time
from io import StringIO
from typing import Any

from pyinfra import host
from pyinfra.api import (
    FactBase,
    FileUploadCommand,
    FunctionCommand,
    OperationError,
    StringCommand,
    deploy,
    operation,
)
from pyinfra.connectors.util import clear_askpass_cache, remove_any_sudo_askpass_file
from pyinfra.facts.files import File
from pyinfra.operations import systemd

from operations.apt_pins import apt_install, resolve_pin_lines, upstream_version
from operations.nvidia_repos import REPO_TOOL_PACKAGES, signed_flat_repository
from operations.phase import PhaseResult, explain, fails_only_this_host, read_fact

CUDA_KEYRING = "/etc/apt/keyrings/nvidia-cuda.gpg"
CUDA_SOURCES_NAME = "nvidia-cuda"  # -> /etc/apt/sources.list.d/nvidia-cuda.sources
# The key file NVIDIA publishes in every ubuntu2204/ubuntu2404/debian12 repository directory.
CUDA_KEY_FILE = "3bf863cc.pub"

NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
NOUVEAU_BLACKLIST_TEXT = (
    "# Managed by the gpu-fleet deploy: the NVIDIA driver needs nouveau kept out.\n"
    "blacklist nouveau\n"
    "options nouveau modeset=0\n"
)

PERSISTENCED_SERVICE = "nvidia-persistenced.service"
FABRICMANAGER_SERVICE = "nvidia-fabricmanager.service"

# Tools the key installation needs on a fresh host (installed only when missing).

# (ID, VERSION_ID) from /etc/os-release -> the directory name in NVIDIA's CUDA repository.
CUDA_REPO_DISTROS = {
    ("ubuntu", "22.04"): "ubuntu2204",
    ("ubuntu", "24.04"): "ubuntu2404",
    ("debian", "12"): "debian12",
}
# dpkg architecture -> the architecture directory in NVIDIA's CUDA repository.
CUDA_REPO_ARCHES = {"amd64": "x86_64", "arm64": "sbsa"}

# Section markers of the NvidiaHost command.
_SECTIONS = ("os", "arch", "kernel", "module", "proc", "nouveau", "pci", "pkg", "blacklist",
             "keyring", "smi", "cuda")

# nvidia-smi's exit status when a GPU is lost (fallen off the bus), per nvidia-smi(1).
SMI_GPU_LOST = 15

GPU_QUERY_FIELDS = (
    "index,uuid,name,memory.total,driver_version,pci.bus_id,persistence_mode,"
    "mig.mode.current,compute_cap"
)

VERIFY_WAIT_S = 120

# Written before a reboot into /run (a tmpfs, emptied by every boot): the host has rebooted once
# a fresh connection no longer finds it. pyinfra's server.reboot compares /proc/uptime instead,
# which a container (the lab's hosts) shares with its machine and so never goes down.
REBOOT_MARKER = "/run/gpu-fleet-reboot-pending"


# --- Pure logic -----------------------------------------------------------------------------


def cuda_repo_uri(base_url: str, distro_id: str, version_id: str, dpkg_arch: str) -> str:
    """The CUDA repository directory for a host, e.g. (".../repos", "debian", "12", "amd64")
    -> ".../repos/debian12/x86_64/". Raises ValueError for an unsupported host."""
    distro = CUDA_REPO_DISTROS.get((distro_id, version_id))
    if distro is None:
        supported = ", ".join(f"{i} {v}" for i, v in CUDA_REPO_DISTROS)
        raise ValueError(
            f"NVIDIA's CUDA repository is used here for {supported}; this host is "
            f"{distro_id or '(no ID)'} {version_id or '(no VERSION_ID)'}"
        )
    arch = CUDA_REPO_ARCHES.get(dpkg_arch)
    if arch is None:
        raise ValueError(
            f"NVIDIA's CUDA repository has no directory for dpkg architecture "
            f"{dpkg_arch or '(unknown)'} (supported: {', '.join(CUDA_REPO_ARCHES)})"
        )
    return f"{base_url.rstrip('/')}/{distro}/{arch}/"


def driver_package_names(
    distro_id: str, branch: str, flavour: str, fabricmanager: bool, nvlsm: bool = False
) -> list[tuple[str, bool]]:
    """The driver packages for a distribution as (name, pinned to the driver version) pairs.
    `nvlsm`: NVLink-5 boards (HGX B200/B300) need NVIDIA's NVLink Subnet Manager beside Fabric
    Manager (Fabric Manager User Guide, "NVLink Subnet Manager"); it is versioned on its own, so
    not pinned to the driver. Raises ValueError for a combination NVIDIA does not package this
    way."""
    if flavour not in ("open", "proprietary"):
        raise ValueError(
            f"unknown nvidia_driver_flavour {flavour!r} (expected 'open' or 'proprietary')"
        )
    if not branch.isdigit():
        raise ValueError(f"nvidia_driver_branch must be digits such as '580', not {branch!r}")
    if distro_id == "debian":
        kernel = "nvidia-kernel-open-dkms" if flavour == "open" else "nvidia-kernel-dkms"
        names = [
            (f"nvidia-driver-pinning-{branch}", False),
            ("nvidia-driver-cuda", True),
            (kernel, True),
            ("nvidia-persistenced", True),
        ]
        if fabricmanager:
            names.append(("nvidia-fabricmanager", True))
        if fabricmanager and nvlsm:
            names.append(("nvlsm", False))
        return names
    if distro_id == "ubuntu":
        if int(branch) >= 590:
            raise ValueError(
                f"driver branch {branch} on Ubuntu uses NVIDIA's new unversioned package names, "
                "which this deploy does not install yet; use branch 580 or earlier"
            )
        suffix = "-open" if flavour == "open" else ""
        names = [(f"nvidia-headless-{branch}{suffix}", True), (f"nvidia-utils-{branch}", True)]
        if fabricmanager:
            names.append((f"nvidia-fabricmanager-{branch}", True))
        if fabricmanager and nvlsm:
            names.append(("nvlsm", False))
        return names
    raise ValueError(f"no NVIDIA driver packaging known for distribution {distro_id or '(none)'}")


# GPUs sold (also) as SXM modules on HGX/DGX boards, where 8 of them talk through NVSwitch.
_NVSWITCH_MODELS = re.compile(
    r"\b(A100|A800|H100|H800|H200|H20|B200|B300|GB200|GB300)\b", re.IGNORECASE
)
_NOT_NVSWITCH = re.compile(r"\b(PCIe|NVL)\b", re.IGNORECASE)


def is_nvswitch_class(name: str) -> bool:
    """Whether a GPU product name is an SXM part that sits on an NVSwitch board: "NVIDIA
    A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA B200" yes; "NVIDIA H100
    PCIe", "NVIDIA H100 NVL", "NVIDIA A100 80GB PCIe", "NVIDIA L40S" no."""
    if "SXM" in name.upper():
        return True
    if _NOT_NVSWITCH.search(name):
        return False
    if not _NVSWITCH_MODELS.search(name):
        return False
    # A100 and A800 PCIe cards are named "... PCIe" (handled above); a bare "A100-..." without
    # SXM is a PCIe or a DGX Station part.
    return not re.search(r"\bA[18]00\b", name, re.IGNORECASE)


# NVLink 5 (Blackwell) parts: on their HGX boards the NVLink fabric needs NVLSM with FM.
_NVLINK5_MODELS = re.compile(r"\b(B200|B300|GB200|GB300)\b", re.IGNORECASE)


def wants_nvlsm(setting: Any, fabricmanager: Any, state: dict[str, Any]) -> bool:
    """NVLink Subnet Manager: forced by nvidia_nvlsm True/False; "auto" installs it with Fabric
    Manager when nvidia-smi shows an NVLink-5 GPU (B200, B300, GB200, GB300; their names are
    known once a driver answers: set True for a first run on such a board)."""
    if setting is True or setting is False:
        return setting and wants_fabricmanager(fabricmanager, state)
    if setting != "auto":
        raise ValueError(f"nvidia_nvlsm must be 'auto', True or False, not {setting!r}")
    return wants_fabricmanager(fabricmanager, state) and any(
        _NVLINK5_MODELS.search(gpu["name"]) and not _NOT_NVSWITCH.search(gpu["name"])
        for gpu in state["gpus"])


def wants_fabricmanager(setting: Any, state: dict[str, Any]) -> bool:
    """Fabric Manager: forced by nvidia_fabricmanager True/False; "auto" installs it when the
    PCI bus shows NVSwitch devices (seen without a driver) or when there are 8 or more
    NVSwitch-class GPUs (an HGX/DGX board)."""
    if setting is True or setting is False:
        return setting
    if setting != "auto":
        raise ValueError(f"nvidia_fabricmanager must be 'auto', True or False, not {setting!r}")
    if state["pci"]["nvswitches"] > 0:
        return True
    gpus = state["gpus"]
    return len(gpus) >= 8 and all(is_nvswitch_class(gpu["name"]) for gpu in gpus)


def reboot_reason(state: dict[str, Any]) -> str | None:
    """Why a host must reboot before its GPUs can be used, or None: the installed driver is
    not loaded, another version is loaded, or nouveau holds the GPUs."""
    driver = state["driver"]
    installed, loaded = driver["installed_version"], driver["loaded_version"]
    if state["nouveau_loaded"]:
        return "the nouveau driver is loaded"
    if installed and not loaded:
        return f"NVIDIA driver {installed} is installed but not loaded"
    if installed and loaded and installed != loaded:
        return f"NVIDIA driver {installed} is installed but {loaded} is loaded"
    installed_flavour = driver.get("installed_flavour")
    loaded_flavour = driver.get("loaded_flavour")
    if installed_flavour and loaded_flavour and installed_flavour != loaded_flavour:
        return (
            f"the {installed_flavour} kernel modules are installed but the {loaded_flavour} "
            "ones are loaded"
        )
    return None


def section_lines(lines: list[str], names=_SECTIONS) -> dict[str, list[str]]:
    """{name: its lines} of a fact's output made of `##name` marker lines (one of `names`)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith("##") and line[2:].strip() in names:
            current = line[2:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def _parse_packages(lines: list[str]) -> dict[str, dict[str, Any]]:
    packages = {}
    for line in lines:
        # "<name> <version> <status abbrev>": "ii" installed, "hi" installed and held.
        parts = line.split()
        if len(parts) != 3 or len(parts[2]) < 2:
            continue
        name, version, abbrev = parts
        if abbrev[1] == "i":
            packages[name] = {"version": version, "held": abbrev[0] == "h"}
    return packages


_KERNEL_PACKAGE = re.compile(r"^(nvidia-kernel(-open)?-dkms|nvidia-dkms-\d+(-server)?(-open)?)$")
_USERSPACE_PACKAGE = re.compile(r"^(nvidia-driver-cuda|nvidia-utils-\d+(-server)?)$")


def installed_driver_version(packages: dict[str, dict[str, Any]]) -> str | None:
    """The upstream version of the installed kernel module package (what loads at the next
    boot), or of the nvidia-smi package when no module package is installed."""
    for pattern in (_KERNEL_PACKAGE, _USERSPACE_PACKAGE):
        for name in sorted(packages):
            if pattern.match(name):
                return upstream_version(packages[name]["version"])
    return None


def installed_driver_flavour(packages: dict[str, dict[str, Any]]) -> str | None:
    """"open" or "proprietary" from the installed kernel module package, or None."""
    for name in sorted(packages):
        if _KERNEL_PACKAGE.match(name):
            return "open" if name.endswith("-open") or "-open-" in name else "proprietary"
    return None


def loaded_driver_flavour(proc_line: str) -> str | None:
    """"open" or "proprietary" from /proc/driver/nvidia/version's banner, or None."""
    if "Open Kernel Module" in proc_line:
        return "open"
    if "Kernel Module" in proc_line:
        return "proprietary"
    return None


_PROC_VERSION = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)")


def _yes(value: str) -> bool | None:
    value = value.strip()
    if value == "Enabled":
        return True
    if value == "Disabled":
        return False
    return None


def parse_gpus(lines: list[str]) -> list[dict[str, Any]]:
    """Parse `nvidia-smi --query-gpu=<GPU_QUERY_FIELDS> --format=csv,noheader,nounits`."""
    gpus = []
    for line in lines:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 9 or not parts[0].isdigit():
            continue
        memory = parts[3]
        mig = parts[7]
        gpus.append({
            "index": int(parts[0]),
            "uuid": parts[1],
            "name": parts[2],
            "memory_mib": int(memory) if memory.isdigit() else None,
            "driver_version": parts[4],
            "pci_bus_id": parts[5],
            "persistence_mode": _yes(parts[6]),
            "mig_mode": mig if mig in ("Enabled", "Disabled") else None,
            "compute_cap": parts[8] if re.match(r"^\d+\.\d+$", parts[8]) else None,
        })
    return gpus


def parse_nvidia_host(lines: list[str]) -> dict[str, Any]:
    """Parse the NvidiaHost fact output; never raises on odd or missing sections."""
    sections = section_lines(lines)

    def first(name: str) -> str:
        for line in sections.get(name, []):
            if line.strip():
                return line.strip()
        return ""

    os_parts = (first("os").split(" ") + ["", "", ""])[:3]
    packages = _parse_packages(sections.get("pkg", []))

    loaded = first("module") or None
    if loaded is None:
        match = _PROC_VERSION.search(first("proc"))
        loaded = match.group(1) if match else None

    smi_lines = sections.get("smi", [])
    smi_rc = None
    if smi_lines and smi_lines[-1].startswith("rc="):
        rc_text = smi_lines[-1][3:].strip()
        smi_rc = int(rc_text) if rc_text.isdigit() else None
        smi_lines = smi_lines[:-1]
    # Exit 15 ("GPU is lost", nvidia-smi(1)): one GPU fell off the bus; the others are still
    # listed, and are still this host's GPUs (operations/gpu_health.py reports the lost one).
    gpus = parse_gpus(smi_lines) if smi_rc in (0, SMI_GPU_LOST) else []
    smi_error = None
    if smi_rc == 127:
        smi_error = "nvidia-smi is not installed"
    elif smi_rc != 0:
        text = " ".join(line.strip() for line in smi_lines if line.strip())
        smi_error = f"nvidia-smi exit {smi_rc}: {text}" if text else f"nvidia-smi exit {smi_rc}"
    if loaded is None and gpus:
        versions = sorted({gpu["driver_version"] for gpu in gpus})
        loaded = versions[0] if len(versions) == 1 else None

    cuda = None
    for line in sections.get("cuda", []):
        match = re.match(r"^\s*CUDA Version\s*:\s*(\S+)", line)
        if match and match.group(1) not in ("N/A", "[N/A]"):
            cuda = match.group(1)
            break

    pci_gpus = pci_switches = 0
    for line in sections.get("pci", []):
        parts = line.split()
        if len(parts) != 3:
            continue
        device_class = parts[1].lower()
        if device_class.startswith(("0x0300", "0x0302")):
            pci_gpus += 1
        elif device_class.startswith("0x0680"):
            pci_switches += 1

    blacklist = sections.get("blacklist")
    if blacklist is not None:
        # The command adds a newline after the file (so a file without one cannot swallow the
        # next marker): drop the trailing empty lines.
        while blacklist and not blacklist[-1].strip():
            blacklist = blacklist[:-1]
    keyring_lines = [line.strip() for line in sections.get("keyring", []) if line.strip()]

    return {
        "distro": {"id": os_parts[0], "version_id": os_parts[1], "codename": os_parts[2]},
        "arch": first("arch"),
        "kernel": first("kernel"),
        "nouveau_loaded": first("nouveau") == "loaded",
        "nouveau_blacklist": None if blacklist is None else "\n".join(blacklist) + "\n",
        "packages": packages,
        "cuda_keyring": {
            "present": "present" in keyring_lines,
            "fingerprints": sorted(
                line.split(":", 1)[1].upper() for line in keyring_lines if line.startswith("fpr:")
            ),
        },
        "pci": {"gpus": pci_gpus, "nvswitches": pci_switches},
        "driver": {
            "installed_version": installed_driver_version(packages),
            "installed_flavour": installed_driver_flavour(packages),
            "loaded_version": loaded,
            "loaded_flavour": loaded_driver_flavour(first("proc")),
            "loaded": loaded is not None,
            "cuda_version": cuda,
            "smi_error": smi_error,
        },
        "gpus": gpus,
        "gpu_count": len(gpus),
        "models": sorted({gpu["name"] for gpu in gpus}),
        "mig_enabled": any(gpu["mig_mode"] == "Enabled" for gpu in gpus),
    }


# --- Facts ----------------------------------------------------------------------------------


class NvidiaHost(FactBase):
    """Everything the NVIDIA phases know about a host, in one command: distribution, dpkg
    architecture, running kernel, the loaded driver version (/sys/module/nvidia/version, else
    /proc/driver/nvidia/version, else nvidia-smi), nouveau, NVIDIA PCI devices (GPUs and
    NVSwitches, visible without a driver), installed NVIDIA packages and their hold state, the
    nouveau blacklist file, the CUDA repository keyring, and the GPUs from nvidia-smi. A host
    without a driver, or whose nvidia-smi cannot talk to the driver (exit 9), is "not loaded",
    never a fact error.

    .. code:: python

        {
            "distro": {"id": "ubuntu", "version_id": "22.04", "codename": "jammy"},
            "arch": "amd64", "kernel": "5.15.0-119-generic",
            "driver": {"installed_version": "580.95.05", "loaded_version": "580.95.05",
                       "loaded": True, "cuda_version": "13.0", "smi_error": None},
            "gpus": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA H100 80GB HBM3",
                      "memory_mib": 81559, "persistence_mode": True, "mig_mode": "Disabled", ...}],
            "gpu_count": 8, "models": ["NVIDIA H100 80GB HBM3"], "mig_enabled": False, ...
        }
    """

    def command(self) -> str:
        return (
            "echo '##os'; ( [ -r /etc/os-release ] && . /etc/os-release; "
            'echo "${ID:-} ${VERSION_ID:-} ${VERSION_CODENAME:-}" ); '
            "echo '##arch'; dpkg --print-architecture 2>/dev/null; "
            "echo '##kernel'; uname -r; "
            "echo '##module'; cat /sys/module/nvidia/version 2>/dev/null; "
            "echo '##proc'; head -n 1 /proc/driver/nvidia/version 2>/dev/null; "
            "echo '##nouveau'; if [ -d /sys/module/nouveau ]; then echo loaded; fi; "
            "echo '##pci'; for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] && '
            'echo "${d##*/} $(cat "$d/class") $(cat "$d/device")"; done; '
            "echo '##pkg'; dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' "
            "'nvidia-*' 'cuda-drivers*' 'libnvidia-*' "
            + " ".join(REPO_TOOL_PACKAGES)
            + ' "linux-headers-$(uname -r)" 2>/dev/null; '
            f"if [ -e {NOUVEAU_BLACKLIST} ]; then echo '##blacklist'; "
            f"cat {NOUVEAU_BLACKLIST}; echo; fi; "
            f"echo '##keyring'; if [ -s {CUDA_KEYRING} ]; then echo present; "
            f"gpg --show-keys --with-colons {CUDA_KEYRING} 2>/dev/null | "
            "awk -F: '$1 == \"fpr\" { print \"fpr:\" $10 }'; fi; "
            "echo '##smi'; if command -v nvidia-smi >/dev/null 2>&1; then "
            f"nvidia-smi --query-gpu={GPU_QUERY_FIELDS} --format=csv,noheader,nounits 2>&1; "
            'echo "rc=$?"; echo \'##cuda\'; nvidia-smi -q 2>/dev/null | grep -m 1 "^CUDA Version"; '
            "else echo rc=127; fi; true"
        )

    def process(self, output):
        return parse_nvidia_host(list(output))


# --- Operations -----------------------------------------------------------------------------


@operation()
@fails_only_this_host
def cuda_repository(repo_url: str, key_fingerprint: str):
    """
    Add NVIDIA's CUDA apt repository for the host's distribution and architecture
    (ubuntu2204, ubuntu2404 or debian12; x86_64 or sbsa): its key, checked against
    ``key_fingerprint``, as the keyring /etc/apt/keyrings/nvidia-cuda.gpg, and a deb822 source
    /etc/apt/sources.list.d/nvidia-cuda.sources signed by it. A key with another fingerprint
    (a rotated key) is replaced.

    + repo_url: base of the repository; "<distro>/<arch>/" is appended
    + key_fingerprint: the 40 hex digits of the repository's signing key

    **Example:**

    .. code:: python

        cuda_repository(
            name="NVIDIA CUDA repository",
            repo_url="https://developer.download.nvidia.com/compute/cuda/repos",
            key_fingerprint="EB693B3035CD5710E231E123A4B469963BF863CC",
        )
    """
    state = read_fact(host, NvidiaHost)
    distro = state["distro"]
    try:
        uri = cuda_repo_uri(repo_url, distro["id"], distro["version_id"], state["arch"])
    except ValueError as error:
        raise OperationError(str(error)) from None

    yield from signed_flat_repository(
        "the CUDA repository", uri, state["cuda_keyring"], state["packages"],
        uri + CUDA_KEY_FILE, CUDA_KEYRING, key_fingerprint, CUDA_SOURCES_NAME,
    )


@operation()
@fails_only_this_host
def driver_packages(
    branch: str,
    version: str,
    flavour: str = "open",
    fabricmanager: Any = "auto",
    kernel_headers: bool = True,
    allow_reboot: bool = False,
    nvlsm: Any = "auto",
):
    """
    Install the NVIDIA driver packages at ``version`` (the upstream version; the apt revision
    comes from the repository), the headers of the running kernel for DKMS, and hold them.
    apt-get update runs only when something must be installed.

    A host whose loaded driver is another version is upgraded (or downgraded) only when
    ``allow_reboot`` is set: new user-space libraries beside an old kernel module break every
    GPU program on the host until it reboots.

    + branch: driver branch, e.g. "580"
    + version: exact driver version, e.g. "580.95.05"
    + flavour: "open" (open GPU kernel modules, required from Blackwell on) or "proprietary"
    + fabricmanager: "auto" (NVSwitch systems), True or False
    + nvlsm: "auto" (NVLink-5 GPUs with Fabric Manager), True or False: NVIDIA's NVLink
      Subnet Manager, which Fabric Manager needs on HGX B200/B300 boards
    + kernel_headers: install linux-headers-$(uname -r) so DKMS can build the module
    + allow_reboot: whether this run may reboot the host to load the new driver

    **Example:**

    .. code:: python

        driver_packages(
            name="NVIDIA driver 580.95.05",
            branch="580",
            version="580.95.05",
            flavour="open",
            fabricmanager="auto",
        )
    """
    state = read_fact(host, NvidiaHost)
    installed = state["packages"]
    try:
        wanted = driver_package_names(
            state["distro"]["id"], branch, flavour, wants_fabricmanager(fabricmanager, state),
            wants_nvlsm(nvlsm, fabricmanager, state),
        )
    except ValueError as error:
        raise OperationError(str(error)) from None
    if not version.startswith(f"{branch}."):
        raise OperationError(f"driver version {version} is not on branch {branch}")

    missing = [
        (name, pinned)
        for name, pinned in wanted
        if name not in installed
        or (pinned and upstream_version(installed[name]["version"]) != version)
    ]
    headers = f"linux-headers-{state['kernel']}"
    want_headers = kernel_headers and bool(state["kernel"]) and headers not in installed

    loaded = state["driver"]["loaded_version"]
    if missing and loaded and loaded != version and not allow_reboot:
        raise OperationError(
            f"driver {loaded} is loaded and {version} is wanted: changing it needs a reboot and "
            "nvidia_allow_reboot is False. Drain the host, then run again with "
            "nvidia_allow_reboot = True"
        )

    if missing or want_headers:
        yield "apt-get update"
    if missing:
        # Resolve each pinned package's apt version from the repository: the one whose
        # upstream part is `version` ("580.95.05-1" on Debian, "580.95.05-0ubuntu1" on Ubuntu).
        lines = ["set -e", "specs=''"]
        for name, pinned in missing:
            if not pinned:
                lines.append(f"specs=\"$specs {name}\"")
                continue
            lines += resolve_pin_lines(name, version)
            lines.append(f"specs=\"$specs {name}=$v\"")
        extra = ["--allow-downgrades"] if any(name in installed for name, _ in missing) else []
        # A held package in the way: one being replaced, or the other flavour's kernel
        # modules (which the wanted ones conflict with).
        wanted_names = {name for name, _ in wanted}
        in_the_way = [
            name for name, info in installed.items()
            if info["held"] and name not in wanted_names
            and (_KERNEL_PACKAGE.match(name) or re.match(r"^nvidia-headless-\d+", name))
        ]
        if in_the_way or any(installed.get(name, {}).get("held") for name, _ in missing):
            extra.append("--allow-change-held-packages")
        install = apt_install(["$specs"] + ([headers] if want_headers else []), " ".join(extra))
        lines.append(install)
        yield "; ".join(lines)
    elif want_headers:
        yield apt_install([headers])

    missing_names = {name for name, _ in missing}
    to_hold = [
        name for name, _ in wanted
        if name in missing_names or not installed.get(name, {}).get("held")
    ]
    if to_hold:
        yield StringCommand("apt-mark hold", *to_hold)

    if not missing and not to_hold and not want_headers:
        host.noop(
            f"NVIDIA driver {version} is installed and held: "
            + ", ".join(f"{name} {installed[name]['version']}" for name, _ in wanted)
        )


@operation()
@fails_only_this_host
def nouveau_blacklist():
    """
    Keep the nouveau driver out: /etc/modprobe.d/blacklist-nouveau.conf (staged, then moved
    into place) and the initramfs rebuilt, only when the file is not already as wanted.

    **Example:**

    .. code:: python

        nouveau_blacklist(name="Blacklist nouveau")
    """
    state = read_fact(host, NvidiaHost)
    if state["nouveau_blacklist"] == NOUVEAU_BLACKLIST_TEXT:
        host.noop(f"{NOUVEAU_BLACKLIST} already blacklists nouveau")
        return
    staged = f"{NOUVEAU_BLACKLIST}.pyinfra-new"
    yield StringCommand("install -d -m 0755", posixpath.dirname(NOUVEAU_BLACKLIST))
    yield FileUploadCommand(StringIO(NOUVEAU_BLACKLIST_TEXT), staged)
    yield StringCommand(
        "chown root:root", staged, "&& chmod 0644", staged,
        "&& grep -qx 'blacklist nouveau'", staged,
        "&& mv -f", staged, NOUVEAU_BLACKLIST,
    )
    # The initramfs carries modprobe.d: without a rebuild nouveau still loads at early boot.
    yield "if command -v update-initramfs >/dev/null 2>&1; then update-initramfs -u -k all; fi"


@operation()
@fails_only_this_host
def driver_services(fabricmanager: Any = "auto", running: bool = True):
    """
    Enable (and, with ``running``, start) nvidia-persistenced, and nvidia-fabricmanager on
    NVSwitch systems (or as ``fabricmanager`` forces). Start them only once the driver is
    loaded: both fail against a missing or mismatched driver.

    + fabricmanager: "auto", True or False
    + running: start the services as well as enabling them

    **Example:**

    .. code:: python

        driver_services(name="NVIDIA services", fabricmanager="auto")
    """
    state = read_fact(host, NvidiaHost)
    services = [PERSISTENCED_SERVICE]
    if wants_fabricmanager(fabricmanager, state):
        services.append(FABRICMANAGER_SERVICE)
    commands = []
    for service in services:
        commands += systemd.service._inner(
            service=service, running=True if running else None, enabled=True
        )
    yield from commands
    if not commands:
        host.noop(f"{' and '.join(services)} {'running and ' if running else ''}enabled")


def verify_command(version: str, wait_s: int = VERIFY_WAIT_S) -> str:
    """Wait (bounded) until nvidia-smi answers with exactly `version` on every GPU."""
    return (
        "i=0; until [ \"$(nvidia-smi --query-gpu=driver_version --format=csv,noheader "
        f"2>/dev/null | sort -u)\" = \"{version}\" ]; do i=$((i + 1)); "
        f"if [ $i -ge {max(1, wait_s // 2)} ]; then "
        f"echo \"the loaded NVIDIA driver is not {version}:\" >&2; nvidia-smi >&2; exit 1; fi; "
        "sleep 2; done"
    )


def reboot_commands(reboot_timeout: int, delay: int = 10, interval: int = 5):
    """The commands of a reboot that waits for the host to come back, as pyinfra's
    server.reboot does, but told apart by a marker in /run rather than by /proc/uptime."""

    def remove_askpass(state, host):
        remove_any_sudo_askpass_file(host)

    def wait_for_reboot(state, host):  # pragma: no cover - needs a real reboot
        time.sleep(delay)
        clear_askpass_cache(host)
        host.disconnect()
        deadline = time.monotonic() + reboot_timeout
        while True:
            host.connect(show_errors=False)
            if host.connected and host.get_fact(File, path=REBOOT_MARKER) is None:
                return
            if time.monotonic() > deadline:
                raise Exception(f"the host did not come back within {reboot_timeout}s of a reboot")
            if host.connected:
                host.disconnect()
            time.sleep(interval)

    def forget_sudo(state, host):
        clear_askpass_cache(host)

    yield FunctionCommand(remove_askpass, (), {})
    yield f"touch {REBOOT_MARKER}"
    # Detached, so the SSH channel closes before the machine goes down.
    yield "( sleep 1 && systemctl reboot ) </dev/null >/dev/null 2>&1 &"
    yield FunctionCommand(wait_for_reboot, (), {})
    yield FunctionCommand(forget_sudo, (), {})


@operation(is_idempotent=False)
@fails_only_this_host
def reboot_for_driver(version: str, allow_reboot: bool = False, reboot_timeout: int = 900):
    """
    Reboot the host when its GPUs need it (the installed driver is not the loaded one, or
    nouveau is loaded), wait for it to come back (a marker in /run, emptied by the boot, tells
    a rebooted host from one still going down), and check that nvidia-smi reports
    ``version``. A host whose loaded driver is already right is never rebooted. When a reboot
    is needed and ``allow_reboot`` is False the host fails with "reboot required" (pyinfra runs
    nothing more on it; other hosts go on).

    + version: the driver version that must be loaded, e.g. "580.95.05"
    + allow_reboot: whether the deploy may reboot this host
    + reboot_timeout: seconds to wait for the host to come back

    **Example:**

    .. code:: python

        reboot_for_driver(
            name="Reboot into NVIDIA driver 580.95.05 if needed",
            version="580.95.05",
            allow_reboot=True,
            reboot_timeout=900,
        )
    """
    state = read_fact(host, NvidiaHost)
    reason = reboot_reason(state)
    if reason is None:
        host.noop(
            f"no reboot needed (driver {state['driver']['loaded_version'] or 'none'} loaded)"
        )
        return
    if not allow_reboot:
        raise OperationError(
            f"reboot required: {reason}; nvidia_allow_reboot is False, so this host stops here. "
            "Reboot it (or allow reboots) and run again."
        )
    explain(f"reboot needed: {reason}")
    yield from reboot_commands(reboot_timeout)
    yield verify_command(version)


@operation()
@fails_only_this_host
def verify_driver(version: str):
    """
    Check that the loaded driver is ``version`` on every GPU; a host already right gets no
    command. Otherwise a bounded check runs at execution time and fails the host if nvidia-smi
    does not report ``version``.

    + version: the driver version that must be loaded

    **Example:**

    .. code:: python

        verify_driver(name="NVIDIA driver 580.95.05 loaded", version="580.95.05")
    """
    state = read_fact(host, NvidiaHost)
    gpus = state["gpus"]
    if gpus and all(gpu["driver_version"] == version for gpu in gpus):
        host.noop(
            f"driver {version} is loaded on {len(gpus)} GPU(s): {', '.join(state['models'])}"
        )
        return
    loaded = sorted({gpu["driver_version"] or "none" for gpu in gpus}) or ["no GPU visible"]
    explain(f"loaded driver {', '.join(loaded)}, wanted {version}")
    yield verify_command(version)


# --- Phase ----------------------------------------------------------------------------------


@deploy("NVIDIA driver")
def nvidia_driver(settings) -> PhaseResult:
    """CUDA repository, pinned driver, nouveau out, reboot if (and only if) needed, services.
    Returns a PhaseResult (did anything change) for the GPU container check."""
    version = settings.nvidia_driver_version
    repository = cuda_repository(
        name="NVIDIA CUDA repository",
        repo_url=settings.nvidia_cuda_repo_url,
        key_fingerprint=settings.nvidia_cuda_key_fingerprint,
    )
    packages = driver_packages(
        name=f"NVIDIA driver {version} ({settings.nvidia_driver_flavour} kernel modules)",
        branch=settings.nvidia_driver_branch,
        version=version,
        flavour=settings.nvidia_driver_flavour,
        fabricmanager=settings.nvidia_fabricmanager,
        nvlsm=settings.nvidia_nvlsm,
        kernel_headers=settings.preflight_require_kernel_headers,
        allow_reboot=settings.nvidia_allow_reboot,
    )
    blacklist = nouveau_blacklist(name="Blacklist nouveau")
    enabled = driver_services(
        name="NVIDIA services enabled",
        fabricmanager=settings.nvidia_fabricmanager,
        running=False,
    )
    rebooted = reboot_for_driver(
        name=f"Reboot into NVIDIA driver {version} if needed",
        version=version,
        allow_reboot=settings.nvidia_allow_reboot,
        reboot_timeout=settings.nvidia_reboot_timeout_s,
    )
    verified = verify_driver(name=f"NVIDIA driver {version} loaded", version=version)
    running = driver_services(
        name="NVIDIA services running",
        fabricmanager=settings.nvidia_fabricmanager,
        running=True,
    )
    return PhaseResult([repository, packages, blacklist, enabled, rebooted, verified, running])
