"""The lab fleet: containers on this machine that behave like fresh servers.

Each host is a Debian 12 container with systemd as PID 1, sshd, sudo and a deploy user, its own
Docker data volume, on a bridge network the lab creates with fixed addresses. Everything the lab
creates carries the label gpufleet.lab=<lab>, so `down` removes exactly that and nothing else.

Standard library only (the docker CLI through subprocess): `scripts/lab.py` runs this before any
virtual environment exists.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_ROOT = REPO_ROOT / ".lab"

LABEL = "gpufleet.lab"
SSH_USER = "ops"
DEFAULT_LAB = "gpulab"
FIRST_HOST_OCTET = 11

# The run flags that let a container run systemd and its own dockerd on these machines without
# --privileged (see shared/LAB-NOTES.md: CAP_SYS_RESOURCE is not in the bounding set here).
SYSTEMD_RUN_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined",
    "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "--device-cgroup-rule", "a *:* rwm",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
    "--stop-signal", "SIGRTMIN+3",  # systemd shuts down cleanly on this, ignores SIGTERM
]


class LabError(Exception):
    """Something the person running the lab must act on; printed as one line."""


def say(message: str) -> None:
    print(f"lab: {message}", flush=True)


def docker(*args: str, check: bool = True, input: bytes | None = None) -> str:
    result = subprocess.run(["docker", *args], input=input, capture_output=True)
    if check and result.returncode != 0:
        raise LabError(
            f"docker {' '.join(args[:3])} ... failed: {result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace").strip()


def exists(kind: str, name: str) -> bool:
    return subprocess.run(["docker", kind, "inspect", name], capture_output=True).returncode == 0


# --- Names and addresses: pure ------------------------------------------------------------


def lab_name(explicit: str | None = None) -> str:
    """--name, else $LAB_NAME, else gpulab; refused unless it makes valid Docker and file names
    (it prefixes containers, the network, volumes and .lab/<lab>/)."""
    name = explicit or os.environ.get("LAB_NAME") or DEFAULT_LAB
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,39}", name):
        raise LabError(f"lab name {name!r}: expected 1-40 of a-z 0-9 _ . - (starting with a "
                       "letter or digit)")
    return name


def subnet_for(lab: str, taken: tuple[ipaddress.IPv4Network, ...] = ()) -> ipaddress.IPv4Network:
    """A /24 in 172.29.0.0/16 for a new lab: the one a hash of the name points at, or the next
    one that no existing network overlaps. The same name on the same machine gets the same
    addresses; two labs never share a subnet."""
    start = int(hashlib.sha256(lab.encode()).hexdigest(), 16) % 250
    for step in range(250):
        candidate = ipaddress.ip_network(f"172.29.{(start + step) % 250 + 1}.0/24")
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise LabError("no free /24 left in 172.29.0.0/16 for another lab")


def host_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    """Address of host number `index` (1-based): .11, .12, ..."""
    return str(subnet.network_address + FIRST_HOST_OCTET + index - 1)


def service_address(subnet: ipaddress.IPv4Network, octet: int) -> str:
    """Lab services (stand-in repositories, hub) sit below the hosts: .2 to .10."""
    return str(subnet.network_address + octet)


def network_name(lab: str) -> str:
    return f"{lab}-net"


def container_name(lab: str, index: int) -> str:
    return f"{lab}-node-{index}"


def volume_name(lab: str, index: int) -> str:
    return f"{lab}-node-{index}-docker"


def state_dir(lab: str) -> Path:
    return STATE_ROOT / lab


# --- Hosts --------------------------------------------------------------------------------


@dataclass
class Host:
    name: str
    container: str
    address: str

    def as_dict(self) -> dict:
        return {"name": self.name, "container": self.container, "address": self.address}


def planned_hosts(lab: str, subnet: ipaddress.IPv4Network, count: int) -> list[Host]:
    return [
        Host(f"node-{i}", container_name(lab, i), host_address(subnet, i)) for i in range(1, count + 1)
    ]


def capped_replicas(models: list[dict], host_count: int) -> list[dict]:
    """The lab's models with each `replicas` capped at the lab's host count: engines listen on
    their node's port, one replica per node, and the deploy refuses more replicas than nodes
    (a 1-host lab serves one)."""
    most = max(1, host_count)
    return [{**m, "replicas": min(int(m.get("replicas", 1)), most)} for m in models]


def host_count_from_names(lab: str, names: list[str]) -> int:
    """How many hosts a lab has, from its host containers' names: the highest node number (a
    gap left by a removed container is filled again by `up`, not renumbered)."""
    prefix = f"{lab}-node-"
    numbers = [int(n[len(prefix):]) for n in names
               if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return max(numbers, default=0)


def existing_host_count(lab: str) -> int:
    names = docker("ps", "-a", "--filter", f"label={LABEL}={lab}", "--filter",
                   "label=gpufleet.role=host", "--format", "{{.Names}}").split()
    return host_count_from_names(lab, names)


def docker_subnets() -> dict[str, ipaddress.IPv4Network]:
    """Every IPv4 subnet Docker networks on this machine use, by network name."""
    subnets = {}
    for network_id in docker("network", "ls", "-q").split():
        info = json.loads(docker("network", "inspect", network_id))[0]
        for config in (info.get("IPAM") or {}).get("Config") or []:
            if config.get("Subnet") and ":" not in config["Subnet"]:
                subnets[info["Name"]] = ipaddress.ip_network(config["Subnet"], strict=False)
    return subnets


def routed_subnets(proc_net_route: str) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, destination) of every route in /proc/net/route except the default route.
    Addresses there are little-endian hex."""
    routes = []
    for line in proc_net_route.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        destination = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
        network = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
        if network.prefixlen > 0:
            routes.append((fields[0], network))
    return routes


