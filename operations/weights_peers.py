"""Model weights between hosts: one copy out of the control machine (or none, when a host already
holds the revision), and a pipelined chain of hosts for everything else.

How one model reaches N hosts in one run (`weights_distribution = "peers"`, the default):

1. While planning, every host that lacks files registers what it needs; every host whose copy is
   verified in place registers as a holder. Nothing is sent yet.
2. When the transfer operation runs, each host in turn (as its staging directory is ready) starts
   the relay (operations/weights_relay.py, copied to the host) over SSH and joins the chain of the
   hosts that lack the same files (one chain for a fresh fleet or a new revision). The first to
   join receives the stream from a source: a holder of this revision (another host of
   this run, or, under `--limit`, a host of the inventory outside it) when one answers, else the
   chain's origin: the control machine itself, over OpenSSH from its verified cache (the bulk
   path: OpenSSH's speed, not a Python SSH implementation's), or with `weights_source =
   "seeder"` the Hub, which that first host reads itself. Every later host receives from the host that joined before
   it, while that one is still receiving: the fleet fills in about the time of one copy.
3. A host whose upstream breaks or stalls asks the hosts before it, from the byte it reached,
   and the origin when none is left; a host that dies fails alone. When every host of the chain has its bytes (or has failed) the
   control machine closes each relay's stdin, and every listener closes. The deploy then checks
   every file with `sha256sum -c` against the control machine's manifest before the swap, as for
   any transfer: a peer is never trusted for content, only for bandwidth.

The one-shot token (256 bits, new for each chain) travels only inside the SSH channels, on the
relays' stdin: never on a command line, never on a disk, never in output. A relay listens on the
host's cluster address (`swarm_advertise_address`, else the address pyinfra connects to, else
the source of its default route), on `weights_relay_port`, accepts only the fleet's addresses,
and only for as long as the transfer.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import shlex
import threading
from dataclasses import dataclass, field
from typing import Any

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.server import Command
from pyinfra.operations import files

from operations.apt_pins import apt_install
from operations.phase import explain, fails_only_this_host
from operations.rules import split_advertise_address
from operations.swarm import advertise_address
from operations.weights_plan import selection_key

RELAY_PATH = "/usr/local/lib/gpufleet/weights-relay"
RELAY_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights_relay.py")
DEFAULT_PORT = 7461
RUNTIME_CHECK = ("python3 -c 'import hmac, json, socket, threading' 2>/dev/null && echo ok "
                 "|| echo missing")
SSH_KEYS = ("ssh_hostname", "ssh_port", "ssh_user", "ssh_key", "ssh_known_hosts_file",
            "ssh_strict_host_key_checking")


# --- Pure planning: who receives from whom -------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str
    address: str
    port: int


def upstreams_for(joined: list[Member], seed: Member | None) -> list[Member]:
    """Where the next host to join receives from, in the order it should try them: the host
    that joined last (the chain), then every earlier one back to the head, then the seed. An
    empty list means: this host is the head and the control machine feeds it."""
    sources = list(reversed(joined))
    if seed is not None:
        sources.append(seed)
    return sources


def chain_files(listing: list[dict[str, Any]], paths: frozenset[str]) -> list[dict[str, Any]]:
    """The files one chain carries, in the listing's order."""
    return [{"path": e["path"], "size": int(e["size"])} for e in listing if e["path"] in paths]


def chains_by_need(needs: dict[str, set[str]]) -> dict[frozenset[str], list[str]]:
    """Hosts that lack the same files share a chain; hosts that lack different ones get a chain
    each, so that no host writes a byte it does not need (its free space was checked for its own
    files only). A fresh fleet, or a new revision, is one chain; a repair is a chain of one."""
    groups: dict[frozenset[str], list[str]] = {}
    for name, paths in sorted(needs.items()):
        groups.setdefault(frozenset(paths), []).append(name)
    return groups


def cluster_address(explicit: str | None, ssh_hostname: str | None, primary: str | None,
                    addresses: dict[str, str] | None = None) -> str | None:
    """The address a host's relay listens on and peers connect to: Swarm's advertise address
    (operations/swarm.py's rule), as an IP: an interface name is looked up in the host's
    `addresses` (interface -> IPv4), a :port is dropped. None when it cannot be known."""
    chosen = advertise_address(explicit, ssh_hostname, primary)
    if not chosen:
        return None
    address, _ = split_advertise_address(chosen)
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return (addresses or {}).get(address)


