"""GPU health: which GPUs of a host are fit to serve, read in one round trip, reported per GPU
(host, index, UUID, reason), and kept out of Swarm's GPU pool while they are not.

What makes a GPU unhealthy is the table `unhealthy_reasons` applies (README, "GPU health", cites
NVIDIA for each row): the GPU is lost (nvidia-smi exit 15), uncorrected ECC errors since the
driver loaded, retired pages or remapped rows pending, a failed row remapping, a recovery action
the driver asks for, or one of the Xid events of `XID_UNHEALTHY` in the kernel log since boot.

How an unhealthy GPU is kept out: Swarm hands GPUs to tasks from the generic resources each
node advertises (daemon.json `node-generic-resources`, operations/toolkit.py). The deploy
advertises only the healthy ones (`serving_gpus`), so no engine task is given the bad GPU; the
changed daemon.json restarts Docker on that host, and its tasks start again on the GPUs it
still advertises. Once the GPU reads healthy (a GPU reset clears volatile ECC counts and
activates pending remaps; a reboot starts a new kernel log), the next run advertises it again.
"""

from __future__ import annotations

import re
from typing import Any

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy, operation

from operations.docker_engine import DaemonJson
from operations.nvidia import NvidiaHost, section_lines
from operations.phase import PhaseResult, finding, read_fact

# The generic resource kind Swarm hands GPUs out as: daemon.json advertises each GPU as
# NVIDIA-GPU=<uuid> (operations/toolkit.py).
GPU_RESOURCE_KIND = "NVIDIA-GPU"

# nvidia-smi(1) query fields, one query each so that a field an older driver does not know
# costs only its own column: per GPU health counters, the row remapper, the recovery action.
HEALTH_FIELDS = "index,uuid,pci.bus_id,ecc.errors.uncorrected.volatile.total,retired_pages.pending"
REMAP_FIELDS = "gpu_bus_id,remapped_rows.uncorrectable,remapped_rows.pending,remapped_rows.failure"
RECOVERY_FIELDS = "pci.bus_id,gpu_recovery_action"

# Xid events that take a GPU out of serving until it is reset or the host reboots, with what
# NVIDIA's Xid catalogue says each means (docs.nvidia.com/deploy/xid-errors). Xid 63 and 94 are
# not here: they mark a row for remapping and the remapper's own pending flag says so.
XID_UNHEALTHY = {
    48: "double-bit ECC error",
    64: "row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    154: "GPU recovery action changed",
}

_SECTIONS = ("health", "remap", "recovery", "xid")
_LOST = re.compile(r"Unable to determine the device handle for GPU\s*([0-9A-Fa-f:.]+):\s*(.*)")
_XID = re.compile(r"NVRM: Xid \((?:PCI:)?([0-9A-Fa-f:.]+)\): (\d+)(?:, (.*))?")
_BUS = re.compile(r"^(?:([0-9A-Fa-f]+):)?([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})(?:\.[0-7])?$")


def bus_key(text: str) -> str | None:
    """A PCI address in one form whatever wrote it: nvidia-smi's `00000000:18:00.0` and the
    kernel log's `0000:18:00` are both `0000:18:00`."""
    match = _BUS.match(text.strip())
    if not match:
        return None
    domain, bus, device = match.groups()
    return f"{int(domain or '0', 16):04x}:{bus.lower()}:{device.lower()}"


def _flag(value: str) -> bool | None:
    value = value.strip()
    if value in ("Yes", "1", "True", "Active"):
        return True
    if value in ("No", "0", "False", "None"):
        return False
    return None


def _count(value: str) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() else None


def _sections(lines: list[str]) -> dict[str, tuple[list[str], int | None]]:
    """{section: (lines, exit status)} for the fact's output."""
    result = {}
    for name, body in section_lines(lines, _SECTIONS).items():
        rc = None
        if body and body[-1].startswith("rc="):
            rc = _count(body[-1][3:])
            body = body[:-1]
        result[name] = (body, rc)
    return result


