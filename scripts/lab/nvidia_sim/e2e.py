"""SIMULATOR for the gpu-fleet lab: end-to-end check of the NVIDIA stand-in in a real lab-like
host (a systemd container), by hand or from a lab test:

    python -m scripts.lab.nvidia_sim.e2e [--keep]

Builds the repositories, serves them on a scratch bridge network, boots a Debian 12 systemd
container with two simulated GPUs, then, checking each step: installs driver 580.82.07 from the
served repo (nvidia-smi fails: exit 9), reboots (`docker restart`: works, 580.82.07), upgrades to
580.95.05 (exit 18, version mismatch), reboots from inside (`systemctl reboot` under
`--restart unless-stopped`: back by itself, 580.95.05), installs docker.io and the toolkit,
configures the runtime with nvidia-ctk and runs a container with `--runtime=nvidia --gpus all`.
Everything it creates is labelled gpufleet.scratch=nvsim and removed at the end (unless --keep).
Needs a Docker engine, debootstrap, dpkg-deb, gpg, and Debian's mirror (apt inside the host).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import hardware, repo, server

SCRATCH = "gpufleet.scratch=nvsim"
LAB = "nvsim-e2e"
NETWORK = "nvsim-e2e"
SUBNET = "172.31.251.0/24"
REPO_IP = "172.31.251.10"
HOST_IP = "172.31.251.21"
HOST = "nvsim-e2e-host"
HOST_IMAGE = "nvsim-scratch/host:bookworm"
MIRROR = "http://deb.debian.org/debian"

# The flags that let a container run systemd as PID 1 here (see /work/shared/LAB-NOTES.md).
SYSTEMD_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined", "--device-cgroup-rule", "a *:* rwm",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
]


def sh(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {result.returncode}\n"
                           f"{result.stdout.decode(errors='replace')[-2000:]}"
                           f"{result.stderr.decode(errors='replace')[-2000:]}")
    return result


def on_host(script: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("docker", "exec", HOST, "sh", "-c", script, check=check)


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def expect(result: subprocess.CompletedProcess, rc: int, text: str) -> str:
    out = result.stdout.decode(errors="replace")
    if result.returncode != rc or text not in out:
        raise AssertionError(f"expected exit {rc} and {text!r}, got exit {result.returncode}:\n{out}")
    return out


def ensure_host_image() -> None:
    if sh("docker", "image", "inspect", HOST_IMAGE, check=False).returncode == 0:
        return
    step(f"building {HOST_IMAGE} with debootstrap (about 40 s)")
    with tempfile.TemporaryDirectory(prefix="nvsim-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh("debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus,curl,gnupg,"
           "ca-certificates", "bookworm", str(rootfs), MIRROR)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        sh("docker", "import", "--change", f"LABEL {SCRATCH}", "--change",
           'CMD ["/sbin/init"]', "-", HOST_IMAGE, input=tar.stdout.read())
        tar.wait()


def wait_running(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = on_host("systemctl is-system-running", check=False).stdout.decode().strip()
        if state in ("running", "degraded"):
            return
        time.sleep(1)
    raise TimeoutError(f"{HOST} did not finish booting")


def cleanup(workdir: Path) -> None:
    sh("docker", "rm", "-f", HOST, check=False)
    sh("docker", "volume", "rm", f"{HOST}-docker", check=False)
    server.stop(LAB)
    server.remove_image(LAB)
    sh("docker", "network", "rm", NETWORK, check=False)
    shutil.rmtree(workdir, ignore_errors=True)


def run(keep: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="nvsim-e2e-"))
    started = time.monotonic()
    try:
        t = time.monotonic()
        paths = repo.build_repo(workdir / "repo", workdir / "gnupg")
        step(f"repositories built in {time.monotonic() - t:.1f} s")
        ensure_host_image()
        sh("docker", "network", "create", "--label", SCRATCH, "--subnet", SUBNET, NETWORK)
        base = server.start(LAB, NETWORK, REPO_IP, workdir / "repo")
        sh("docker", "volume", "create", "--label", SCRATCH, f"{HOST}-docker")
        sh("docker", "create", "--name", HOST, "--hostname", HOST, "--label", SCRATCH,
           "--restart", "unless-stopped", "--network", NETWORK, "--ip", HOST_IP,
           *SYSTEMD_FLAGS, "-v", f"{HOST}-docker:/var/lib/docker", HOST_IMAGE, "/sbin/init")
        # The GPUs are hardware: in place before the host first boots (copying the directory
        # creates /etc/gpu-simulator in the created, not yet started, container).
        gpu_dir = workdir / "gpu-simulator"
        gpu_dir.mkdir()
        (gpu_dir / "gpus.json").write_text(hardware.gpus_json(HOST))
        sh("docker", "cp", str(gpu_dir), f"{HOST}:/etc/gpu-simulator")
        sh("docker", "start", HOST)
        wait_running()

        step("apt sources for both simulated repositories")
        on_host(f"""set -e
            command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl gnupg)
            curl -fsSL {base}{paths['cuda_key']} | gpg --dearmor --yes -o /usr/share/keyrings/cuda-archive-keyring.gpg
            curl -fsSL {base}{paths['toolkit_key']} | gpg --dearmor --yes -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
            echo "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {base}{paths['cuda_repo']} /" > /etc/apt/sources.list.d/cuda-debian12-x86_64.list
            echo 'deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] {base}{paths['toolkit_repo_template']} /' > /etc/apt/sources.list.d/nvidia-container-toolkit.list
            apt-get update -qq""")

        step("install driver 580.82.07: not loaded until reboot")
        on_host("apt-get install -y -qq nvidia-driver-pinning-580 nvidia-driver-cuda=580.82.07-1 "
                "nvidia-kernel-open-dkms=580.82.07-1 nvidia-persistenced=580.82.07-1")
        expect(on_host("nvidia-smi -L", check=False), 9, "couldn't communicate with the NVIDIA driver")

        step("docker restart (reboot from outside)")
        sh("docker", "restart", HOST)
        wait_running()
        expect(on_host("nvidia-smi --query-gpu=driver_version,persistence_mode "
                       "--format=csv,noheader", check=False), 0, "580.82.07, Enabled")

        step("upgrade to 580.95.05: version mismatch until reboot")
        on_host("apt-get install -y -qq nvidia-open nvidia-persistenced")
        expect(on_host("nvidia-smi -L", check=False), 18, "Driver/library version mismatch")

        step("systemctl reboot inside the host (--restart unless-stopped brings it back)")
        restarts = sh("docker", "inspect", "-f", "{{.RestartCount}}", HOST).stdout.strip()
        on_host("systemctl reboot", check=False)
        deadline = time.monotonic() + 60
        while sh("docker", "inspect", "-f", "{{.RestartCount}}", HOST).stdout.strip() == restarts:
            if time.monotonic() > deadline:
                raise TimeoutError("the host did not come back after systemctl reboot")
            time.sleep(1)
        wait_running()
        expect(on_host("nvidia-smi -L", check=False), 0, "GPU 1: NVIDIA H100 80GB HBM3")
        expect(on_host("nvidia-smi --query-gpu=driver_version --format=csv,noheader",
                       check=False), 0, "580.95.05")

        step("docker.io + toolkit, nvidia-ctk runtime configure, a GPU container")
        on_host("apt-get install -y -qq docker.io nvidia-container-toolkit")
        on_host("nvidia-ctk runtime configure --runtime=docker --set-as-default && "
                "systemctl restart docker")
        image = sh("docker", "save", HOST_IMAGE).stdout
        sh("docker", "exec", "-i", HOST, "docker", "load", input=image)
        expect(on_host("docker info --format '{{.DefaultRuntime}}'"), 0, "nvidia")
        expect(on_host(f"docker run --rm --runtime=nvidia --gpus all {HOST_IMAGE} nvidia-smi -L"),
               0, "GPU 1: NVIDIA H100 80GB HBM3")
        step(f"all checks passed in {time.monotonic() - started:.0f} s")
    finally:
        if keep:
            step(f"kept: container {HOST}, network {NETWORK}, repo in {workdir}")
        else:
            cleanup(workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the scratch host running")
    run(parser.parse_args().keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
