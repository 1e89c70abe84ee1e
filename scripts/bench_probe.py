#!/usr/bin/env python3
"""pyinfra's own CLI, run with counters: what `scripts/bench.py` measures one deploy with.

    .venv/bin/python scripts/bench_probe.py COUNTS.json -- -y inventories/lab.py deploy.py

Everything after `--` goes to pyinfra unchanged; the run is exactly `pyinfra ARGS` (same CLI,
same output, same exit status). When it ends, COUNTS.json holds, per inventory host:

- `commands`: every command sent over that host's SSH connection (paramiko exec), counted in the
  SSH connector itself: fact commands, operation commands, the commands a FunctionCommand runs
  (the Swarm join, reads on another host), and the helper commands the connector adds for a
  sudo upload (so nothing an operation does on a host is missed);
- `uploads` / `downloads`: files sent / fetched over SFTP;
- `facts`: facts gathered (pyinfra 3 caches none: each get_fact runs its command; the
  project's `read_fact` reads once while nothing changes), with the count by fact name;
- `changed_operations`: operations that ran commands on the host (what pyinfra reports as
  changes);
- each split by stage (`prepare`: planning, `execute`: running the operations);

and for the run: wall time, the time spent planning (until the first operation starts) and the
wall time of each deploy phase (the sum of its operations' wall times; the phase is the
@deploy name pyinfra prefixes to each operation's name, e.g. "Docker Swarm | ...").

Why wrap rather than parse `-v`/`--debug` output: the debug log's wording changes between
pyinfra releases and a FunctionCommand's own commands are not printed; counting at the
connector is exact. Patches are installed before pyinfra's CLI runs and only count.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTED = time.monotonic()


def _counter():
    return defaultdict(lambda: defaultdict(int))


class Counts:
    """Per-host counters, safe under pyinfra's greenlets and the weights phase's threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.hosts = defaultdict(_counter)  # host -> kind -> stage -> n
        self.fact_names = defaultdict(lambda: defaultdict(int))  # host -> fact -> n
        self.first_op_at: float | None = None
        self.op_started: dict[str, float] = {}
        self.phase_s: dict[str, float] = defaultdict(float)
        self.state = None

    def stage(self) -> str:
        state = self.state
        stage = getattr(state, "current_stage", None) if state is not None else None
        return "execute" if stage is not None and int(stage) >= 4 else "prepare"  # Execute, Disconnect

    def add(self, host: str, kind: str, fact: str | None = None) -> None:
        with self.lock:
            self.hosts[host][kind][self.stage()] += 1
            if fact:
                self.fact_names[host][fact] += 1

    def changed_operations(self) -> dict[str, int]:
        """Per host, the operations that ran commands (pyinfra counts them as changes)."""
        if self.state is None:
            return {}
        return {host.name: sum(1 for data in ops.values() if data.operation_meta.executed)
                for host, ops in self.state.ops.items()}

    def as_json(self, exit_code) -> dict:
        ended = time.monotonic()
        changed = self.changed_operations()
        hosts = {}
        for name, kinds in sorted(self.hosts.items()):
            entry = {}
            for kind in ("commands", "uploads", "downloads", "facts"):
                stages = dict(kinds.get(kind, {}))
                entry[kind] = sum(stages.values())
                entry[f"{kind}_by_stage"] = stages
            entry["fact_names"] = dict(sorted(self.fact_names[name].items()))
            entry["changed_operations"] = changed.get(name, 0)
            hosts[name] = entry
        first = self.first_op_at
        return {
            "wall_s": round(ended - STARTED, 3),
            "prepare_s": round((first if first else ended) - STARTED, 3),
            "phase_s": {k: round(v, 3) for k, v in self.phase_s.items()},  # in run order
            "exit_code": exit_code,
            "hosts": hosts,
        }


COUNTS = Counts()


def phase_of(names) -> str:
    """The deploy phase of an operation from its names ("Docker Swarm | Join ..."), or
    "(no phase)" for an operation outside any @deploy."""
    for name in sorted(names or []):
        if " | " in name:
            return name.split(" | ", 1)[0]
    return "(no phase)"


def install() -> None:
    """Count at the SSH connector and in fact gathering; time operations with a callback."""
    from pyinfra.api import facts, state as state_module
    from pyinfra.connectors import ssh

    run_shell_command = ssh.SSHConnector.run_shell_command
    put_file = ssh.SSHConnector.put_file
    get_file = ssh.SSHConnector.get_file
    get_fact = facts._get_fact
    state_init = state_module.State.init  # callback handlers exist once init has run

    def counted_run(self, *args, **kwargs):
        COUNTS.add(self.host.name, "commands")
        return run_shell_command(self, *args, **kwargs)

    def counted_put(self, *args, **kwargs):
        COUNTS.add(self.host.name, "uploads")
        return put_file(self, *args, **kwargs)

    def counted_get(self, *args, **kwargs):
        COUNTS.add(self.host.name, "downloads")
        return get_file(self, *args, **kwargs)

    def counted_fact(state, host, cls, *args, **kwargs):
        COUNTS.add(host.name, "facts", fact=getattr(cls, "__name__", str(cls)))
        return get_fact(state, host, cls, *args, **kwargs)

    class Timer(state_module.BaseStateCallback):
        @staticmethod
        def operation_start(state, op_hash):
            now = time.monotonic()
            with COUNTS.lock:
                COUNTS.first_op_at = COUNTS.first_op_at or now
                COUNTS.op_started[op_hash] = now

        @staticmethod
        def operation_end(state, op_hash):
            now = time.monotonic()
            with COUNTS.lock:
                started = COUNTS.op_started.pop(op_hash, None)
                if started is not None:
                    phase = phase_of(state.get_op_meta(op_hash).names)
                    COUNTS.phase_s[phase] += now - started

    def init(self, *args, **kwargs):
        result = state_init(self, *args, **kwargs)
        COUNTS.state = self
        self.add_callback_handler(Timer())
        return result

    ssh.SSHConnector.run_shell_command = counted_run
    ssh.SSHConnector.put_file = counted_put
    ssh.SSHConnector.get_file = counted_get
    facts._get_fact = counted_fact
    state_module.State.init = init


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: bench_probe.py COUNTS.json -- PYINFRA_ARGS...", file=sys.stderr)
        return 2
    out = Path(argv[0])
    exit_code: list = [None]

    def write() -> None:
        out.write_text(json.dumps(COUNTS.as_json(exit_code[0]), indent=2) + "\n")

    atexit.register(write)  # pyinfra's CLI ends with sys.exit
    sys.path.insert(0, str(REPO_ROOT))
    from pyinfra_cli.main import main as pyinfra_main  # may monkey-patch for gevent: first

    COUNTS.lock = threading.Lock()  # the lock of whatever threading is now
    install()

    sys.argv = ["pyinfra", *argv[2:]]
    try:
        pyinfra_main()
        exit_code[0] = 0
    except SystemExit as stop:
        exit_code[0] = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
