"""What phases share: the result one phase hands to the next, and how a problem on one host
fails that host alone.

pyinfra 3.10 aborts the whole run, for every host and with a traceback, when an operation raises
OperationError while it executes. A host-specific problem (a refused key, a Hub that answers
500, a driver that needs a forbidden reboot) must instead fail that host only: pyinfra runs no
later operation on a failed host and the other hosts go on. Operations therefore raise
OperationError as usual, and `@fails_only_this_host` turns it into a failing command.
"""

from __future__ import annotations

import copy
import functools
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from gevent.lock import RLock
from pyinfra import host, logger
from pyinfra.api import FunctionCommand, OperationError


class PhaseResult:
    """Whether any of a phase's operations changed the host; asked at execution time (an
    operation's `_if=` callable), when the operations have run."""

    def __init__(self, ops: list[Any]):
        self.ops = ops

    def changed(self) -> bool:
        return any(op.did_change() for op in self.ops)


def fail_host(state, host, reason: str) -> bool:
    """A FunctionCommand that fails the host it runs for, and only it, with one line saying why.

    pyinfra passes state and host, and honours the return value, only to functions that take
    both: False marks the operation "Error" for this host, and pyinfra drops the host from the
    active hosts, so none of its later operations run."""
    host.log_styled(reason, fg="red", log_func=logger.error)
    return False


def fails_only_this_host(func: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Put under `@operation()`: an OperationError raised by the operation fails this host
    alone (see the module docstring) instead of aborting the run for every host."""

    @functools.wraps(func)
    def operation_body(*args, **kwargs):
        try:
            yield from func(*args, **kwargs)
        except OperationError as error:
            yield FunctionCommand(fail_host, (str(error),), {})

    return operation_body


# --- What an operation tells the drift check (scripts/drift_check.py) -----------------------
#
# The deploy itself ignores both records below; the drift check plans the run without executing
# it and reads them per host and operation. They are kept per State (a weak key: a finished run's
# records go with it), so one process may plan several runs.

_NOTES: "weakref.WeakKeyDictionary[Any, list[tuple[str, str | None, str, str, str | None]]]" = (
    weakref.WeakKeyDictionary()
)

EXPLAIN = "explain"
FINDING = "finding"


def _record(kind: str, text: str, about: str | None = None) -> None:
    try:
        notes = _NOTES.setdefault(host.state, [])
    except TypeError:  # a test harness's stand-in state that cannot be weakly referenced
        return
    entry = (host.name, host.current_op_hash, kind, text, about)
    if entry not in notes:  # an operation body may be planned more than once
        notes.append(entry)


def explain(text: str, about: str | None = None) -> None:
    """Say in words what the current operation is about to change (and why), before it yields
    its commands: the drift check shows this instead of the raw commands. `about`: the inventory
    host the change is about when it is made from another one (a manager labels every node)."""
    _record(EXPLAIN, text, about)


def finding(text: str) -> None:
    """Something the deploy sees but leaves to an operator (a Swarm node no inventory host
    accounts for): a noop for the deploy, drift for the drift check."""
    host.noop(text)
    _record(FINDING, text)


def notes_of(state) -> list[tuple[str, str | None, str, str, str | None]]:
    """(host name, operation hash, EXPLAIN or FINDING, text, about) recorded while planning
    `state`."""
    return list(_NOTES.get(state, []))


# pyinfra keeps one SSH connection per host, and sshd refuses more sessions at once on one
# connection than its MaxSessions (10 by default): when many hosts read the same manager in
# parallel (the Swarm join's token and SwarmInfo, the smoke tests' SmokeStack), the reads
# beyond that fail with ChannelException(2, 'Connect failed') (seen with 10 lab hosts). So
# reads and commands on *another* host take turns, one at a time per host. pyinfra runs hosts
# as gevent greenlets: the lock is gevent's (reentrant, owned by a greenlet).
_TURNS: dict[str, RLock] = {}


def other_host_turn(other) -> RLock:
    """The lock to hold while using another host's connection."""
    return _TURNS.setdefault(other.name, RLock())  # no yield in between: no race


def host_sudo(target) -> bool:
    """Whether commands on `target` run with sudo: its own `_sudo` data. Said explicitly when
    one host uses another's connection: pyinfra would apply the current host's operation
    arguments."""
    return bool(target.data.get("_sudo"))


class HostUnreachable(Exception):
    """Another host this run cannot reach: it did not answer pyinfra's connection at the start
    (or a read of this run already failed to connect to it). Raised at once, not after another
    SSH connect timeout: every later read of that host would wait out the same timeout again,
    one turn at a time (issue 20: 10 s per read on a 3-manager fleet with its leader down)."""


# Hosts a read in this run failed to connect to, per State: never tried again in that run.
_UNREACHABLE: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


def unreachable(other) -> bool:
    """Whether this run could not connect to `other`: failed at pyinfra's own connection (in
    failed_hosts, never connected), or at an earlier read of this run's."""
    state = getattr(other, "state", None)
    if state is None:
        return False
    if other in getattr(state, "failed_hosts", ()) and not other.connected:
        return True
    try:
        return other.name in _UNREACHABLE.get(state, ())
    except TypeError:  # a test harness's stand-in state that cannot be weakly referenced
        return False


@contextmanager
def on_other_host(other):
    """Another inventory host, connected (a host outside this run too: then only read), while
    holding its turn. HostUnreachable at once for a host this run could not connect to."""
    with other_host_turn(other):
        if unreachable(other):
            raise HostUnreachable(f"{other.name} could not be reached in this run")
        if not other.connected:
            try:
                other.connect(raise_exceptions=True)
            except Exception:
                try:
                    _UNREACHABLE.setdefault(other.state, set()).add(other.name)
                except TypeError:
                    pass
                raise
        yield other


def other_host_fact(other, fact_cls, **kwargs) -> Any:
    """A fact of another inventory host, with that host's own sudo, read once while nothing
    changes (read_fact)."""
    with on_other_host(other):
        return read_fact(other, fact_cls, _sudo=host_sudo(other), **kwargs)


# --- Swarm nodes this run may have made not ready for a while ---------------------------------
#
# A node whose Docker (or whole host) this run restarted is "down" to the Swarm's managers for a
# few seconds, and so is every node for a few seconds after the Swarm's membership changed (a
# promotion or demotion: seen on the lab, the demoting manager listed all three nodes down) or a
# manager's own Docker restarted (it lists every other node down until it hears from it). The
# stack phase waits for those nodes, and only those (issue 20): a node that was already down, or
# whose host this run could not reach or failed, will not come back by waiting. Each host's
# deploy says which of its operations restart its Docker (DOCKER: the driver's reboot, a changed
# daemon.json, an engine installed or started) and which change the Swarm (SWARM); asked once
# they have run.
DOCKER = "docker"
SWARM = "swarm"
_DISTURBANCES: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], PhaseResult]]" = (
    weakref.WeakKeyDictionary()
)


