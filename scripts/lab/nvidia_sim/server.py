"""SIMULATOR for the gpu-fleet lab, not NVIDIA software: serves the simulated NVIDIA
repositories to the lab hosts over HTTP, from a container on the lab's bridge network.

The image is made here, offline: Debian's busybox-static package (fetched with `apt-get
download`, the way every other lab package comes from Debian's mirror) unpacked into a one-file
root filesystem and `docker import`ed; `busybox httpd` serves a directory bind-mounted
read-only, from a read-only container. No registry, no network beyond Debian's mirror.
Everything carries the label gpufleet.lab=<lab>.

    image = ensure_image(lab)
    url = start(lab, network, ip, serve_dir)      # -> "http://<ip>/"
    stop(lab)                                     # container gone; remove_image(lab) for the image
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

LABEL = "gpufleet.lab"
ROLE_LABEL = "gpufleet.role"
ROLE = "nvidia-sim-repo"
PORT = 80


def image_name(lab: str) -> str:
    return f"{lab}-nvidia-sim-http:1"


def container_name(lab: str) -> str:
    return f"{lab}-nvidia-sim-repo"


def _docker(*args: str, check: bool = True, input: bytes | None = None) -> str:
    result = subprocess.run(["docker", *args], input=input, capture_output=True)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"docker {' '.join(args)} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace").strip()


def _exists(kind: str, name: str) -> bool:
    return subprocess.run(["docker", kind, "inspect", name], capture_output=True).returncode == 0


def ensure_image(lab: str) -> str:
    """The HTTP server image for this lab, built once (about 2 s once the .deb is fetched)."""
    name = image_name(lab)
    if _exists("image", name):
        return name
    with tempfile.TemporaryDirectory(prefix="nvsim-httpd-") as tmp:
        tmpdir = Path(tmp)
        subprocess.run(["apt-get", "download", "busybox-static"], cwd=tmpdir, check=True,
                       capture_output=True)
        deb = next(tmpdir.glob("busybox-static_*.deb"))
        unpacked = tmpdir / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        busybox = next(p for p in (unpacked / "bin/busybox", unpacked / "usr/bin/busybox")
                       if p.exists())
        rootfs = tmpdir / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            for directory in ("bin", "srv", "tmp"):
                info = tarfile.TarInfo(directory)
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if directory == "tmp" else 0o755
                tar.addfile(info)
            tar.add(busybox, arcname="bin/busybox")
            for applet in ("sh", "httpd", "wget", "ls", "cat"):
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type = tarfile.SYMTYPE
                link.linkname = "busybox"
                tar.addfile(link)
        _docker(
            "import",
            "--change", f"LABEL {LABEL}={lab}",
            "--change", f"LABEL {ROLE_LABEL}={ROLE}",
            "--change", "LABEL org.opencontainers.image.description="
                        "SIMULATOR-for-the-gpu-fleet-lab-not-NVIDIA-software",
            "--change", 'CMD ["/bin/busybox", "httpd", "-f", "-v", "-p", "80", "-h", "/srv"]',
            str(rootfs), name,
        )
    return name


def start(lab: str, network: str, ip: str, serve_dir: Path) -> str:
    """Run (or keep running) the repository server at ip on network; returns its base URL.

    serve_dir is bind-mounted read-only; rebuilding the repository in place is seen at once.
    """
    serve_dir = Path(serve_dir).resolve()
    name = container_name(lab)
    image = ensure_image(lab)
    if _exists("container", name):
        state = _docker("inspect", "-f",
                        "{{.State.Running}} {{(index .NetworkSettings.Networks \"" + network
                        + "\").IPAddress}} {{range .Mounts}}{{.Source}}{{end}}", name,
                        check=False)
        if state == f"true {ip} {serve_dir}":
            return f"http://{ip}/"
        _docker("rm", "-f", name)
    _docker(
        "run", "-d", "--name", name,
        "--label", f"{LABEL}={lab}", "--label", f"{ROLE_LABEL}={ROLE}",
        "--network", network, "--ip", ip,
        "--read-only", "--restart", "unless-stopped",
        "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE",
        "-v", f"{serve_dir}:/srv:ro",
        image,
    )
    return f"http://{ip}/"


def stop(lab: str) -> None:
    """Remove this lab's repository server container (no error when there is none)."""
    ids = _docker("ps", "-aq", "--filter", f"label={LABEL}={lab}",
                  "--filter", f"label={ROLE_LABEL}={ROLE}")
    for cid in ids.split():
        _docker("rm", "-f", cid)


def remove_image(lab: str) -> None:
    """Remove this lab's server image (after stop)."""
    if _exists("image", image_name(lab)):
        _docker("rmi", image_name(lab))
