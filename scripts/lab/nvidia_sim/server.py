"""SIMULATOR for the gpu-fleet lab, not NVIDIA software: serves the simulated NVIDIA
repositories to the lab hosts over HTTP, from a container on the lab's bridge network.

The image is built here, offline, FROM the lab's debootstrap'ed base with Debian's
busybox-static added (images.ensure_image: tagged gpufleet-lab-nvidia-sim-http:<hash of the
recipe>, shared by every lab, removed by `lab.py down --purge-images`); `busybox httpd` serves a
directory bind-mounted read-only, from a read-only container. No registry, no network beyond
Debian's mirror. The container carries the label gpufleet.lab=<lab>.

    image = ensure_image(lab)
    url = start(lab, network, ip, serve_dir)      # -> "http://<ip>/"
    stop(lab)                                     # container gone (image kept: shared)
"""

from __future__ import annotations

from pathlib import Path

from scripts.lab import fleet, images
from scripts.lab.fleet import LABEL, docker, exists

ROLE_LABEL = "gpufleet.role"
ROLE = "nvidia-sim-repo"
PORT = 80
IMAGE_NAME = f"{images.IMAGE_PREFIX}nvidia-sim-http"


def image_name(lab: str | None = None) -> str:
    """The tag of the image start() runs: gpufleet-lab-nvidia-sim-http:<hash>, the same for
    every lab (built first when missing, as start() would)."""
    return ensure_image(lab)


def container_name(lab: str, role: str = ROLE) -> str:
    return f"{lab}-{role}"


def render_dockerfile() -> str:
    return images.packages_dockerfile(
        "SIMULATOR for the gpu-fleet lab, not NVIDIA software: serves the simulated NVIDIA "
        "repositories.",
        ["busybox-static"], f"""\
LABEL {ROLE_LABEL}={ROLE} \\
      org.opencontainers.image.description="SIMULATOR for the gpu-fleet lab, not NVIDIA software"
EXPOSE {PORT}
CMD ["/bin/busybox", "httpd", "-f", "-v", "-p", "{PORT}", "-h", "/srv"]
""")


def ensure_image(lab: str | None = None) -> str:
    """The HTTP server image (Debian 12 minbase + busybox-static), tagged
    gpufleet-lab-nvidia-sim-http:<hash of the recipe and base>; built once (about 10 s once the
    base exists), shared by labs."""
    return images.ensure_image_from(IMAGE_NAME, {"Dockerfile": render_dockerfile()},
                                    "busybox httpd for the NVIDIA stand-in repositories")


def start(lab: str, network: str, ip: str, serve_dir: Path, role: str = ROLE) -> str:
    """Run (or keep running) the repository server at ip on network; returns its base URL. A
    running container with the same image, address and directory is kept; another is replaced.

    serve_dir is bind-mounted read-only; rebuilding the repository in place is seen at once.
    `role` names the container and labels it: the Docker stand-in (scripts/lab/docker_sim) is
    served the same way, by a second container.
    """
    serve_dir = Path(serve_dir).resolve()
    name = container_name(lab, role)
    image = ensure_image(lab)
    if fleet.running_as_wanted(name, network, image, ip, [serve_dir]):
        return f"http://{ip}/"
    if exists("container", name):
        docker("rm", "-f", name)
    docker(
        "run", "-d", "--name", name,
        "--label", f"{LABEL}={lab}", "--label", f"{ROLE_LABEL}={role}",
        "--network", network, "--ip", ip,
        "--read-only", "--restart", "unless-stopped",
        "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE",
        "-v", f"{serve_dir}:/srv:ro",
        image,
    )
    return f"http://{ip}/"


def stop(lab: str) -> None:
    """Remove this lab's repository server container (no error when there is none)."""
    fleet.remove_role(lab, ROLE)


def remove_image(lab: str) -> None:
    """Remove the per-lab image (<lab>-nvidia-sim-http:1) this module built before the shared
    one, if it is still there. The shared gpufleet-lab-nvidia-sim-http:<hash> image stays for
    other labs: `lab.py down --purge-images` removes it."""
    legacy = f"{lab}-nvidia-sim-http:1"
    if exists("image", legacy):
        docker("rmi", legacy)
