#!/usr/bin/env python3
"""Smoke tests without a deploy: the same checks as the deploy's last phase.

    python scripts/smoke.py inventories/lab.py [--json FILE] [--deadline S] [--data KEY=VALUE]

Reads the stack (SmokeStack) from the first manager of the inventory that answers, then checks
from this machine the gateway and every engine task directly: /health within the deadline,
/v1/models exactly as configured, one completion per model, 401 without the API key.

Prints one table per endpoint (check, result, latency), writes the same as JSON with --json,
and exits 0 when every check passes, 1 with one line per failing check on stderr, 2 on a
refused configuration (one line per problem, as the deploy does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.fleet_access import reexec_in_venv  # noqa: E402

reexec_in_venv()

from operations import smoke as sm  # noqa: E402
from scripts.fleet_access import fleet_or_refuse  # noqa: E402

EXIT_OK, EXIT_FAILED = 0, 1


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--deadline", type=float, metavar="S",
                        help="seconds /health may take to answer 200 (default: smoke_deadline_s)")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key, as pyinfra's --data")
    return parser.parse_args(argv)


def run(argv) -> int:
    args = parse_args(argv)
    fleet, settings = fleet_or_refuse(args.inventory, args.data)
    deadline = settings.smoke_deadline_s if args.deadline is None else args.deadline

    if not sm.served_models(settings):
        print("no model is served: nothing to check")
        return EXIT_OK
    try:
        key = sm.read_api_key(settings.stack_api_key_file)
    except OSError as error:
        print(f"smoke: cannot read stack_api_key_file {settings.stack_api_key_file}: "
              f"{error.strerror}", file=sys.stderr)
        return EXIT_FAILED
    try:
        manager, stack = fleet.read_from_manager(sm.SmokeStack, stack_name=settings.stack_name)
    except RuntimeError as error:
        results = [sm.CheckResult(f"{settings.stack_name} (stack)", "", "stack", sm.FAIL,
                                  str(error))]
        targets = []
    else:
        targets, problems = sm.stack_targets(settings, stack)
        print(f"stack {settings.stack_name} read from {manager}: {len(targets)} endpoint(s)")
        results = problems + sm.run_checks(targets, key, deadline,
                                             ca_file=settings.stack_gateway_ca_file)

    print(sm.render_table(results))
    report = sm.report_json(results, targets)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(sm.summary_line(results))
    for line in report["failures"]:
        print(f"smoke failed: {line}", file=sys.stderr)
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
