#!/usr/bin/env python3
"""Fault drills on the lab: each fault a fleet meets, done under a bounded load, with a report
of what it cost and whether the fleet healed.

    python3 scripts/drills.py                          # every drill, report in docs/reliability/
    python3 scripts/drills.py --drill engine-hung --drill engine-killed --out /tmp/drills
    python3 scripts/drills.py --cheap                  # the ones CI runs
    python3 scripts/drills.py --list

Against the lab only (`--name`, or LAB_NAME; default gpulab), up and deployed
(`python3 scripts/lab.py up`): drills break hosts on purpose. For each drill, in order:
  1. the fleet must be healthy (every model's replicas answering through every gateway);
  2. a load starts through the gateways: 2 streamed and 2 non-streamed chat completions always
     in flight; a connection a gateway refuses is sent to the next (a site's load balancer does
     that), nothing else is retried by the client;
  3. the fault (scripts/drill/faults.py), then, for a fault that ends (a frozen engine thawed, a
     host powered on), its end;
  4. the time until the fleet is healthy again; the load stops 3 s later;
  5. the requests judged against the drill's target (scripts/drill/verdict.py); files where they
     are used (weights, daemon.json, the stack file) checked right after a broken run;
  6. the next deploy must converge (exit 0), the one after must change nothing, and the files
     are checked again.
Drills that need 3 managers (gateway-killed, leader-lost) make them (`lab.py managers 3` and a
deploy) and put the lab's own count back afterwards.

Writes drills.md and drills.json into --out. Exit 0 when every drill met its target, 1 when
one did not, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.fleet_access import reexec_in_venv  # noqa: E402

reexec_in_venv()

from scripts.drill import faults as f  # noqa: E402
from scripts.drill import report, verdict  # noqa: E402
from scripts.drill.lab import DrillLab  # noqa: E402
from scripts.drill.load import BackgroundLoad  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WARMUP_S = 4.0       # load before the fault: requests are in flight when it hits
SETTLE_S = 3.0       # load after the fleet is healthy again
HEAL_DEADLINE_S = 240.0


def parse_args(argv):
    names = [d.name for d in f.DRILLS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=os.environ.get("LAB_NAME") or "gpulab",
                        help="the lab (default: LAB_NAME or gpulab)")
    parser.add_argument("--drill", action="append", choices=names, metavar="NAME",
                        help="run this drill (repeatable; default: all): " + ", ".join(names))
    parser.add_argument("--cheap", action="store_true", help="only the drills CI runs")
    parser.add_argument("--out", default=str(REPO / "docs" / "reliability"),
                        help="where drills.md and drills.json go (default docs/reliability)")
    parser.add_argument("--list", action="store_true", help="list the drills and exit")
    return parser.parse_args(argv)


def selected(args) -> list[f.Drill]:
    chosen = [d for d in f.DRILLS if (not args.drill or d.name in args.drill)
              and (not args.cheap or d.cheap)]
    # Drills that need more managers last, so the lab changes its managers once.
    return sorted(chosen, key=lambda d: d.managers)


def say(text: str) -> None:
    print(f"drills: {text}", flush=True)


def set_managers(lab: DrillLab, count: int) -> None:
    if len(lab.fleet.managers) == count:
        return
    say(f"{count} Swarm manager(s): lab.py managers {count}, then a deploy")
    done = lab.lab_cli("managers", str(count))
    if done.returncode != 0:
        raise RuntimeError(f"lab.py managers {count}: {done.stderr.strip()[-300:]}")
    run = lab.deploy()
    if not run.ok:
        raise RuntimeError(f"the deploy for {count} managers exited {run.exit_code}: "
                           + run.output.strip()[-500:])


def run_drill(lab: DrillLab, drill: f.Drill) -> dict:
    result: dict = {"drill": drill.name, "fault": drill.fault, "target": drill.target,
                    "requests": verdict.judge([], 0.0, drill.allowance)}
    healthy_in, why = lab.wait_healthy(HEAL_DEADLINE_S)
    if healthy_in is None:
        result["error"] = f"the lab was not healthy before the drill: {why}"
        return result
    _, stack = lab.stack()
    load = BackgroundLoad(lab.gateways(stack), lab.key, lab.verify).start()
    facts: dict = {}
    try:
        time.sleep(WARMUP_S)
        say(f"{drill.name}: {drill.fault}")
        facts = drill.act(lab)
        say(f"{drill.name}: {facts.get('detail', 'done')}; waiting for the fleet to heal")
        healed_in, why = lab.wait_healthy(HEAL_DEADLINE_S)
        healed_at = time.time()
        result["recovered_s"] = (round(healed_at - facts["fault_at"], 1)
                                 if healed_in is not None else None)
        if healed_in is None:
            result["error"] = f"not healthy {HEAL_DEADLINE_S:g} s after the fault: {why}"
        time.sleep(SETTLE_S)
    except Exception as error:  # reported in the drill's row; the next drills still run
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        requests = load.stop()
    fault_at = facts.get("fault_at", time.time())
    result["requests"] = verdict.judge(requests, fault_at, drill.allowance, facts.get("struck_by"))
    result["timeline"] = report.timeline(requests, fault_at, facts.get("struck_by"),
                                         fault_at + result["recovered_s"]
                                         if result.get("recovered_s") is not None else None)
    if load.problem:
        result["error"] = result.get("error") or f"the load stopped: {load.problem}"
    result["detail"] = facts.get("detail", "")
    result["facts"] = {k: v for k, v in facts.items()
                       if k not in ("fault_at", "struck_by", "detail", "thawed_at", "manager",
                                    "emptied", "down_at")}
    if "struck_by" in facts:
        result["facts"]["struck_within_s"] = round(facts["struck_by"] - fault_at, 2)
    if drill.check and "fault_at" in facts:
        result["check"] = drill.check(lab, requests, facts)
    if drill.broken_run:
        result["damaged_after_fault"] = f.files_in_use_problems(lab, facts.get("emptied"))
    converge(lab, result)
    return result


def converge(lab: DrillLab, result: dict) -> None:
    """The next deploy must succeed, the one after must change nothing."""
    say(f"{result['drill']}: the next run, then the one after")
    run = lab.deploy()
    result["next_run_exit"], result["next_run_s"] = run.exit_code, round(run.seconds, 1)
    result["next_run_changes"] = run.changed
    if not run.ok:
        result["next_run_says"] = run.output.strip().splitlines()[-8:]
        return
    again = lab.deploy()
    result["run_after_changes"] = again.changed if again.ok else [f"exit {again.exit_code}"]
    result["damaged_after_run"] = f.files_in_use_problems(lab)


def main(argv=None) -> int:
    args = parse_args(argv)
    drills = selected(args)
    if args.list:
        for drill in f.DRILLS:
            print(f"{drill.name:22} {'(CI) ' if drill.cheap else ''}{drill.fault}")
        return 0
    if not drills:
        print("drills: no drill selected", file=sys.stderr)
        return 2
    try:
        lab = DrillLab(args.name)
    except RuntimeError as error:
        print(f"drills: {error}", file=sys.stderr)
        return 2
    own_managers = len(lab.fleet.managers)
    started = time.time()
    results: list[dict] = []
    restored = ""
    try:
        for drill in drills:
            set_managers(lab, max(drill.managers, own_managers))
            results.append(run_drill(lab, drill))
            say(f"{drill.name}: {'pass' if report.passed(results[-1]) else 'FAIL'}")
    finally:
        try:
            set_managers(lab, own_managers)
        except RuntimeError as error:  # said in the report and on stderr; the report still goes out
            restored = f"the lab's {own_managers} manager(s) not restored: {error}"
            print(f"drills: {restored}", file=sys.stderr)
        settings = lab.settings
        meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                "lab": lab.name, "hosts": len(lab.nodes),
                "replicas": ", ".join(f"{m.name} x{m.replicas}" for m in settings.models),
                "command": " ".join(argv if argv is not None else sys.argv[1:]),
                "load": "2 streamed and 2 non-streamed chat completions in flight, 16 tokens each",
                "seconds": round(time.time() - started)}
        if restored:
            meta["problem"] = restored
        for path in report.write(Path(args.out), results, meta):
            say(f"wrote {path}")
    failed = [r["drill"] for r in results if not report.passed(r)]
    say(f"{len(results) - len(failed)} of {len(results)} drill(s) met their target"
        + (f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed or restored else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
