"""End-to-end check of the lab registry: `python -m scripts.lab.registry.e2e [--keep]`.

A scratch bridge network, the registry on it, the lab's base image pushed as
lab/debian:bookworm, then a lab host container (systemd, its own dockerd from Debian's docker.io,
insecure-registries in /etc/docker/daemon.json) pulls <ip>:5000/lab/debian:bookworm; a second
push must transfer nothing (no upload request reaches the registry). Everything it creates is
labelled gpufleet.lab=<scratch lab> and gpufleet.scratch=registry, and removed at the end
(unless --keep). About 30 s once the images exist (apt-get install docker.io in the host: 10 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from scripts.lab import fleet, images
from scripts.lab.fleet import LABEL, LabError, docker, say
from scripts.lab.registry import service

LAB = "regscratch"
SCRATCH = {"gpufleet.scratch": "registry"}
REPOSITORY_TAG = "lab/debian:bookworm"


def upload_requests(lab: str) -> int:
    """Blob upload requests in the registry's access log (POST/PATCH/PUT .../blobs/uploads/)."""
    logs = subprocess.run(["docker", "logs", service.container_name(lab)], capture_output=True,
                          check=False)
    text = (logs.stdout + logs.stderr).decode(errors="replace")
    return sum(1 for line in text.splitlines()
               if "/blobs/uploads/" in line and ('"PATCH ' in line or '"PUT ' in line
                                                 or '"POST ' in line))


