"""What phases share: the result one phase hands to the next, and how a problem on one host
fails that host alone.

pyinfra 3.10 aborts the whole run, for every host and with a traceback, when an operation raises
OperationError while it executes. A host-specific problem (a refused key, a Hub that answers
500, a driver that needs a forbidden reboot) must instead fail that host only: pyinfra runs no
later operation on a failed host and the other hosts go on. Operations therefore raise
OperationError as usual, and `@fails_only_this_host` turns it into a failing command.
"""

from __future__ import annotations

import functools
import weakref
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