def ensure_network(lab: str) -> ipaddress.IPv4Network:
    """The lab's bridge network (created on first use); returns its subnet."""
    name = network_name(lab)
    subnets = docker_subnets()
    if name in subnets:
        return subnets[name]
    # Besides Docker's networks, whatever this machine routes (a LAN, a VPN) is taken too.
    taken = {**{f"route on {iface}": net for iface, net in routed_subnets(
        Path("/proc/net/route").read_text() if Path("/proc/net/route").exists() else "")},
        **{f"Docker network {n}": net for n, net in subnets.items()}}
    subnet = subnet_for(lab, tuple(taken.values()))
    preferred = subnet_for(lab)
    if subnet != preferred:
        users = ", ".join(sorted(n for n, net in taken.items() if net.overlaps(preferred)))
        say(f"network {name}: {preferred} (this lab name's usual subnet) overlaps {users}; "
            f"using {subnet} instead")
    say(f"network {name} {subnet}")
    docker("network", "create", "--driver", "bridge", "--subnet", str(subnet),
           "--label", f"{LABEL}={lab}", name)
    return subnet


def ensure_ssh_key(lab: str) -> Path:
    key = state_dir(lab) / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{lab}-deploy",
                        "-f", str(key)], check=True)
    key.chmod(0o600)
    return key


def copy_files_into(container: str, files: dict[str, bytes], new_dirs: tuple[str, ...] = (),
                    mode: int = 0o644) -> None:
    """docker cp files (absolute path -> content) into a container; `new_dirs` are created
    (root, 0755) first. Existing directories keep their owner and mode."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp, "files.tar")
        with tarfile.open(archive, "w") as tar:
            for directory in new_dirs:
                info = tarfile.TarInfo(directory.lstrip("/"))
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for path, data in files.items():
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size, info.mode = len(data), mode
                tar.addfile(info, fileobj=io.BytesIO(data))
        docker("cp", "-", f"{container}:/", input=archive.read_bytes())


def create_host(lab: str, index: int, host: Host, image: str, public_key: bytes,
                hardware: dict[str, bytes]) -> None:
    """Create, provision with its 'hardware' and the deploy user's key, then start."""
    volume = volume_name(lab, index)
    if not exists("volume", volume):
        docker("volume", "create", "--label", f"{LABEL}={lab}", volume)
    docker(
        "create", "--name", host.container, "--hostname", host.name,
        "--network", network_name(lab), "--ip", host.address,
        "--label", f"{LABEL}={lab}", "--label", "gpufleet.role=host",
        "--restart", "unless-stopped",
        "-v", f"{volume}:/var/lib/docker",
        *SYSTEMD_RUN_FLAGS, image,
    )
    copy_files_into(host.container, {f"/home/{SSH_USER}/.ssh/authorized_keys": public_key},
                    mode=0o600)
    copy_files_into(host.container, hardware,
                    new_dirs=tuple(sorted({str(Path(path).parent) for path in hardware})))
    docker("start", host.container)
    # docker cp writes files as root; the key belongs to the user, as on a provisioned server.
    docker("exec", host.container, "chown", f"{SSH_USER}:{SSH_USER}",
           f"/home/{SSH_USER}/.ssh/authorized_keys")


