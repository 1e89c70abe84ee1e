"""LAB FAULTS on the simulated GPUs (gpu-fleet lab, not NVIDIA software): shell scripts run as
root on a lab host.

PULL_GPUS_AT_BOOT: the host's simulated GPUs are gone from its next boot on, as a GPU that does
not come back from a reboot: a unit moves /etc/gpu-simulator/gpus.json away before the simulated
module loads (scripts/lab/nvidia_sim: no file, no GPUs, the module never loads, nvidia-smi
fails). Until then the host keeps its GPUs. RETURN_GPUS undoes it (the next boot has them).
"""

GPUS_FILE = "/etc/gpu-simulator/gpus.json"
# LAB FAULT: the host's simulated GPUs are gone from its next boot on (a GPU that does not come
# back from a reboot): a unit that moves gpus.json away before the simulated module loads.
PULL_UNIT = "lab-fault-gpus-gone.service"
PULL_GPUS_AT_BOOT = f"""cat > /etc/systemd/system/{PULL_UNIT} <<'UNIT'
[Unit]
Description=LAB FAULT (gpu-fleet lab): the simulated GPUs are gone at boot
DefaultDependencies=no
Before=nvidia-sim-kmod.service
ConditionPathExists={GPUS_FILE}
[Service]
Type=oneshot
ExecStart=/bin/mv {GPUS_FILE} {GPUS_FILE}.gone
[Install]
WantedBy=sysinit.target
UNIT
systemctl daemon-reload && systemctl enable {PULL_UNIT}"""
RETURN_GPUS = (f"systemctl disable {PULL_UNIT}; rm -f /etc/systemd/system/{PULL_UNIT}; "
               f"systemctl daemon-reload; [ -e {GPUS_FILE}.gone ] && mv {GPUS_FILE}.gone {GPUS_FILE}; true")


# LAB FAULTS per simulated GPU, read by the simulated nvidia-smi (scripts/lab/nvidia_sim): one
# key=value file per GPU index. A failed row remapping is permanent (kept in /etc, across
# reboots); the others live in /run, so a reboot clears them, and so does a GPU reset
# (`nvidia-smi -r -i INDEX`), except a lost GPU's, which only a reboot brings back.
FAULTS_KEPT = "/etc/gpu-simulator/faults"
FAULTS_VOLATILE = "/run/nvidia-sim/faults"
# lab.py gpu-fault KIND -> (the simulator's key, its value when none is given, kept across reboots)
FAULT_KINDS = {
    "ecc": ("ecc_uncorrected", "2", False),
    "remap-pending": ("remap_pending", "1", False),
    "remap-failed": ("remap_failed", "1", True),
    "recovery": ("recovery_action", "Reset", False),
    "lost": ("lost", "1", False),
    # What monitoring sees (scripts/lab/dcgm: the dcgm-exporter stand-in): the last XID the
    # driver reported (79: fallen off the bus), and a GPU running hot (degrees C).
    "xid": ("xid", "79", False),
    "temperature": ("temperature", "92", False),
}


def fault_script(index: int, fault: str) -> str:
    """The root shell script that injects `fault` (KIND or KIND=VALUE, or "clear") on GPU
    `index` of a lab host. Raises ValueError on a fault it does not know."""
    if fault == "clear":
        return f"rm -f {FAULTS_KEPT}/{index} {FAULTS_VOLATILE}/{index}"
    kind, _, value = fault.partition("=")
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown GPU fault {fault!r}: expected one of "
                         f"{', '.join(FAULT_KINDS)} (KIND or KIND=VALUE), or clear")
    key, default, kept = FAULT_KINDS[kind]
    value = value or default
    if not all(c.isalnum() or c in " ._-" for c in value):
        raise ValueError(f"GPU fault value {value!r}: letters, digits, spaces, '.', '_', '-' only")
    where = FAULTS_KEPT if kept else FAULTS_VOLATILE
    return (f"mkdir -p {where} && touch {where}/{index} && "
            f"sed -i '/^{key}=/d' {where}/{index} && echo '{key}={value}' >> {where}/{index}")