def parse_gpu_health(lines: list[str]) -> dict[str, Any]:
    """Parse GpuHealth's output; never raises on odd or missing sections."""
    sections = _sections(lines)
    health_lines, health_rc = sections.get("health", ([], None))
    if health_rc is None and not health_lines:
        return {"available": False, "error": "nvidia-smi is not installed", "gpus": []}
    gpus: dict[str, dict[str, Any]] = {}
    errors = []
    for line in health_lines:
        lost = _LOST.search(line)
        if lost and bus_key(lost.group(1)):
            key = bus_key(lost.group(1))
            gpus[key] = {"index": None, "uuid": None, "pci_bus_id": lost.group(1), "lost": True,
                         "lost_error": lost.group(2).strip().rstrip(".")}
            continue
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 5 or not parts[0].isdigit() or not bus_key(parts[2]):
            if line.strip():
                errors.append(line.strip())
            continue
        gpus[bus_key(parts[2])] = {
            "index": int(parts[0]), "uuid": parts[1], "pci_bus_id": parts[2], "lost": False,
            "ecc_uncorrected": _count(parts[3]), "retired_pages_pending": _flag(parts[4]),
        }
    if health_rc not in (0, 15) and not gpus:
        return {"available": False, "gpus": [],
                "error": f"nvidia-smi exit {health_rc}: {' '.join(errors)}".strip()}

    remap_lines, remap_rc = sections.get("remap", ([], None))
    for line in remap_lines if remap_rc in (0, 15) else []:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 4 and bus_key(parts[0]) in gpus:
            gpus[bus_key(parts[0])].update({
                "remapped_rows_uncorrectable": _count(parts[1]),
                "remap_pending": _flag(parts[2]), "remap_failed": _flag(parts[3])})

    recovery_lines, recovery_rc = sections.get("recovery", ([], None))
    for line in recovery_lines if recovery_rc in (0, 15) else []:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and bus_key(parts[0]) in gpus and not parts[1].startswith("["):
            gpus[bus_key(parts[0])]["recovery_action"] = parts[1]

    xids: dict[str, list[int]] = {}
    for line in sections.get("xid", ([], None))[0]:
        match = _XID.search(line)
        if match and bus_key(match.group(1)):
            xids.setdefault(bus_key(match.group(1)), []).append(int(match.group(2)))
    for key, codes in xids.items():
        gpus.setdefault(key, {"index": None, "uuid": None, "pci_bus_id": key, "lost": False})
        gpus[key]["xids"] = sorted(set(codes))

    ordered = sorted(gpus.values(), key=lambda g: (g["index"] is None, g["index"] or 0,
                                                   g["pci_bus_id"]))
    return {"available": True, "error": None, "gpus": ordered}


def unhealthy_reasons(gpu: dict[str, Any]) -> list[str]:
    """Why a GPU must not serve, in words; empty when it may (README, "GPU health")."""
    reasons = []
    if gpu.get("lost"):
        reasons.append(f"lost: nvidia-smi cannot reach it ({gpu.get('lost_error') or 'GPU is lost'})")
    if gpu.get("ecc_uncorrected"):
        reasons.append(f"{gpu['ecc_uncorrected']} uncorrected ECC error(s) since the driver loaded")
    if gpu.get("retired_pages_pending"):
        reasons.append("retired pages pending (a reset or reboot retires them)")
    if gpu.get("remap_pending"):
        reasons.append("row remapping pending (a GPU reset activates it)")
    if gpu.get("remap_failed"):
        reasons.append("row remapping failed (NVIDIA: the GPU needs service)")
    action = gpu.get("recovery_action")
    if action and action not in ("None", "N/A"):
        reasons.append(f"the driver asks for recovery: {action}")
    for code in gpu.get("xids", []):
        if code in XID_UNHEALTHY:
            reasons.append(f"Xid {code} since boot ({XID_UNHEALTHY[code]})")
    return reasons


def unhealthy_gpus(health: dict[str, Any]) -> list[dict[str, Any]]:
    """[{index, uuid, pci_bus_id, reasons}] of the GPUs that must not serve."""
    return [{"index": gpu["index"], "uuid": gpu["uuid"], "pci_bus_id": gpu["pci_bus_id"],
             "reasons": reasons}
            for gpu in health.get("gpus", []) if (reasons := unhealthy_reasons(gpu))]


