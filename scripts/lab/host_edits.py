"""Operator edits of the lab inventory, pure: what `lab.py set / unset / forget / remember /
managers` do to the state in .lab/<lab>/hosts.json (scripts/lab/fleet.py reads and writes it,
and keeps the edits when `up` rewrites it: fleet.keep_operator_edits)."""

from __future__ import annotations

import json
import re

from scripts.lab.fleet import LabError


def parse_assignment(text: str) -> tuple[str, object]:
    """`key=value` as an operator types it: the value is JSON when it parses (true, 3, ["a"],
    {"k": "v"}), else the plain string. The inventory's check judges the key and the value."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
        raise LabError(f"{text!r}: expected key=value with a lowercase key (e.g. swarm_retire=true)")
    if key.startswith("lab_") or key.startswith("ssh_"):
        raise LabError(f"{key}: lab_* and ssh_* keys are the lab's own; not settable")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _entry(state: dict, node: str) -> dict:
    for entry in state.get("hosts", []):
        if entry["name"] == node:
            return entry
    names = ", ".join(e["name"] for e in state.get("hosts", []))
    raise LabError(f"no host {node} in lab {state.get('lab')} (hosts: {names})")


def _named(state: dict, nodes: str) -> list[dict]:
    """The host entries `nodes` names: one host, several comma-separated, or "all"."""
    if nodes == "all":
        return list(state.get("hosts", []))
    return [_entry(state, name) for name in nodes.split(",") if name]


def set_host_data(state: dict, nodes: str, assignments: list[str]) -> dict:
    """Add or change keys of the inventory data of `nodes` (see _named), in one edit: a key the
    stack reads fleet-wide changes on every host at once (the inventory refuses hosts that
    disagree)."""
    values = dict(parse_assignment(text) for text in assignments)
    for entry in _named(state, nodes):
        entry["data"] = {**(entry.get("data") or {}), **values}
    return state


def unset_host_data(state: dict, nodes: str, keys: list[str]) -> dict:
    """Remove keys from the inventory data of `nodes` (see _named), back to the group's value,
    in one edit."""
    for entry in _named(state, nodes):
        data = dict(entry.get("data") or {})
        missing = [key for key in keys if key not in data]
        if missing:
            raise LabError(f"{entry['name']} has no data key {', '.join(missing)} "
                           f"(set: {', '.join(data) or 'none'})")
        for key in keys:
            del data[key]
        if data:
            entry["data"] = data
        else:
            entry.pop("data", None)
    return state


def set_forgotten(state: dict, node: str, forgotten: bool) -> dict:
    """Take a host out of the inventory (its container keeps running) or put it back."""
    entry = _entry(state, node)
    if forgotten:
        entry["forgotten"] = True
    else:
        entry.pop("forgotten", None)
    return state


def set_manager_count(state: dict, count: int) -> dict:
    """How many of the first inventory hosts form swarm_managers (the deploy checks 1, 3, 5)."""
    listed = [entry for entry in state.get("hosts", []) if not entry.get("forgotten")]
    if not 1 <= count <= len(listed):
        raise LabError(f"managers {count}: the inventory lists {len(listed)} host(s)")
    state["swarm_managers"] = count
    return state