def ssh_argv(data: dict[str, Any], hostname: str, remote: str) -> list[str]:
    """An OpenSSH command line reaching a host the way pyinfra's inventory data says (user, port,
    key, known hosts, host key checking); ~/.ssh/config applies to everything else. No secret is
    ever part of it: the relay reads its token on stdin."""
    argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=10"]
    if data.get("ssh_port"):
        argv += ["-p", str(data["ssh_port"])]
    if data.get("ssh_user"):
        argv += ["-l", str(data["ssh_user"])]
    if data.get("ssh_key"):
        argv += ["-i", os.path.expanduser(str(data["ssh_key"])), "-o", "IdentitiesOnly=yes"]
    if data.get("ssh_known_hosts_file"):
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(str(data['ssh_known_hosts_file']))}"]
    checking = data.get("ssh_strict_host_key_checking")
    if checking:
        argv += ["-o", f"StrictHostKeyChecking={checking}"]
    return argv + [data.get("ssh_hostname") or hostname, "--", remote]


def ssh_data(data) -> dict[str, Any]:
    """The inventory keys OpenSSH needs, as a plain dict (pyinfra's HostData is not one)."""
    return {k: data.get(k) for k in SSH_KEYS if data.get(k) not in (None, "")}


def relay_command(python: str = "python3") -> str:
    return f"{shlex.quote(python)} {RELAY_PATH}"


def chain_key(repo_id, revision, allow, ignore, models_dir, name) -> tuple:
    """What hosts must share to be in one chain: the same files, to the same place."""
    return (repo_id, revision, selection_key(repo_id, revision, allow, ignore), models_dir, name)


# --- The registry: filled while planning, read while executing ------------------------------


@dataclass
class Registration:
    name: str
    data: dict[str, Any]
    address: str | None
    port: int
    directory: str  # staging directory (needer) or model directory (holder)
    paths: set[str] = field(default_factory=set)


@dataclass
class Model:
    """One model selection's hosts in this run, and the chains that serve it."""

    key: tuple
    needers: dict[str, Registration] = field(default_factory=dict)
    holders: dict[str, Registration] = field(default_factory=dict)
    outside: list[Registration] = field(default_factory=list)
    chains: dict = field(default_factory=dict)  # need-set -> the running weights_chain.Chain
    lock: threading.Lock = field(default_factory=threading.Lock)


_MODELS: dict[tuple, Model] = {}
_MODELS_LOCK = threading.Lock()


def model_entry(key: tuple) -> Model:
    with _MODELS_LOCK:
        return _MODELS.setdefault(key, Model(key))


def register_need(key: tuple, registration: Registration) -> None:
    entry = model_entry(key)
    entry.holders.pop(registration.name, None)
    entry.needers[registration.name] = registration


def register_holder(key: tuple, registration: Registration) -> None:
    entry = model_entry(key)
    if registration.name not in entry.needers:
        entry.holders[registration.name] = registration


def register_outside(key: tuple, registrations: list[Registration]) -> None:
    """Hosts of the inventory outside this run (`--limit`) that may hold the model: asked to seed
    only if no host of the run holds it; a relay in seed mode serves nothing it cannot match."""
    entry = model_entry(key)
    if not entry.outside:
        entry.outside = list(registrations)


def reset() -> None:
    with _MODELS_LOCK:
        _MODELS.clear()


# --- The deploy side: the program on each host, the holders outside the run -----------


@operation()
@fails_only_this_host
def relay_program():
    """
    The weights relay (operations/weights_relay.py) at ``/usr/local/lib/gpufleet/weights-relay``,
    root-owned 0755, and the python3 it runs on (Debian's python3 package when its standard
    library is missing). The program runs only while a chain runs, started by the control
    machine over SSH.

    **Example:**

    .. code:: python

        relay_program(name="Weights relay program")
    """
    if host.get_fact(Command, command=RUNTIME_CHECK) != "ok":
        # python3-minimal (all a Debian minbase has) lacks json and hmac; a server image has more.
        explain("python3 with its standard library is missing: the weights relay runs on it")
        yield "apt-get update"
        yield apt_install(["python3"], "--no-install-recommends")
    yield from files.put._inner(
        src=RELAY_SOURCE, dest=RELAY_PATH, user="root", group="root", mode="755",
    )


def register_outside_holders(spec: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Under --limit: the inventory's hosts outside the run that serve this model may seed a
    chain (onboarding fills a new host from a peer, not from the control machine)."""
    from pyinfra import state

    if not isinstance(state.limit_hosts, list):
        return
    groups = set(spec.get("groups") or ["gpu_nodes"])
    outside = []
    for other in state.inventory:
        if state.is_host_in_limit(other) or not groups & set(other.groups):
            continue
        address = cluster_address(
            other.data.get("swarm_advertise_address"), other.data.get("ssh_hostname"), None
        )
        outside.append(Registration(
            other.name, ssh_data(other.data), address,
            other.data.get("weights_relay_port") or kwargs["relay_port"],
            posixpath.join(kwargs["models_dir"], spec["name"]),
        ))
    register_outside(
        chain_key(kwargs["repo_id"], kwargs["revision"], kwargs["allow_patterns"],
                  kwargs["ignore_patterns"], kwargs["models_dir"], spec["name"]),
        outside,
    )