def serving_gpus(gpus: list[dict[str, Any]], health: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPUs (NvidiaHost's) that may serve: those no health rule keeps out."""
    bad = {gpu["uuid"] for gpu in unhealthy_gpus(health) if gpu["uuid"]}
    bad_buses = {bus_key(gpu["pci_bus_id"]) for gpu in unhealthy_gpus(health)}
    return [gpu for gpu in gpus
            if gpu["uuid"] not in bad and bus_key(gpu.get("pci_bus_id") or "") not in bad_buses]


def serving_view(nvidia: dict[str, Any], health: dict[str, Any] | None) -> dict[str, Any]:
    """A host's NvidiaHost fact with only the GPUs it may advertise to Swarm (`health` None:
    keep_out is off, all of them): what a node is labelled and sized by."""
    if health is None:
        return nvidia
    return {**nvidia, "gpus": serving_gpus(nvidia.get("gpus") or [], health)}


def advertised_uuids(daemon: dict[str, Any]) -> list[str]:
    """The GPU UUIDs a DaemonJson fact's `node-generic-resources` advertises to Swarm."""
    prefix = f"{GPU_RESOURCE_KIND}="
    return [r[len(prefix):] for r in (daemon.get("config") or {}).get("node-generic-resources") or []
            if isinstance(r, str) and r.startswith(prefix)]


def name_lost_gpus(unhealthy: list[dict[str, Any]], advertised: list[str],
                   listed: list[str]) -> list[dict[str, Any]]:
    """A lost GPU has no UUID in nvidia-smi's answer: when exactly one is lost and exactly one
    UUID that daemon.json advertises is no longer listed, that UUID is the lost GPU's."""
    lost = [gpu for gpu in unhealthy if gpu["uuid"] is None]
    missing = sorted(set(advertised) - set(listed))
    if len(lost) == 1 and len(missing) == 1:
        lost[0]["uuid"] = missing[0]
    return unhealthy


def describe(gpu: dict[str, Any]) -> str:
    """`GPU 1 GPU-5f2c... (00000000:2A:00.0): reason; reason`: what an operator acts on."""
    index = "?" if gpu["index"] is None else gpu["index"]
    uuid = gpu["uuid"] or "UUID unknown"
    return f"GPU {index} {uuid} ({gpu['pci_bus_id']}): {'; '.join(gpu['reasons'])}"


# --- Fact -----------------------------------------------------------------------------------


class GpuHealth(FactBase):
    """The health of every GPU of a host in one command: nvidia-smi's uncorrected ECC count
    since the driver loaded and retired pages pending, the row remapper (pending, failed), the
    recovery action the driver asks for, lost GPUs (nvidia-smi exit 15), and the NVRM Xid lines
    of the kernel log since boot (journalctl, else dmesg). Without nvidia-smi: "available" False.

    .. code:: python

        {"available": True, "error": None, "gpus": [
            {"index": 0, "uuid": "GPU-...", "pci_bus_id": "00000000:18:00.0", "lost": False,
             "ecc_uncorrected": 0, "retired_pages_pending": None, "remap_pending": False,
             "remap_failed": False, "remapped_rows_uncorrectable": 0, "recovery_action": "None",
             "xids": [79]}]}
    """

    def command(self) -> str:
        def query(flag: str, fields: str) -> str:
            return f"nvidia-smi {flag}={fields} --format=csv,noheader,nounits 2>&1; echo \"rc=$?\"; "

        return (
            "if command -v nvidia-smi >/dev/null 2>&1; then "
            "echo '##health'; " + query("--query-gpu", HEALTH_FIELDS)
            + "echo '##remap'; " + query("--query-remapped-rows", REMAP_FIELDS)
            + "echo '##recovery'; " + query("--query-gpu", RECOVERY_FIELDS)
            + "fi; echo '##xid'; "
            "{ journalctl -k -b -o cat --no-pager 2>/dev/null || dmesg 2>/dev/null; } "
            "| grep -F 'NVRM: Xid' | tail -n 200; true"
        )

    def process(self, output):
        return parse_gpu_health(list(output))


# --- Operation ------------------------------------------------------------------------------


@operation(is_idempotent=True)
def gpu_health(kept_out: bool = True):
    """Report every unhealthy GPU of this host, one line each (host, index, UUID, reason): a
    finding in the deploy's output, and drift for the drift check (exit 2). Changes nothing
    itself: the Docker phase advertises only the healthy GPUs to Swarm when `kept_out`.

    .. code:: python

        gpu_health(name="GPU health", kept_out=True)
    """
    health = read_fact(host, GpuHealth)
    if not health["available"]:
        host.noop(f"GPU health not read: {health['error']}")
        return
    unhealthy = host_unhealthy_gpus()
    if not unhealthy:
        host.noop(f"{len(health['gpus'])} GPU(s), every one healthy")
        return
    action = "kept out of serving" if kept_out else "still serving (gpu_health_keep_out = False)"
    for gpu in unhealthy:
        text = f"unhealthy {describe(gpu)}: {action}"
        # In the run's output at every verbosity (a noop's words show only with -v), once:
        # when the run executes it (pyinfra may also run an operation's body while planning).
        if getattr(host.state, "is_executing", False):
            host.log_styled(text, fg="yellow", log_func=logger.warning)
        finding(text)
    yield from ()


def host_unhealthy_gpus(target=None) -> list[dict[str, Any]]:
    """The unhealthy GPUs of a host (default: the current one), lost ones named when possible."""
    target = target or host
    unhealthy = unhealthy_gpus(read_fact(target, GpuHealth))
    if any(gpu["uuid"] is None for gpu in unhealthy):
        listed = [gpu["uuid"] for gpu in read_fact(target, NvidiaHost)["gpus"]]
        unhealthy = name_lost_gpus(unhealthy, advertised_uuids(read_fact(target, DaemonJson)),
                                   listed)
    return unhealthy


def current_serving_gpus(keep_out: bool = True) -> list[dict[str, Any]]:
    """The current host's GPUs that Swarm may hand to tasks, read now (at execution time, after
    the driver phase): all of NvidiaHost's, less the unhealthy ones when `keep_out`."""
    gpus = read_fact(host, NvidiaHost)["gpus"]
    return serving_gpus(gpus, read_fact(host, GpuHealth)) if keep_out else gpus


@deploy("GPU health")
def gpu_health_phase(settings) -> PhaseResult:
    return PhaseResult([gpu_health(name="GPU health", kept_out=settings.gpu_health_keep_out)])
