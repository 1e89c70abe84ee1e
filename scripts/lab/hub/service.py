"""The lab's Hugging Face Hub stand-in (not huggingface.co) as a container on the lab network.

The image is built here, offline: `debootstrap --variant=minbase --include=python3 bookworm` from
Debian's mirror, `docker import`ed (about 40 s, once per lab). The server code (this directory) and
the data directory are bind-mounted read-only into a read-only container, so the container always
runs this checkout's server. Everything carries the labels gpufleet.lab=<lab>, gpufleet.role=hub.

    base_url = start(lab, network, address, data_dir)      # -> "http://<address>"; HF_ENDPOINT
    stop(lab)                                              # container gone; remove_image(lab) too

`data_dir` holds <repo_id>/<revision>/<files> (model.write_repo(data_dir) makes the tiny model).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

LABEL = "gpufleet.lab"
ROLE_LABEL = "gpufleet.role"
ROLE = "hub"
PORT = 80
CODE_DIR = Path(__file__).resolve().parent
MIRROR = os.environ.get("LAB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IN_CONTAINER_CODE = "/opt/gpufleet/scripts/lab/hub"
IN_CONTAINER_DATA = "/srv/hub"
IN_CONTAINER_TOKEN = "/etc/lab-hub/token"


def image_name(lab: str) -> str:
    return f"{lab}-hub-python:1"


def container_name(lab: str) -> str:
    return f"{lab}-hub"


def _docker(*args: str, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"docker {' '.join(args)} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace").strip()


def _exists(kind: str, name: str) -> bool:
    return subprocess.run(["docker", kind, "inspect", name], capture_output=True).returncode == 0


def ensure_image(lab: str) -> str:
    """A Debian 12 minbase + python3 image for this lab, built once (about 40 s)."""
    name = image_name(lab)
    if _exists("image", name):
        return name
    with tempfile.TemporaryDirectory(prefix="lab-hub-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm",
                        str(rootfs), MIRROR], check=True, capture_output=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                     "usr/share/man"):
            subprocess.run(["rm", "-rf", str(rootfs / junk)], check=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        result = subprocess.run(
            ["docker", "import",
             "--change", f"LABEL {LABEL}={lab}",
             "--change", f"LABEL {ROLE_LABEL}={ROLE}",
             "--change", "LABEL org.opencontainers.image.description="
                         "gpu-fleet-lab-hub-stand-in-not-huggingface.co",
             "--change", "ENV PYTHONDONTWRITEBYTECODE=1",
             "--change", "WORKDIR /opt/gpufleet",
             "-", name],
            stdin=tar.stdout, capture_output=True)
        tar.stdout.close()
        if tar.wait() != 0 or result.returncode != 0:
            raise RuntimeError(f"docker import failed: {result.stderr.decode(errors='replace')}")
    return name


def _wanted_mounts(data_dir: Path, token_file: Path | None) -> str:
    mounts = [str(CODE_DIR), str(data_dir)] + ([str(token_file)] if token_file else [])
    return " ".join(sorted(mounts))


def start(lab: str, network: str, address: str, data_dir: Path,
          token_file: Path | None = None, timeout: float = 20) -> str:
    """Run (or keep running) the hub at `address` on `network`; returns its base URL (HF_ENDPOINT).

    With `token_file`, hub requests need `Authorization: Bearer <its content>`. Idempotent: a
    running container with the same address and mounts is kept.
    """
    data_dir = Path(data_dir).resolve()
    token_file = Path(token_file).resolve() if token_file else None
    name = container_name(lab)
    base_url = f"http://{address}" if PORT == 80 else f"http://{address}:{PORT}"
    image = ensure_image(lab)
    if _exists("container", name):
        state = _docker("inspect", "-f",
                        "{{.State.Running}} {{(index .NetworkSettings.Networks \"" + network
                        + "\").IPAddress}}|{{range .Mounts}}{{.Source}} {{end}}", name, check=False)
        running_ip, _, mounts = state.partition("|")
        if running_ip == f"true {address}" and \
                " ".join(sorted(mounts.split())) == _wanted_mounts(data_dir, token_file):
            return base_url
        _docker("rm", "-f", name)
    command = ["python3", "-m", "scripts.lab.hub.server", "--root", IN_CONTAINER_DATA,
               "--host", "0.0.0.0", "--port", str(PORT)]
    volumes = ["-v", f"{CODE_DIR}:{IN_CONTAINER_CODE}:ro",
               "-v", f"{data_dir}:{IN_CONTAINER_DATA}:ro"]
    if token_file:
        volumes += ["-v", f"{token_file}:{IN_CONTAINER_TOKEN}:ro"]
        command += ["--token-file", IN_CONTAINER_TOKEN]
    _docker(
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
        if _docker("inspect", "-f", "{{.State.Running}}", name, check=False) != "true":
            break
        time.sleep(0.2)
    logs = subprocess.run(["docker", "logs", "--tail", "20", name], capture_output=True)
    raise RuntimeError(f"lab hub {name} did not start: "
                       f"{(logs.stdout + logs.stderr).decode(errors='replace')}")


def stop(lab: str) -> None:
    """Remove this lab's hub container (no error when there is none)."""
    ids = _docker("ps", "-aq", "--filter", f"label={LABEL}={lab}",
                  "--filter", f"label={ROLE_LABEL}={ROLE}")
    for cid in ids.split():
        _docker("rm", "-f", cid)


def remove_image(lab: str) -> None:
    """Remove this lab's hub image (after stop)."""
    if _exists("image", image_name(lab)):
        _docker("rmi", image_name(lab))
