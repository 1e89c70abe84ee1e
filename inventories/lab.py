"""The lab fleet, as `python3 scripts/lab.py up` left it (.lab/<lab>/hosts.json).

    python3 scripts/lab.py up                      # hosts + the deploy
    .venv/bin/pyinfra inventories/lab.py deploy.py  # deploy again (LAB_NAME picks the lab)

Group data for every host of this file: group_data/lab.py (the lab's overrides).

Operator edits, as one would edit a real inventory (scripts/lab.py set/unset/forget/remember/
managers write them into hosts.json): a host's "data" is merged into its data last (it wins),
a "forgotten" host is left out (its container keeps running), and "swarm_managers" says how
many of the first listed hosts are managers (default 1).
"""

import json
import os
from pathlib import Path

from operations.config import validate_inventory
from scripts.lab.fleet import capped_replicas

_lab = os.environ.get("LAB_NAME") or "gpulab"
_state_file = Path(__file__).resolve().parent.parent / ".lab" / _lab / "hosts.json"
if not _state_file.exists():
    raise SystemExit(f"lab {_lab} is not up: run `python3 scripts/lab.py up` first")
_state = json.loads(_state_file.read_text())


def _lab_settings(hosts):
    """The stand-ins' settings, with each model's replicas capped at the lab's host count."""
    settings = dict(_state.get("settings", {}))
    if "models" in settings:
        settings["models"] = capped_replicas(settings["models"], len(hosts))
    return settings


_settings = _lab_settings([e for e in _state["hosts"] if not e.get("forgotten")])


def _host(entry):
    return (
        entry["name"],
        {
            "ssh_hostname": entry["address"],
            "ssh_user": _state["ssh_user"],
            "ssh_key": _state["ssh_key"],
            "ssh_known_hosts_file": _state["known_hosts"],
            "ssh_strict_host_key_checking": "yes",
            # A lab host is on a local bridge: a live one answers a TCP connect in well under a
            # millisecond, so a stopped one costs a run 1 s, not pyinfra's default 10 s (or the
            # 3 s the kernel's ARP takes to give up). pyinfra's own key, as any inventory's.
            "ssh_paramiko_connect_kwargs": {"timeout": 1},
            "lab_container": entry["container"],
            # The stand-ins `lab.py up` started (NVIDIA's repositories, ...): production keys
            # pointed at them. This is the only way a stand-in enters a run.
            **_settings,
            # The operator's own per-host data (`lab.py set NODE key=value`): host data wins.
            **entry.get("data", {}),
        },
    )


gpu_nodes = [_host(entry) for entry in _state["hosts"] if not entry.get("forgotten")]
swarm_managers = [name for name, _ in gpu_nodes[: _state.get("swarm_managers", 1)]]

validate_inventory(globals())
