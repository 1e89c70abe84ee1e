"""What a drill cost, judged against its target: pure functions over the requests the load sent
and the moments the drill recorded (tests/unit/test_drills.py calls them directly).

The load goes through the gateways, so a request does not say which engine served it. A fault
may therefore cost, at most, the requests that were in flight when it struck: a superset of
those on the broken part, the honest bound a client-side count can give. When it struck is a
window, from just before the command that breaks something was sent to when it returned (an
SSH round trip: about half a second). Drills
that break nothing in the serving path (a corrupted file, a Hub that fails, an interrupted run)
may cost nothing at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from scripts.drill.load import DrillRequest

# A hung engine's requests must end this soon after the gateway marks it down (issue 23).
HUNG_END_WITHIN_S = 10.0


@dataclass(frozen=True)
class Allowance:
    """Which failed requests the fault may cost."""

    in_flight: bool = True      # those in flight at the fault's instant
    streams_only: bool = False  # ...streamed ones only: a non-streamed request is retried elsewhere


NONE = Allowance(in_flight=False)


def judge(requests: list[DrillRequest], fault_at: float, allowance: Allowance,
          struck_by: float | None = None) -> dict:
    """Counts, and the failures beyond the allowance (each one a broken target). The fault
    struck between `fault_at` and `struck_by` (default: that instant)."""
    failed = [r for r in requests if not r.ok]

    def allowed(r: DrillRequest) -> bool:
        return (allowance.in_flight and r.in_flight_at(fault_at, struck_by)
                and (r.stream or not allowance.streams_only))

    beyond = [r for r in failed if not allowed(r)]
    return {
        "sent": len(requests),
        "streamed": sum(1 for r in requests if r.stream),
        "in_flight_at_fault": sum(1 for r in requests if r.in_flight_at(fault_at, struck_by)),
        "failed": len(failed),
        "failed_in_flight": len(failed) - len(beyond),
        "failed_beyond_target": len(beyond),
        "failed_over": sum(1 for r in requests if r.failovers),
        # When the failures beyond the target began and ended, from the fault (a closed loop
        # sends fast failures fast: the span says how long users were failed, the count less).
        "beyond_target_s": ([round(beyond[0].started - fault_at, 1),
                             round(max(r.ended for r in beyond) - fault_at, 1)]
                            if beyond else None),
        "failures": [describe(r, fault_at) for r in failed[:10]],
    }


def describe(r: DrillRequest, fault_at: float) -> str:
    kind = "stream" if r.stream else "plain"
    return (f"{kind} started {r.started - fault_at:+.1f}s, ended {r.ended - fault_at:+.1f}s "
            f"after the fault: {r.record.error or f'HTTP {r.record.status}'}")[:240]


# --- the gateway's log ----------------------------------------------------------------------

# HAProxy, when a health check takes a server out: "Server be_tiny_llama/node-2 is DOWN, ...".
_DOWN = re.compile(r"Server (\S+)/(\S+) is DOWN")
# The stack's log-format: "%ci:%cp [%tr] %ft %b/%s ..." (templates/haproxy.cfg.j2).
_REQUEST = re.compile(r"\[(\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2}\.\d{3})\] \S+ (\S+)/(\S+) ")


def marked_down(events: list[tuple[float, str]], server: str, after: float) -> float | None:
    """When the gateway first marked `server` (a node name) down after `after`."""
    return min((when for when, line in events
                if when >= after and (m := _DOWN.search(line)) and m.group(2) == server),
               default=None)


def requests_sent_to(events: list[tuple[float, str]], server: str, after: float,
                     before: float) -> int:
    """Requests the gateway received between `after` and `before` and gave to `server`
    (HAProxy's %tr, its accept date, in the container's clock: UTC)."""
    count = 0
    for _, line in events:
        m = _REQUEST.search(line)
        if not m or m.group(3) != server or not m.group(2).startswith("be_"):
            continue
        accepted = datetime.strptime(m.group(1), "%d/%b/%Y:%H:%M:%S.%f")
        if after < accepted.replace(tzinfo=timezone.utc).timestamp() < before:
            count += 1
    return count


def hung_verdict(requests: list[DrillRequest], down_at: float | None, sent_after_down: int) -> dict:
    """A hung engine: the gateway marked it down, every request in flight then ended within
    HUNG_END_WITHIN_S, and no request was given to it afterwards."""
    if down_at is None:
        return {"marked_down": False, "ok": False, "why": "the gateway never marked it down"}
    in_flight = [r for r in requests if r.in_flight_at(down_at)]
    last_end = max((r.ended for r in in_flight), default=down_at)
    ended_within = last_end - down_at
    problems = []
    if ended_within > HUNG_END_WITHIN_S:
        problems.append(f"a request in flight at the mark-down ended {ended_within:.1f} s later")
    if sent_after_down:
        problems.append(f"{sent_after_down} request(s) given to it after it was marked down")
    return {"marked_down": True, "in_flight_at_down": len(in_flight),
            "ended_within_s": round(ended_within, 2), "sent_after_down": sent_after_down,
            "ok": not problems, "why": "; ".join(problems)}
