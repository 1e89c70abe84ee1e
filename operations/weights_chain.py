"""Model weights between hosts, while the transfer runs: the relay processes (one per host,
driven over OpenSSH), the chain they form in the order hosts join it, its seed and its origin,
and the FunctionCommand each host's weights operation runs. The design, and who may join, is in
operations/weights_peers.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from typing import Any

from pyinfra import logger

from operations.weights_cache import LEDGER
from operations.weights_peers import (
    Member, Model, chain_files, chains_by_need, model_entry, relay_command, ssh_argv,
    upstreams_for,
)
from operations.weights_plan import human_bytes, read_token

# A late host (its staging took longer than the others') still joins this chain while it runs;
# once every joined host has its bytes and no other joined for this long, the chain closes.
LATE_JOIN_S = 20.0
# A healthy datacenter link never goes this long without a byte: the upstream is gone.
STALL_S = 15.0
# No upstream has given a byte for this long: the control machine feeds the host instead.
GIVE_UP_S = 40.0


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

    def __init__(self, hosts: list[str], files: list[dict[str, Any]], sums: str,
                 allowed: list[str], active=lambda name: True):
        self.hosts = list(hosts)  # the hosts of the run that lack exactly these files
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
        # A host that finished without joining (its relay never listened) is not coming.
        coming = {n for n in self.hosts if self.active(n) and n not in self.finished}
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
            LEDGER.record_chain(self.seed.name, served=self.seed_relay.served())


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


def _chain_for(state, model: Model, request: dict[str, Any], paths: frozenset[str]) -> Chain:
    """The running chain for hosts lacking exactly `paths` (started, with its seed, by the
    first of them to get here)."""
    with model.lock:
        chain = model.chains.get(paths)
        if chain is None or chain.closed:
            hosts = chains_by_need({n: r.paths for n, r in model.needers.items()})[paths]
            allowed = sorted({r.address for r in list(model.needers.values()) +
                              list(model.holders.values()) + list(model.outside) if r.address})
            with open(request["sums_path"], encoding="utf-8") as handle:
                sums = handle.read()
            by_name = {h.name: h for h in state.inventory}
            chain = Chain(hosts, chain_files(request["listing"], paths), sums, allowed,
                          active=lambda n: by_name.get(n) in state.active_hosts)
            _start_seed(model, chain)
            model.chains[paths] = chain
        return chain


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


def _origin(request: dict[str, Any]) -> str:
    return f"the Hub ({request['hub']['base']})" if request.get("hub") else "the control machine"


def _send_source(relay: Relay, upstreams: list[Member], request: dict[str, Any], chain: Chain,
                 sent: list[int], offset: int = 0) -> None:
    """Tell a relay where its bytes come from: peers; else the chain's origin, which is the
    control machine's own feed on its stdin (weights_source "control") or the Hub itself
    ("seeder": the token goes inside the SSH channel, to the relay's memory only)."""
    line: dict[str, Any] = {"upstreams": [[u.address, u.port] for u in upstreams]}
    hub = request.get("hub")
    if not upstreams and hub:
        token = read_token(hub.get("token_file"))
        line["hub"] = {"base": hub["base"], "token": token or None}
        sent[1] += chain.total - offset
    relay.proc.stdin.write(json.dumps(line).encode() + b"\n")
    relay.proc.stdin.flush()
    if not upstreams and not hub:
        threading.Thread(target=_feed, args=(relay, request["files_dir"], chain.files, sent,
                                             offset), daemon=True).start()


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
    chain = _chain_for(state, model, request, frozenset(me.paths))
    member = Member(host.name, me.address, me.port)
    relay = _relay(host.name, me.data)
    relay.send_header(chain.header("receive", me.directory, member))
    event = relay.wait_for({"LISTENING", "FAILED"}, 60)
    sent = [0, 0]  # bytes the control machine sent this host, bytes it was told to get from the Hub
    if event and event[0] == "LISTENING":
        upstreams = chain.join(member)
        _send_source(relay, upstreams, request, chain, sent)
        source = (f"{upstreams[0].name}" + (" (chain)" if upstreams[0] != chain.seed else " (seed)")
                  if upstreams else _origin(request))
        event = relay.wait_for({"RECEIVED", "FAILED", "STARVED"})
        if event and event[0] == "STARVED":
            # Every host before this one died: it gets the rest from the chain's origin.
            offset = int(event[1])
            host.log_styled(f"Model weights: {request['name']}: no peer left upstream at byte "
                            f"{offset}: {_origin(request)} sends the rest", fg="yellow",
                            log_func=logger.warning)
            source = f"{source}, then {_origin(request)}"
            _send_source(relay, [], request, chain, sent, offset)
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
    LEDGER.record_chain(host.name, from_control=sent[0], served=relay.served(),
                        files=len(chain.files) if sent[0] else 0,
                        from_hub=sent[1] if ok else 0, model=request["name"])
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
