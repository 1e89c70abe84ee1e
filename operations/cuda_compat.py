"""Which NVIDIA driver an engine image needs: refused before any host is touched, not found when
its container will not start.

An image built on NVIDIA's CUDA base images carries NVIDIA_REQUIRE_CUDA (`cuda>=12.9 ...`), and
the container toolkit refuses to start it on a driver whose CUDA version is older
(`nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.9`): on a Swarm fleet,
a task that fails on every node, over and over. The deploy knows the image and the pinned driver
before it connects, so it checks them against two tables:

- `stack_image_cuda` (group data): the CUDA version an image requires, its NVIDIA_REQUIRE_CUDA
  (`docker image inspect IMAGE` shows it), by image reference without its digest;
- `CUDA_MIN_DRIVER` below: the oldest Linux driver of each CUDA version, from NVIDIA's CUDA
  Toolkit Release Notes, "CUDA Toolkit and Corresponding Driver Versions" (the GA release).

An image the table does not list is not checked (README, "Engine images and the driver").
"""

from __future__ import annotations

from typing import Iterable

# CUDA version -> the oldest Linux x86_64 driver that supports it (CUDA Toolkit Release Notes,
# table "CUDA Toolkit and Corresponding Driver Versions", each version's GA row).
CUDA_MIN_DRIVER = {
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "530.30.02",
    "12.2": "535.54.03",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}


def version_tuple(version: str) -> tuple[int, ...]:
    """`580.95.05` -> (580, 95, 5); what a driver version compares as."""
    return tuple(int(part) for part in version.split("."))


def image_without_digest(image: str) -> str:
    """`vllm/vllm-openai:v0.11.0@sha256:...` -> `vllm/vllm-openai:v0.11.0`: the table names
    images by tag (a digest pins the same build)."""
    return image.split("@", 1)[0]


def cuda_problem(cuda: str) -> str | None:
    """A CUDA version the driver table knows."""
    if cuda in CUDA_MIN_DRIVER:
        return None
    return f"a CUDA version of the driver table: {', '.join(CUDA_MIN_DRIVER)} (not {cuda!r})"


def driver_problem(driver_version: str, images: Iterable[tuple[str, str]],
                   image_cuda: dict[str, str]) -> str | None:
    """What the pinned driver must be for every image it will run, or None when it is new
    enough. `images`: (who uses it, image reference) pairs."""
    for who, image in images:
        cuda = image_cuda.get(image_without_digest(image))
        if cuda is None or cuda not in CUDA_MIN_DRIVER:
            continue
        needed = CUDA_MIN_DRIVER[cuda]
        if version_tuple(driver_version) < version_tuple(needed):
            return (f"{needed} or later: {who} runs {image}, built on CUDA {cuda} "
                    f"(stack_image_cuda), and CUDA {cuda} needs that driver (CUDA Toolkit Release "
                    f"Notes); the container toolkit would refuse to start it")
    return None
