"""SIMULATOR for the gpu-fleet lab, not NVIDIA software: the lab's simulated GPU "hardware".

A lab host gets /etc/gpu-simulator/gpus.json when the lab creates it, before any deploy runs:
the GPUs are hardware, provisioned by the lab, never by the deploy. The simulated driver
(nvidia-smi, the kernel-module stand-in, nvidia-persistenced) reads this file.

The values are those of a real HGX H100 board: product name, the 81559 MiB that nvidia-smi
reports for an H100 80GB HBM3, compute capability 9.0, the PCI bus ids of an 8-GPU baseboard.
UUIDs and serial numbers are derived from the host name, so a host keeps its GPUs across lab
rebuilds and two hosts never share a UUID.
"""

from __future__ import annotations

import hashlib
import json

# Where the lab puts the file inside each host (the simulated driver reads it from there).
GPUS_JSON_PATH = "/etc/gpu-simulator/gpus.json"

DEFAULT_MODEL = "NVIDIA H100 80GB HBM3"
DEFAULT_MEMORY_MIB = 81559

# PCI bus numbers of the eight GPUs on an HGX H100 baseboard, in nvidia-smi's index order.
_HGX_BUSES = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")

# Per model: (architecture, compute capability, MIG capable, PCI device id, VBIOS).
_MODELS = {
    "NVIDIA H100 80GB HBM3": ("Hopper", "9.0", True, "233010DE", "96.00.99.00.01"),
    "NVIDIA H200": ("Hopper", "9.0", True, "233510DE", "96.00.AF.00.01"),
    "NVIDIA A100-SXM4-80GB": ("Ampere", "8.0", True, "20B210DE", "92.00.45.00.03"),
    "NVIDIA L40S": ("Ada Lovelace", "8.9", False, "26B910DE", "95.02.3C.00.01"),
}


def gpu_uuid(host_name: str, index: int) -> str:
    """GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, the same for the same host and index."""
    digest = hashlib.sha256(f"gpu-fleet-lab/{host_name}/{index}".encode()).hexdigest()
    return f"GPU-{digest[0:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def pci_bus_id(index: int) -> str:
    """nvidia-smi's form of a PCI address: 8-digit domain, bus, device, function."""
    if index < len(_HGX_BUSES):
        bus = _HGX_BUSES[index]
    else:
        bus = f"{0xE0 + index - len(_HGX_BUSES):02X}"
    return f"00000000:{bus}:00.0"


def gpus(
    host_name: str,
    count: int = 2,
    model: str = DEFAULT_MODEL,
    memory_mib: int = DEFAULT_MEMORY_MIB,
) -> list[dict]:
    """The simulated GPUs of one host, as dicts (the content of gpus.json's "gpus")."""
    if not host_name:
        raise ValueError("host_name must not be empty")
    if not 0 <= count <= 16:
        raise ValueError(f"count must be between 0 and 16, got {count}")
    if memory_mib <= 0:
        raise ValueError(f"memory_mib must be positive, got {memory_mib}")
    arch, compute_cap, mig_capable, device_id, vbios = _MODELS.get(
        model, ("Hopper", "9.0", True, "233010DE", "96.00.99.00.01")
    )
    result = []
    for index in range(count):
        digest = hashlib.sha256(f"serial/{host_name}/{index}".encode()).hexdigest()
        result.append(
            {
                "index": index,
                "uuid": gpu_uuid(host_name, index),
                "name": model,
                "memory_total_mib": memory_mib,
                "pci_bus_id": pci_bus_id(index),
                "pci_device_id": device_id,
                "compute_cap": compute_cap,
                "architecture": arch,
                # "Disabled" on a MIG-capable GPU, "[N/A]"-style absence otherwise.
                "mig_mode": "Disabled" if mig_capable else "N/A",
                "serial": str(1650000000000 + int(digest[:8], 16) % 10_000_000_000),
                "vbios_version": vbios,
            }
        )
    return result


def gpus_json(
    host_name: str,
    count: int = 2,
    model: str = DEFAULT_MODEL,
    memory_mib: int = DEFAULT_MEMORY_MIB,
) -> str:
    """The text of /etc/gpu-simulator/gpus.json for one lab host (deterministic)."""
    document = {
        "simulator": "SIMULATOR for the gpu-fleet lab, not NVIDIA hardware",
        "host": host_name,
        "gpus": gpus(host_name, count=count, model=model, memory_mib=memory_mib),
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"
