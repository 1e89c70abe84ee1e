"""Which Swarm nodes the stack phase waits for before it plans placement (issue 20).

A node this run restarted (its Docker, its host), or any node once the run changed the Swarm's
membership or restarted a manager's Docker, is "down" to the managers for a few seconds:
operations/phase.disturbed_nodes names them, and they are waited for. Any other down node is reported once, with the reason, and not waited for: it will
not come back by waiting, and the stack is placed on the ready nodes.

    listed = wait_for_nodes(read_fact(host, SwarmNodes), disturbed_nodes(state, managers),
                            lambda name: why_node_down(state, name))
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pyinfra import host, logger

from operations.phase import unreachable
from operations.swarm import SwarmNodes

NODE_READY_WAIT_S = 90


def node_host(node: dict[str, Any]) -> str:
    """The inventory host of a Swarm node: its gpufleet.host label (the swarm phase sets it),
    else its hostname."""
    return (node.get("labels") or {}).get("gpufleet.host") or node.get("hostname", "?")


def down_nodes(listed: dict[str, Any]) -> list[dict[str, Any]]:
    """Active nodes that are not ready (drained or paused nodes are not expected to serve)."""
    return [n for n in listed["nodes"]
            if n.get("availability") == "active" and n.get("state") != "ready"]


def why_node_down(state, name: str) -> str:
    """Why a down node's host will not bring it back during this run."""
    other = state.inventory.get_host(name, None)
    if other is None:
        return "not an inventory host"
    if unreachable(other):
        return "its host could not be reached in this run"
    if other in state.failed_hosts:
        return "its host failed earlier in this run"
    if not state.is_host_in_limit(other):
        return "its host is not in this run (--limit)"
    return "it was down before this run, which did not restart its Docker"


def wait_for_nodes(listed: dict[str, Any], disturbed: set[str], why_down: Callable[[str], str],
                   wait_s: float = NODE_READY_WAIT_S, poll_s: float = 3.0) -> dict[str, Any]:
    """Re-read the Swarm's nodes until every down node whose host this run disturbed
    (`disturbed`: inventory names, from phase.disturbed_nodes) is ready, or `wait_s` has passed
    (a node that stays down is then planned without; the fit check says so with the numbers).
    Other down nodes are reported once, with `why_down(host name)`, and not waited for."""
    for node in down_nodes(listed):
        if node_host(node) not in disturbed:
            host.log_styled(f"Swarm node {node.get('hostname', '?')} is down "
                            f"({why_down(node_host(node))}): not waited for; the stack is placed "
                            "on the ready nodes", fg="yellow", log_func=logger.warning)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        waiting = [n["hostname"] for n in down_nodes(listed) if node_host(n) in disturbed]
        if not waiting:
            break
        host.log_styled(f"waiting for Swarm nodes this run restarted or re-formed: "
                        f"{', '.join(waiting)}")
        time.sleep(poll_s)
        listed = host.get_fact(SwarmNodes)
    return listed
