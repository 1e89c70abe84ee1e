"""Stand-in services on the lab network, started by `scripts/lab.py up` before the deploy.

Each returns the configuration keys that point the production code at it: they are written to
.lab/<lab>/hosts.json under "settings", and inventories/lab.py hands them to every lab host as
host data. That is the only way a stand-in enters a run: production code knows none of them.

    .2  the NVIDIA stand-in: signed apt repositories laid out like NVIDIA's (scripts/lab/nvidia_sim)
    .4  the registry stand-in: images the lab builds offline, pulled by the hosts (scripts/lab/registry)
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from scripts.lab import fleet

NVIDIA_REPO_OCTET = 2
REGISTRY_OCTET = 4
# The image of the GPU container check: a plain Debian userland, as NVIDIA's own checks use a
# plain distribution image (the runtime brings nvidia-smi into the container).
VERIFY_IMAGE = "lab/debian:bookworm"


def start(lab: str, subnet: ipaddress.IPv4Network, state_dir: Path) -> dict[str, object]:
    """Start (or keep) every stand-in the deploy uses; return the settings that select them."""
    return {**nvidia_repositories(lab, subnet, state_dir), **registry(lab, subnet)}


def stop(lab: str) -> None:
    """What `down` cannot find by label alone (this machine's push tags of the registry)."""
    from scripts.lab.registry import service as registry_service

    registry_service.remove(lab)


def nvidia_repositories(lab: str, subnet: ipaddress.IPv4Network, state_dir: Path) -> dict[str, object]:
    from scripts.lab.nvidia_sim import repo, server

    served = state_dir / "nvidia-sim" / "repo"
    paths = repo.build_repo(served, state_dir / "nvidia-sim" / "gnupg")
    base = server.start(lab, fleet.network_name(lab), fleet.service_address(subnet, NVIDIA_REPO_OCTET), served)
    fleet.say(f"NVIDIA stand-in repositories at {base} (SIMULATOR, signed with the lab's own key)")
    return nvidia_settings(base, paths)


def nvidia_settings(base: str, paths: dict) -> dict[str, object]:
    """The production keys that point at the stand-in (same layout as NVIDIA's servers, the lab's
    signing key instead of NVIDIA's)."""
    return {
        "nvidia_cuda_repo_url": f"{base}compute/cuda/repos",
        "nvidia_cuda_key_fingerprint": paths["fingerprint"],
        "nvidia_container_toolkit_repo_url": f"{base}libnvidia-container/stable/deb",
        "nvidia_container_toolkit_key_url": f"{base}{paths['toolkit_key']}",
        "nvidia_container_toolkit_key_fingerprint": paths["fingerprint"],
    }


def registry(lab: str, subnet: ipaddress.IPv4Network) -> dict[str, object]:
    from scripts.lab import images
    from scripts.lab.registry import service as registry_service

    address = fleet.service_address(subnet, REGISTRY_OCTET)
    reg = registry_service.start(lab, fleet.network_name(lab), address)
    verify_image = registry_service.push(lab, images.ensure_base(), VERIFY_IMAGE, reg)
    fleet.say(f"registry stand-in at {reg['address']} (plain HTTP, lab hosts only)")
    return registry_settings(reg["address"], verify_image)


def registry_settings(address: str, verify_image: str) -> dict[str, object]:
    """Lab hosts pull from the stand-in over plain HTTP, which dockerd allows only for registries
    it is told about."""
    return {
        "docker_daemon_config": {"insecure-registries": [address]},
        "nvidia_container_verify_image": verify_image,
    }