def wait_until_ready(host: Host, key: Path, timeout_s: float = 120) -> None:
    """systemd has finished booting and sshd accepts the lab key."""
    deadline = time.monotonic() + timeout_s
    last = ""
    reported_degraded = False
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["docker", "exec", host.container, "systemctl", "is-system-running"],
            capture_output=True, text=True,
        ).stdout.strip()
        if state == "degraded" and not reported_degraded:
            # Booted, but a unit failed: usable, and worth a line (a fresh host should not).
            failed = docker("exec", host.container, "systemctl", "list-units", "--failed",
                            "--plain", "--no-legend", check=False)
            units = ", ".join(line.split()[0] for line in failed.splitlines() if line.split())
            say(f"{host.name}: systemd is degraded (failed: {units or 'none listed'})")
            reported_degraded = True
        if state in ("running", "degraded"):
            try:
                probe = subprocess.run(
                    ["ssh", *ssh_options(key, None), f"{SSH_USER}@{host.address}", "true"],
                    capture_output=True, text=True, timeout=20,
                )
            except subprocess.TimeoutExpired:
                last = "ssh did not answer within 20s"
            else:
                if probe.returncode == 0:
                    return
                last = probe.stderr.strip()
        else:
            last = f"systemd is {state or 'not answering'}"
        time.sleep(1)
    raise LabError(f"{host.name} did not become ready in {timeout_s:.0f}s: {last}")