def note_node_changes(target, kind: str, result: PhaseResult) -> None:
    """Remember `result`: operations of `target` that, when they change something, leave Swarm
    nodes not ready for a while (kind DOCKER: this host's node; SWARM: every node)."""
    try:
        _DISTURBANCES.setdefault(target.state, {})[(kind, target.name)] = result
    except TypeError:  # a test harness's stand-in state that cannot be weakly referenced
        pass


def _changed(result: PhaseResult) -> bool:
    # An operation that never ran (its host failed before it) changed nothing.
    return any(op.is_complete() and op.did_change() for op in result.ops)


def disturbed_nodes(state, managers: set[str] = frozenset()) -> set[str]:
    """Names of the hosts whose Swarm node this run (so far) may have left not ready: those
    whose Docker it restarted, and every host still in the run once the Swarm's membership
    changed or a manager's Docker restarted (`managers`: swarm_managers; seen on the lab: a
    manager whose Docker restarted lists the other nodes down until their next heartbeat)."""
    try:
        noted = _DISTURBANCES.get(state, {})
    except TypeError:
        return set()
    changed = {(kind, name) for (kind, name), result in noted.items() if _changed(result)}
    hosts = {name for kind, name in changed if kind == DOCKER}
    if hosts & set(managers) or any(kind == SWARM for kind, _ in changed):
        hosts |= {h.name for h in state.active_hosts}
    return hosts


# --- Reading a fact once while nothing changes ----------------------------------------------

# pyinfra 3 caches no fact: every `get_fact` is a remote command. A phase reads the same state
# from several operations (each NvidiaHost operation, the manager's Swarm operations reading
# every node), so a run that changes nothing sent ~30 commands per host and, on the acting
# manager, a few more for every host of the fleet (issue 9). `read_fact` reads a fact again
# only when some operation, on any host, has run commands since the last read: whatever one
# host does can change what another reports (a manager promoting a node changes the node's
# SwarmInfo). A run that changes nothing therefore reads each fact once.
#
# Use it where an operation reads the state it starts from, before it yields its first
# command. Never for a poll (a loop waiting for a state to change within one operation: no
# operation completes in between, so it would read the same answer forever).
_READS: "weakref.WeakKeyDictionary[Any, dict[tuple, tuple[int, Any]]]" = (
    weakref.WeakKeyDictionary()
)


def changes_so_far(state) -> int:
    """Operations, over every host, that have run commands so far in this run."""
    return sum(
        1
        for host_ops in state.ops.values()
        for data in host_ops.values()
        if data.operation_meta.executed  # False until the operation completes
    )


def read_fact(target, fact_cls, **kwargs) -> Any:
    """`target.get_fact(fact_cls, **kwargs)`, read again only if an operation has run commands
    since this fact of this host was last read in this run. Returns a copy: a caller that edits
    the answer does not edit the next caller's."""
    state = getattr(target, "state", None)
    if not isinstance(getattr(state, "ops", None), dict):  # a test harness's fake state
        return target.get_fact(fact_cls, **kwargs)
    # Executor arguments (`_sudo`) stay out of the key: the project reads every fact with the
    # host's own settings, whether an operation passes them or pyinfra applies the host's data.
    key = (target.name, fact_cls,
           tuple(sorted((k, repr(v)) for k, v in kwargs.items() if not k.startswith("_"))))
    reads = _READS.setdefault(state, {})
    generation = changes_so_far(state)
    cached = reads.get(key)
    if cached is None or cached[0] != generation:
        cached = (generation, target.get_fact(fact_cls, **kwargs))
        reads[key] = cached
    return copy.deepcopy(cached[1])
