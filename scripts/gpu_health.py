#!/usr/bin/env python3
"""The health of every GPU of the fleet, per host and GPU, read only: what the deploy would keep
out of serving, and why.

    python scripts/gpu_health.py INVENTORY [--json FILE] [--data KEY=VALUE]

Reads each host's GpuHealth and NvidiaHost facts (operations/gpu_health.py: one round trip for
the health, one for the GPUs) and the GPUs its daemon.json advertises to Swarm, then prints one
row per GPU: host, index, UUID, PCI address, whether it serves, and every reason it must not
(README, "GPU health"). A GPU that is unhealthy but still advertised is one the next run will
take out; a healthy one not advertised, one it will let back in.

Exit status, for a scheduler (as the drift check's): 0 every GPU healthy, 2 an unhealthy GPU,
1 a host that could not be read (the others are still read and reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.fleet_access import reexec_in_venv  # noqa: E402

reexec_in_venv()

from operations import gpu_health as gh  # noqa: E402
from operations.docker_engine import DaemonJson  # noqa: E402
from operations.nvidia import NvidiaHost  # noqa: E402
from scripts.fleet_access import fleet_or_refuse  # noqa: E402

EXIT_HEALTHY, EXIT_HOST_FAILED, EXIT_UNHEALTHY = 0, 1, 2
HEADER = ("host", "gpu", "uuid", "pci", "state", "advertised", "reason")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON here")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key, as pyinfra's --data")
    return parser.parse_args(argv)


def host_rows(name: str, health: dict, nvidia: dict, daemon: dict) -> list[dict]:
    """One row per GPU of a host: the listed ones, and any the health fact knows of only (a lost
    GPU, an Xid for an address nvidia-smi no longer lists)."""
    if not health["available"]:
        return [{"host": name, "state": "not read", "reason": health["error"]}]
    advertised = gh.advertised_uuids(daemon)
    listed = [gpu["uuid"] for gpu in nvidia.get("gpus") or []]
    unhealthy = gh.name_lost_gpus(gh.unhealthy_gpus(health), advertised, listed)
    bad = {gh.bus_key(gpu["pci_bus_id"]): gpu for gpu in unhealthy}
    rows = []
    for gpu in health["gpus"]:
        found = bad.get(gh.bus_key(gpu["pci_bus_id"]))
        uuid = (found or gpu)["uuid"]
        rows.append({"host": name, "gpu": gpu["index"], "uuid": uuid, "pci": gpu["pci_bus_id"],
                     "state": "UNHEALTHY" if found else "healthy",
                     "advertised": uuid in advertised if uuid else False,
                     "reason": "; ".join(found["reasons"]) if found else ""})
    return rows


def read_host(fleet, name: str) -> list[dict]:
    try:
        health = fleet.read_fact(name, gh.GpuHealth)
        nvidia = fleet.read_fact(name, NvidiaHost)
        daemon = fleet.read_fact(name, DaemonJson)
    except Exception as error:  # unreachable, or a fact that failed: reported, the rest go on
        return [{"host": name, "state": "unreachable", "reason": str(error).splitlines()[0][:200]}]
    return host_rows(name, health, nvidia, daemon)


def render(rows: list[dict]) -> str:
    cells = [HEADER] + [tuple("" if row.get(key) is None else str(row.get(key, ""))
                              for key in HEADER) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip()
                     for line in cells)


def exit_code(rows: list[dict]) -> int:
    if any(row["state"] in ("unreachable", "not read") for row in rows):
        return EXIT_HOST_FAILED
    return EXIT_UNHEALTHY if any(row["state"] == "UNHEALTHY" for row in rows) else EXIT_HEALTHY


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    fleet, _ = fleet_or_refuse(args.inventory, args.data)
    rows = [row for name in fleet.hosts for row in read_host(fleet, name)]
    print(render(rows))
    gpus = [row for row in rows if "gpu" in row]
    unhealthy = sum(1 for row in gpus if row["state"] == "UNHEALTHY")
    failed = sorted({row["host"] for row in rows if "gpu" not in row})
    print(f"gpu health: {len(gpus)} GPU(s) on {len(fleet.hosts) - len(failed)} host(s), "
          f"{unhealthy} unhealthy" + (f"; not read: {', '.join(failed)}" if failed else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"exit_code": exit_code(rows), "gpus": rows},
                                              indent=2) + "\n")
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