def ssh_options(key: Path, known_hosts: Path | None) -> list[str]:
    options = ["-i", str(key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
               "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]
    if known_hosts is None:  # first contact, while recording the keys
        options += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    else:
        options += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
    return options


def ssh_answers(address: str, key: Path, known_hosts: Path, timeout_s: float = 10) -> bool:
    """The deploy user gets a shell on the host, with the lab's key and recorded host key."""
    try:
        probe = subprocess.run(["ssh", *ssh_options(key, known_hosts), f"{SSH_USER}@{address}", "true"],
                               capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def known_hosts_line(address: str, scanned: str, on_disk: str) -> str:
    """The known_hosts line for a host: its ed25519 key as ssh-keyscan saw it over the network,
    accepted only if it is the key the host has on disk (read through the container runtime,
    a channel nobody on the network can answer). Raises LabError otherwise."""
    disk_words = on_disk.split()
    if len(disk_words) < 2 or disk_words[0] != "ssh-ed25519":
        raise LabError(f"{address}: no ed25519 host key on disk ({on_disk.strip()[:60]!r})")
    for line in scanned.splitlines():
        words = line.split()
        if len(words) >= 3 and not line.startswith("#") and words[1] == "ssh-ed25519":
            if words[0] != address or words[2] != disk_words[1]:
                raise LabError(f"{address}: the host key that answered on the network is not "
                               "the one on the host's disk: not recording it")
            return f"{address} ssh-ed25519 {words[2]}"
    raise LabError(f"{address}: ssh-keyscan got no ed25519 host key")


def record_host_keys(hosts: list[Host], known_hosts: Path) -> None:
    """known_hosts for pyinfra's strict host key checking: one verified line per host."""
    lines = []
    for host in hosts:
        scanned = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", host.address],
                                 capture_output=True, text=True)
        on_disk = docker("exec", host.container, "cat", "/etc/ssh/ssh_host_ed25519_key.pub")
        lines.append(known_hosts_line(host.address, scanned.stdout, on_disk))
    staging = known_hosts.with_suffix(".tmp")
    staging.write_text("\n".join(lines) + "\n")
    staging.replace(known_hosts)


def write_state(lab: str, subnet: ipaddress.IPv4Network, hosts: list[Host], key: Path,
                known_hosts: Path, settings: dict[str, object]) -> Path:
    state = {
        "lab": lab,
        "ssh_user": SSH_USER,
        "ssh_key": str(key),
        "known_hosts": str(known_hosts),
        "network": network_name(lab),
        "subnet": str(subnet),
        "settings": settings,  # configuration keys that select the lab's stand-ins
        "hosts": [host.as_dict() for host in hosts],
    }
    # What an operator edited (`set`, `forget`, `managers`) survives `up` growing the lab.
    return save_state(lab, keep_operator_edits(state, read_state(lab)))


def save_state(lab: str, state: dict) -> Path:
    """Write .lab/<lab>/hosts.json atomically (the inventory may be read at any moment)."""
    path = state_dir(lab) / "hosts.json"
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(state, indent=2) + "\n")
    staging.replace(path)
    return path


# --- Operator edits of the lab inventory (made by scripts/lab/host_edits.py) -----------------
# An operator changes a real fleet by editing its inventory: host data, removing a host, the
# managers group. These give the lab the same edits, kept in hosts.json, which
# inventories/lab.py reads: per-host "data" (merged into that host's data, wins over the
# stand-in settings), "forgotten" (the container runs, the inventory no longer lists it) and
# the top-level "swarm_managers" (how many of the first listed hosts are managers; default 1).

HOST_EDITS = ("data", "forgotten")


def keep_operator_edits(new: dict, old: dict | None) -> dict:
    """`new` state with the edits of `old` carried over, host by host (by name)."""
    if not old:
        return new
    previous = {entry["name"]: entry for entry in old.get("hosts", [])}
    for entry in new["hosts"]:
        for key in HOST_EDITS:
            if key in previous.get(entry["name"], {}):
                entry[key] = previous[entry["name"]][key]
    if "swarm_managers" in old:
        new["swarm_managers"] = old["swarm_managers"]
    return new


def read_state(lab: str) -> dict | None:
    path = state_dir(lab) / "hosts.json"
    return json.loads(path.read_text()) if path.exists() else None


def container_states(lab: str) -> dict[str, str]:
    out = docker("ps", "-a", "--filter", f"label={LABEL}={lab}", "--format", "{{.Names}}\t{{.State}}")
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def authorized_keys(container: str) -> bytes | None:
    """The deploy user's authorized_keys in a lab host, running or stopped (docker cp reads
    both, as a tar stream); None when there is none to read."""
    result = subprocess.run(["docker", "cp", f"{container}:/home/{SSH_USER}/.ssh/authorized_keys",
                             "-"], capture_output=True)
    if result.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        member = tar.next()
        handle = tar.extractfile(member) if member else None
        return handle.read() if handle else None


def foreign_hosts(containers: list[str], public_key: bytes) -> list[str]:
    """The lab's host containers that do not admit this lab's key: made with a key since lost
    (its state directory removed by hand, another checkout), so no SSH to them can succeed."""
    wanted = public_key.split()[:2]
    return [c for c in containers
            if (keys := authorized_keys(c)) is not None
            and not any(line.split()[:2] == wanted for line in keys.splitlines())]


def running_as_wanted(name: str, network: str, image: str, address: str,
                      mounts: list[str | Path]) -> bool:
    """Whether container `name` runs `image` at `address` on `network` with exactly these bind
    mount sources: a stand-in service that is already right is kept, any other is replaced."""
    if not exists("container", name):
        return False
    state = docker("inspect", "-f",
                   "{{.State.Running}}|{{.Config.Image}}|{{(index .NetworkSettings.Networks \""
                   + network + "\").IPAddress}}|{{range .Mounts}}{{.Source}} {{end}}", name,
                   check=False)
    running, _, rest = state.partition("|")
    running_image, _, rest = rest.partition("|")
    running_address, _, sources = rest.partition("|")
    return (running, running_image, running_address) == ("true", image, address) and \
        sorted(sources.split()) == sorted(str(m) for m in mounts)


def remove_role(lab: str, role: str) -> None:
    """Remove this lab's containers of one role (a stand-in service); none is not an error."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}={lab}", "--filter", f"label=gpufleet.role={role}")
    for cid in ids.split():
        docker("rm", "-f", cid)


def remove_everything(lab: str) -> dict[str, int]:
    """Every container, network and volume labelled with this lab, and its state directory."""
    removed = {}
    for kind, list_args in (
        ("container", ["ps", "-a", "-q"]),
        ("network", ["network", "ls", "-q"]),
        ("volume", ["volume", "ls", "-q"]),
    ):
        ids = docker(*list_args, "--filter", f"label={LABEL}={lab}").split()
        if ids:
            rm = ["rm", "-f"] if kind == "container" else [kind, "rm"]
            docker(*rm, *ids)
        removed[kind] = len(ids)
    shutil.rmtree(state_dir(lab), ignore_errors=True)
    return removed


def leftovers(lab: str) -> list[str]:
    found = []
    for list_args in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        found += docker(*list_args, "-q", "--filter", f"label={LABEL}={lab}").split()
    return found
