"""Model weights between hosts: one copy out of the control machine (or none, when a host already
holds the revision), and a pipelined chain of hosts for everything else.

How one model reaches N hosts in one run (`weights_distribution = "peers"`, the default):

1. While planning, every host that lacks files registers what it needs; every host whose copy is
   verified in place registers as a holder. Nothing is sent yet.
2. When the transfer operation runs, each host in turn (as its staging directory is ready) starts
   the relay (operations/weights_relay.py, copied to the host) over SSH and joins the chain. The
   first to join receives the stream from a source: a holder of this revision (another host of
   this run, or, under `--limit`, a host of the inventory outside it) when one answers, else the
   control machine itself, over OpenSSH from its verified cache (the bulk path: OpenSSH's speed,
   not a Python SSH implementation's). Every later host receives from the host that joined before
   it, while that one is still receiving: the fleet fills in about the time of one copy.
3. A host whose upstream breaks or stalls asks the hosts before it, from the byte it reached;
   a host that dies fails alone. When every host of the chain has its bytes (or has failed) the
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
import json
import os
import posixpath
import secrets
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pyinfra import host, logger
from pyinfra.api import operation
from pyinfra.facts.server import Command
from pyinfra.operations import files

from operations.apt_pins import apt_install
from operations.phase import explain, fails_only_this_host
from operations.weights_cache import LEDGER
from operations.weights_plan import human_bytes, selection_key

RELAY_PATH = "/usr/local/lib/gpufleet/weights-relay"
RELAY_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights_relay.py")
DEFAULT_PORT = 7461
RUNTIME_CHECK = ("python3 -c 'import hmac, json, socket, threading' 2>/dev/null && echo ok "
                 "|| echo missing")
SSH_KEYS = ("ssh_hostname", "ssh_port", "ssh_user", "ssh_key", "ssh_known_hosts_file",
            "ssh_strict_host_key_checking")
# A late host (its staging took longer than the others') still joins this chain while it runs;
# once every joined host has its bytes and no other joined for this long, the chain closes.
LATE_JOIN_S = 20.0
# A healthy datacenter link never goes this long without a byte: the upstream is gone.
STALL_S = 15.0
# No upstream has given a byte for this long: the control machine feeds the host instead.
GIVE_UP_S = 40.0


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


def union_files(listing: list[dict[str, Any]], needs: dict[str, set[str]]) -> list[dict[str, Any]]:
    """The files the chain carries: every file some host lacks, in the listing's order."""
    wanted = set().union(*needs.values()) if needs else set()
    return [{"path": e["path"], "size": int(e["size"])} for e in listing if e["path"] in wanted]


