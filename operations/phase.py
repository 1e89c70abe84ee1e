"""What one phase hands to the next."""

from __future__ import annotations

from typing import Any


class PhaseResult:
    """Whether any of a phase's operations changed the host; asked at execution time (an
    operation's `_if=` callable), when the operations have run."""

    def __init__(self, ops: list[Any]):
        self.ops = ops

    def changed(self) -> bool:
        return any(op.did_change() for op in self.ops)