def host_exec(container: str, script: str, timeout: float = 600) -> str:
    result = subprocess.run(["docker", "exec", container, "bash", "-ec", script],
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise LabError(f"in {container}: {script[:60]}... failed: "
                       f"{(result.stdout + result.stderr).strip()[-800:]}")
    return result.stdout.strip()


def cleanup(lab: str) -> None:
    service.remove(lab)
    labels = ["--filter", f"label={LABEL}={lab}", "--filter", "label=gpufleet.scratch=registry"]
    for kind, list_args in (("container", ["ps", "-aq"]), ("volume", ["volume", "ls", "-q"]),
                            ("network", ["network", "ls", "-q"])):
        ids = docker(*list_args, *labels).split()
        if ids:
            docker(*(["rm", "-f"] if kind == "container" else [kind, "rm"]), *ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    args = parser.parse_args(argv)
    timings = {}
    lab = LAB
    network = f"{lab}-net"
    host = f"{lab}-host"
    try:
        cleanup(lab)
        subnet = fleet.subnet_for(lab, tuple(fleet.docker_subnets().values()))
        docker("network", "create", "--driver", "bridge", "--subnet", str(subnet),
               "--label", f"{LABEL}={lab}", "--label", "gpufleet.scratch=registry", network)
        address = fleet.service_address(subnet, 2)
        host_ip = fleet.host_address(subnet, 1)

        started = time.monotonic()
        image = service.ensure_image(lab)
        timings["image"] = time.monotonic() - started
        started = time.monotonic()
        registry = service.start(lab, network, address, service.free_loopback_port(), SCRATCH)
        timings["start"] = time.monotonic() - started
        started = time.monotonic()
        port = int(registry["push"].rsplit(":", 1)[1])
        again = service.start(lab, network, address, port, SCRATCH)
        timings["start_again"] = time.monotonic() - started
        assert again == registry, (again, registry)
        assert service.start(lab, network, address, None, SCRATCH) == registry  # keeps its port
        status, headers, _ = service._request("GET", f"http://{registry['push']}/v2/")
        stand_in = [v for k, v in headers.items() if k.lower() == "x-lab-stand-in"]
        assert status == 200 and stand_in == [service.STAND_IN_HEADER], (status, headers)
        say(f"registry {image} at {registry}")

        base = images.ensure_base()
        started = time.monotonic()
        pull_name = service.push(lab, base, REPOSITORY_TAG, registry)
        timings["push"] = time.monotonic() - started
        assert pull_name == f"{address}:5000/{REPOSITORY_TAG}", pull_name
        uploads_after_first = upload_requests(lab)
        assert uploads_after_first > 0, "the first push uploaded nothing"

        # A lab host: systemd, its own dockerd, told that the registry speaks plain HTTP.
        host_image = images.ensure_host()
        volume = f"{lab}-host-docker"
        docker("volume", "create", "--label", f"{LABEL}={lab}",
               "--label", "gpufleet.scratch=registry", volume)
        docker("run", "-d", "--name", host, "--hostname", "regscratch-host",
               "--network", network, "--ip", host_ip,
               "--label", f"{LABEL}={lab}", "--label", "gpufleet.scratch=registry",
               "-v", f"{volume}:/var/lib/docker", *fleet.SYSTEMD_RUN_FLAGS, host_image)
        started = time.monotonic()
        deadline = time.monotonic() + 90
        while docker("exec", host, "systemctl", "is-system-running", check=False) not in (
                "running", "degraded"):
            if time.monotonic() > deadline:
                raise LabError(f"{host}: systemd did not finish booting in 90s")
            time.sleep(1)
        host_exec(host, "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
                        "apt-get install -y -qq --no-install-recommends docker.io >/dev/null")
        timings["host_docker_install"] = time.monotonic() - started
        daemon_json = json.dumps({"insecure-registries": [registry["address"]]}, indent=2)
        fleet.copy_files_into(host, {"/etc/docker/daemon.json": daemon_json.encode() + b"\n"})
        host_exec(host, "systemctl restart docker")
        started = time.monotonic()
        pulled = host_exec(host, f"docker pull {pull_name} && "
                                 f"docker image inspect -f '{{{{.Id}}}}' {pull_name}")
        timings["host_pull"] = time.monotonic() - started
        pulled_id = pulled.splitlines()[-1]
        local_id = docker("image", "inspect", "-f", "{{.Id}}", base)
        assert pulled_id == local_id, (pulled_id, local_id)
        say(f"{host} pulled {pull_name}: {pulled_id[:19]}..., the same image as {base}")

        started = time.monotonic()
        assert service.push(lab, base, REPOSITORY_TAG, registry) == pull_name
        timings["push_again"] = time.monotonic() - started
        uploads_after_second = upload_requests(lab)
        assert uploads_after_second == uploads_after_first, (uploads_after_first,
                                                             uploads_after_second)
        say(f"second push: no upload request ({uploads_after_first} upload requests in all, "
            "all from the first)")

        # stop() keeps the volume: a new container still holds the image.
        digest = service.remote_digest(registry["push"], "lab/debian", "bookworm")
        service.stop(lab)
        started = time.monotonic()
        assert service.start(lab, network, address, port, SCRATCH) == registry
        timings["restart_after_stop"] = time.monotonic() - started
        assert service.remote_digest(registry["push"], "lab/debian", "bookworm") == digest
        say(f"stop + start: the registry still holds lab/debian:bookworm ({digest[:19]}...)")

        # Without this machine's record of the push (tag removed): the config digest decides.
        docker("rmi", f"{registry['push']}/{REPOSITORY_TAG}")
        uploads_before = upload_requests(lab)  # a new container: a new log
        assert service.push(lab, base, REPOSITORY_TAG, registry) == pull_name
        assert upload_requests(lab) == uploads_before
        say("push after the local tag was removed: no upload either (config digest = image id)")

        print(json.dumps({"ok": True, "registry": registry, "pull": pull_name,
                          "timings_s": {k: round(v, 2) for k, v in timings.items()}}, indent=2))
        return 0
    finally:
        if not args.keep:
            cleanup(lab)
            left = docker("ps", "-aq", "--filter", f"label={LABEL}={lab}").split() \
                + docker("volume", "ls", "-q", "--filter", f"label={LABEL}={lab}").split() \
                + docker("network", "ls", "-q", "--filter", f"label={LABEL}={lab}").split()
            say(f"cleaned up: {'nothing left' if not left else 'LEFT ' + ' '.join(left)}")


if __name__ == "__main__":
    sys.exit(main())
