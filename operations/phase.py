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
from typing import Any, Callable, Iterator

from pyinfra import logger
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
