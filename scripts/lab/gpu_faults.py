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
