"""The lab's Hugging Face Hub stand-in (not huggingface.co) as a container on the lab network.

The image is built here, offline, FROM the lab's debootstrap'ed base with python3 added
(images.ensure_image: tagged gpufleet-lab-hub:<hash of the recipe>, shared by every lab, removed
by `lab.py down --purge-images`). The server code (this directory) and the data directory are
bind-mounted read-only into a read-only container, so the container always runs this checkout's
server. The container carries the labels gpufleet.lab=<lab>, gpufleet.role=hub.

    base_url = start(lab, network, address, data_dir)      # -> "http://<address>"; HF_ENDPOINT
    stop(lab)                                              # container gone (image kept: shared)

`data_dir` holds <repo_id>/<revision>/<files> (model.write_repo(data_dir) makes the tiny model).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from scripts.lab import fleet, images
from scripts.lab.fleet import LABEL, LabError, docker, exists

ROLE_LABEL = "gpufleet.role"
ROLE = "hub"
PORT = 80
CODE_DIR = Path(__file__).resolve().parent
IMAGE_NAME = f"{images.IMAGE_PREFIX}hub"
IN_CONTAINER_CODE = "/opt/gpufleet/scripts/lab/hub"
IN_CONTAINER_DATA = "/srv/hub"
IN_CONTAINER_TOKEN = "/etc/lab-hub/token"


def image_name(lab: str | None = None) -> str:
    """The tag of the image start() runs: gpufleet-lab-hub:<hash>, the same for every lab
    (built first when missing, as start() would)."""
    return ensure_image(lab)


def container_name(lab: str) -> str:
    return f"{lab}-hub"


def render_dockerfile() -> str:
    return images.packages_dockerfile(
        "gpu-fleet lab hub: LAB STAND-IN for the Hugging Face Hub (not huggingface.co).",
        ["python3"], f"""\
LABEL {ROLE_LABEL}={ROLE} \\
      org.opencontainers.image.description="gpu-fleet lab hub stand-in, not huggingface.co"
ENV PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/gpufleet
""")


def ensure_image(lab: str | None = None) -> str:
    """The hub image (Debian 12 minbase + python3), tagged gpufleet-lab-hub:<hash of the recipe
    and base>; built once (about 15 s once the base exists), shared by labs."""
    return images.ensure_image_from(IMAGE_NAME, {"Dockerfile": render_dockerfile()},
                                    "python3 for the Hugging Face Hub stand-in")


def start(lab: str, network: str, address: str, data_dir: Path,
          token_file: Path | None = None, timeout: float = 20) -> str:
    """Run (or keep running) the hub at `address` on `network`; returns its base URL (HF_ENDPOINT).

    With `token_file`, hub requests need `Authorization: Bearer <its content>`. Idempotent: a
    running container with the same image, address and mounts is kept.
    """
    data_dir = Path(data_dir).resolve()
    token_file = Path(token_file).resolve() if token_file else None
    name = container_name(lab)
    base_url = f"http://{address}" if PORT == 80 else f"http://{address}:{PORT}"
    image = ensure_image(lab)
    mounts = [CODE_DIR, data_dir] + ([token_file] if token_file else [])
    if fleet.running_as_wanted(name, network, image, address, mounts):
        return base_url
    if exists("container", name):
        docker("rm", "-f", name)
    command = ["python3", "-m", "scripts.lab.hub.server", "--root", IN_CONTAINER_DATA,
               "--host", "0.0.0.0", "--port", str(PORT)]
    volumes = ["-v", f"{CODE_DIR}:{IN_CONTAINER_CODE}:ro",
               "-v", f"{data_dir}:{IN_CONTAINER_DATA}:ro"]
    if token_file:
        volumes += ["-v", f"{token_file}:{IN_CONTAINER_TOKEN}:ro"]
        command += ["--token-file", IN_CONTAINER_TOKEN]
    docker(
        "run", "-d", "--name", name,
        "--label", f"{LABEL}={lab}", "--label", f"{ROLE_LABEL}={ROLE}",
        "--network", network, "--ip", address,
        "--read-only", "--restart", "unless-stopped",
        "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE",
        *volumes, image, *command,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = subprocess.run(["docker", "logs", name], capture_output=True)
        if b" serving " in logs.stderr + logs.stdout:
            return base_url
        if docker("inspect", "-f", "{{.State.Running}}", name, check=False) != "true":
            break
        time.sleep(0.2)
    logs = subprocess.run(["docker", "logs", "--tail", "20", name], capture_output=True)
    raise LabError(f"lab hub {name} did not start: "
                   f"{(logs.stdout + logs.stderr).decode(errors='replace')}")


def stop(lab: str) -> None:
    """Remove this lab's hub container (no error when there is none)."""
    fleet.remove_role(lab, ROLE)


def remove_image(lab: str) -> None:
    """Remove the per-lab image (<lab>-hub-python:1) this module built before the shared one,
    if it is still there. The shared gpufleet-lab-hub:<hash> image stays for other labs: `lab.py
    down --purge-images` removes it."""
    legacy = f"{lab}-hub-python:1"
    if exists("image", legacy):
        docker("rmi", legacy)