def cluster_address(explicit: str | None, ssh_hostname: str | None, primary: str | None) -> str | None:
    """The address a host's relay listens on and peers connect to (as Swarm's advertise address)."""
    if explicit:
        return explicit
    if ssh_hostname:
        try:
            return str(ipaddress.ip_address(ssh_hostname))
        except ValueError:
            pass
    return primary or None


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
    chain: Chain | None = None
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
    root-owned 0755, and the python3 it runs on (Debian's python3 package when its standard library is missing).
    The program runs only while a chain runs, started by the control machine over SSH.

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


# --- The running chain ----------------------------------------------------------------------


class Relay:
    """One relay process on one host, driven over OpenSSH: header and bytes in, events out."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.events: list[list[str]] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            words = raw.decode("utf-8", "replace").split()
            if words:
                with self.changed:
                    self.events.append(words)
                    self.changed.notify_all()
        with self.changed:
            self.events.append(["EXIT"])
            self.changed.notify_all()

    def send_header(self, header: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(header).encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, kinds: set[str], timeout: float | None = None) -> list[str] | None:
        with self.changed:
            self.changed.wait_for(
                lambda: any(e[0] in kinds or e[0] == "EXIT" for e in self.events), timeout
            )
            return next((e for e in self.events if e[0] in kinds or e[0] == "EXIT"), None)

    def event(self, kind: str) -> list[str] | None:
        with self.changed:
            return next((e for e in self.events if e[0] == kind), None)

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)
        errors = self.proc.stderr.read().decode("utf-8", "replace").strip()
        return self.proc.returncode, errors.splitlines()[-1] if errors else ""

    def served(self) -> int:
        event = self.event("SERVED")
        return int(event[1]) if event and len(event) > 1 and event[1].isdigit() else 0


class Chain:
    """The hosts receiving one model in this run, in the order they joined."""

    def __init__(self, model: Model, files: list[dict[str, Any]], sums: str, allowed: list[str],
                 active=lambda name: True):
        self.model = model
        self.active = active
        self.files = files
        self.total = sum(f["size"] for f in files)
        self.sums = sums
        self.allowed = allowed
        self.token = secrets.token_hex(32)
        self.joined: list[Member] = []
        self.finished: dict[str, bool] = {}
        self.seed: Member | None = None
        self.seed_relay: Relay | None = None
        self.closed = False
        self.last_join = time.monotonic()
        self.changed = threading.Condition()

    def header(self, mode: str, directory: str, member: Member) -> dict:
        return {
            "mode": mode, "dir": directory, "token": self.token, "files": self.files,
            "listen": [member.address, member.port], "allowed": self.allowed, "sums": self.sums,
            "stall_s": STALL_S, "give_up_s": GIVE_UP_S,
        }

    def join(self, member: Member) -> list[Member]:
        with self.changed:
            upstreams = upstreams_for(self.joined, self.seed)
            self.joined.append(member)
            self.last_join = time.monotonic()
            return upstreams

    def finish(self, name: str, ok: bool) -> None:
        with self.changed:
            self.finished[name] = ok
            self.changed.notify_all()

    def _complete(self) -> bool:
        if any(m.name not in self.finished for m in self.joined):
            return False
        coming = {n for n in self.model.needers if self.active(n)}
        if coming <= {m.name for m in self.joined}:
            return True
        return time.monotonic() - self.last_join > LATE_JOIN_S

    def wait_until_complete(self) -> None:
        """Every joined host has its bytes (or failed), and nobody else is coming: then every relay
        of this chain may stop listening."""
        with self.changed:
            while not self._complete():
                self.changed.wait(1.0)
            closing = not self.closed
            self.closed = True
        if closing and self.seed_relay is not None:
            self.seed_relay.stop()
            LEDGER.record_chain(self.seed.name, received=0, from_control=0,
                                served=self.seed_relay.served())


def _relay(name: str, data: dict[str, Any]) -> Relay:
    return Relay(name, ssh_argv(data, name, relay_command()))


def _start_seed(model: Model, chain: Chain) -> None:
    """The first holder that proves it holds this revision seeds the chain; none: the control
    machine feeds the head."""
    for candidate in list(model.holders.values()) + list(model.outside):
        if not candidate.address:
            continue
        member = Member(candidate.name, candidate.address, candidate.port)
        relay = _relay(candidate.name, candidate.data)
        relay.send_header(chain.header("seed", candidate.directory, member))
        event = relay.wait_for({"LISTENING", "FAILED"}, 60)
        if event and event[0] == "LISTENING":
            chain.seed, chain.seed_relay = member, relay
            logger.info(f"Model weights: {candidate.name} seeds the chain from its verified copy")
            return
        relay.stop()
        reason = " ".join(event[1:]) if event and event[0] == "FAILED" else "no answer"
        logger.info(f"Model weights: {candidate.name} cannot seed ({reason})")


def _chain_for(state, model: Model, request: dict[str, Any]) -> Chain:
    with model.lock:
        if model.chain is None or model.chain.closed:
            needs = {n: r.paths for n, r in model.needers.items()}
            files = union_files(request["listing"], needs)
            allowed = sorted({r.address for r in list(model.needers.values()) +
                              list(model.holders.values()) + list(model.outside) if r.address})
            with open(request["sums_path"], encoding="utf-8") as handle:
                sums = handle.read()
            by_name = {h.name: h for h in state.inventory}
            chain = Chain(model, files, sums, allowed,
                          active=lambda n: by_name.get(n) in state.active_hosts)
            _start_seed(model, chain)
            model.chain = chain
        return model.chain


def _feed(relay: Relay, files_dir: str, files: list[dict[str, Any]], sent: list[int],
          offset: int = 0) -> None:
    """The control machine's one copy: the cache's verified files, in stream order from byte
    `offset`, on a relay's stdin (OpenSSH carries it)."""
    try:
        for entry in files:
            if offset >= entry["size"]:
                offset -= entry["size"]
                continue
            with open(os.path.join(files_dir, entry["path"]), "rb") as handle:
                handle.seek(offset)
                offset = 0
                while True:
                    block = handle.read(1 << 20)
                    if not block:
                        break
                    relay.proc.stdin.write(block)
                    sent[0] += len(block)
        relay.proc.stdin.flush()
    except OSError:
        pass  # the relay went away: its FAILED line or its exit says why


def receive(state, host, key: list, request: dict[str, Any]) -> bool:
    """FunctionCommand body: this host joins the model's chain, receives the files it lacks into
    its staging directory, serves them on to the hosts that join after it until the chain is
    complete, then stops its relay. False (this host fails, alone) when its bytes did not come."""
    model = model_entry(tuple(key))
    me = model.needers[host.name]
    if not me.address:
        host.log_styled("Model weights: no cluster address for the relay (set "
                        "swarm_advertise_address)", fg="red", log_func=logger.error)
        return False
    chain = _chain_for(state, model, request)
    member = Member(host.name, me.address, me.port)
    relay = _relay(host.name, me.data)
    relay.send_header(chain.header("receive", me.directory, member))
    event = relay.wait_for({"LISTENING", "FAILED"}, 60)
    sent = [0]
    if event and event[0] == "LISTENING":
        upstreams = chain.join(member)
        relay.proc.stdin.write(json.dumps({"upstreams": [[u.address, u.port] for u in upstreams]})
                               .encode() + b"\n")
        relay.proc.stdin.flush()
        if not upstreams:
            threading.Thread(
                target=_feed, args=(relay, request["files_dir"], chain.files, sent), daemon=True
            ).start()
        source = (f"{upstreams[0].name}" + (" (chain)" if upstreams[0] != chain.seed else " (seed)")
                  if upstreams else "the control machine")
        event = relay.wait_for({"RECEIVED", "FAILED", "STARVED"})
        if event and event[0] == "STARVED":
            # Every host before this one died: the control machine feeds it the rest.
            offset = int(event[1])
            host.log_styled(f"Model weights: {request['name']}: no peer left upstream at byte "
                            f"{offset}: the control machine sends the rest", fg="yellow",
                            log_func=logger.warning)
            source = f"{source}, then the control machine"
            threading.Thread(target=_feed, args=(relay, request["files_dir"], chain.files, sent,
                                                 offset), daemon=True).start()
            event = relay.wait_for({"RECEIVED", "FAILED"})
    ok = bool(event) and event[0] == "RECEIVED"
    chain.finish(host.name, ok)
    chain.wait_until_complete()
    code, errors = relay.stop()
    if ok and code != 0:
        # Its bytes came, then the host (or the SSH connection to it) went away: it fails here,
        # not in the next command, which would find no connection.
        ok, event = False, ["FAILED", f"the relay's connection ended with exit {code} after the "
                            f"transfer{': ' + errors if errors else ''}"]
    LEDGER.record_chain(host.name, received=chain.total if ok else 0, from_control=sent[0],
                        served=relay.served(), files=len(chain.files) if sent[0] else 0)
    if not ok:
        reason = " ".join(event[1:]) if event and event[0] == "FAILED" else (errors or f"exit {code}")
        host.log_styled(f"Model weights: {request['name']}: relay failed: {reason}", fg="red",
                        log_func=logger.error)
        return False
    host.log_styled(
        f"Model weights: {request['name']}: received {human_bytes(chain.total)} from {source}"
        f" in {event[2]} s; served {human_bytes(relay.served())} to peers",
        log_func=logger.info,
    )
    return True
