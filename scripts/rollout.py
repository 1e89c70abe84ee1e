#!/usr/bin/env python3
"""Rolling maintenance of a serving fleet: a driver, Container Toolkit or Docker Engine change
applied host by host, each out of serving while it changes, the models serving throughout.

    python scripts/rollout.py inventories/prod.py --data nvidia_driver_version=580.95.05
    python scripts/rollout.py inventories/prod.py --max-unavailable 2 --limit gpu-01,gpu-02
    python scripts/rollout.py inventories/prod.py --plan      # what it would do, touching nothing

1. Plans the deploy with the new data (the drift check's planner): the hosts it would change in
   the driver, toolkit or Docker phases are the ones to maintain; other changes are left to an
   ordinary run.
2. Batches them (scripts/rollout/plan.py): at most --max-unavailable at once, only while every
   model keeps all its replicas on the nodes left and the Swarm keeps a majority of managers;
   workers before managers. A host that cannot go out even alone is refused, with the reason,
   before anything is touched.
3. Per batch: drain the nodes; wait until their tasks run elsewhere and every service is at its
   count; deploy each host alone with reboots allowed; verify (the pinned driver loaded and GPUs
   seen, Docker and the toolkit at their versions, node Ready, GPU labels true); set it active;
   wait until every service is at its count again. A host that fails stays drained, the rollout
   stops there, exit 1; the rest of the fleet goes on serving.
4. Resumable: the report's JSON is its state. Run it again: hosts it left drained are taken
   first (and only it sets them active again); hosts already done plan no change.

Writes reports/rollout/rollout.md and rollout.json (--out), and a deploy log per host.
Exit 0: every touched host done; 1: stopped or refused; 2: bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.fleet_access import reexec_in_venv  # noqa: E402

reexec_in_venv()

from scripts.drift import plan as drift_plan  # noqa: E402  (gevent first, as pyinfra's CLI)
from scripts.fleet_access import fleet_or_refuse  # noqa: E402
from scripts.rollout import plan as planner  # noqa: E402
from scripts.rollout import steps  # noqa: E402
from scripts.rollout.report import RolloutRecord, drained_by_rollout, save  # noqa: E402


class BadInput(Exception):
    """Input refused before anything is touched (exit 2, as the deploy's own refusals)."""


def say(message: str) -> None:
    print(f"rollout {time.strftime('%H:%M:%S')}: {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inventory")
    parser.add_argument("--max-unavailable", type=int, default=1, metavar="N",
                        help="hosts out of serving at once, at most (default 1)")
    parser.add_argument("--limit", action="append", default=[], metavar="HOSTS",
                        help="only these hosts (names, groups, comma-separated: pyinfra's --limit)")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="data for the deploy, as pyinfra's --data (e.g. the new versions)")
    parser.add_argument("--out", default=str(REPO / "reports" / "rollout"),
                        help="report and state directory (default reports/rollout)")
    parser.add_argument("--wait-s", type=int, default=None, metavar="S",
                        help="longest wait for the Swarm after a drain or a return "
                             "(default swarm_drain_timeout_s)")
    parser.add_argument("--plan", action="store_true", help="print the plan and touch nothing")
    args = parser.parse_args(argv)
    if args.max_unavailable < 1:
        parser.error(f"--max-unavailable {args.max_unavailable}: expected 1 or more")
    return args


def order_hosts(fleet, touched: dict[str, list[str]], resumed: list[str],
                nodes: list[planner.Node]) -> list[str]:
    """Hosts an earlier rollout left drained first, then workers, then managers (inventory
    order): a manager's turn moves a gateway and may move the Swarm's leader."""
    managers = {n.name for n in nodes if n.manager}
    rest = [h for h in fleet.hosts if h in touched and h not in resumed]
    return ([h for h in resumed if h in touched] + [h for h in rest if h not in managers]
            + [h for h in rest if h in managers])


def plan_rollout(args, fleet, settings, record: RolloutRecord, resumed: dict[str, str]):
    say("planning the deploy with this data on every host (read only)")
    checked = drift_plan.check(args.inventory, data=args.data, limit=args.limit or None)
    if checked.failure:  # the inventory, --limit or --data refused: the user's input
        raise BadInput(checked.failure)
    unplanned = [f"{h.name}: {h.status}: {h.error}" for h in checked.hosts if h.status != "checked"]
    if unplanned:
        record.refused += [f"cannot plan {line}" for line in unplanned]
        return None
    touched = {h.name: planner.disruptive_changes(h.items) for h in checked.hosts}
    touched = {name: changes for name, changes in touched.items() if changes}
    for name, status in resumed.items():
        touched.setdefault(name, [{"operation": f"left {status} by the last rollout", "detail": ""}])
    manager = fleet.managers[0]
    nodes = steps.swarm_nodes(fleet, manager)
    # A node the last rollout left drained comes back after its batch, like any other: it is
    # planned as in service. A node drained by anyone else stays out and counts as out.
    plan_nodes = [replace(n, active=True) if n.name in resumed else n
                  for n in steps.plan_nodes(fleet, nodes)]
    order = order_hosts(fleet, touched, list(resumed), plan_nodes)
    return planner.plan_batches(touched, plan_nodes, steps.served_models(settings),
                                args.max_unavailable, order)


def acting_manager(fleet, batch: list[str]) -> str:
    for name in fleet.managers:
        if name not in batch:
            return name
    raise steps.StepFailed("every manager is in this batch")  # the planner never allows it


def maintain_batch(args, fleet, settings, record: RolloutRecord, batch: list[str], out: Path) -> bool:
    manager = acting_manager(fleet, batch)
    wait_s = args.wait_s or settings.swarm_drain_timeout_s
    batch_nodes, started = [], {}
    for name in batch:
        host = record.host(name)
        started[name] = time.monotonic()
        host.before = {k: v for k, v in steps.host_versions(fleet, name).items() if k != "nvidia"}
        host.before["boot"] = steps.boot_marker(fleet, name)
        say(f"[{name}] draining (via {manager})")
        batch_nodes.append(steps.set_availability(fleet, manager, name, "drain"))
        host.status, host.wall_s = "drained", None
        host.times["drained"] = time.time()
    save(record, out)
    progress = lambda message: say(f"[{','.join(batch)}] {message}")  # noqa: E731
    try:
        drain_s = steps.wait_until(
            steps.serving_without(fleet, manager, settings.stack_name, batch_nodes),
            wait_s, "the fleet to serve without the batch", progress)
    except steps.StepFailed:
        # The rest of the fleet could not take its tasks: serving beats maintenance.
        for name in batch:
            steps.set_availability(fleet, manager, name, "active")
            record.host(name).status = "pending"
            say(f"[{name}] set active again: the fleet could not serve without it")
        raise
    time.sleep(steps.GATEWAY_SETTLE_S)
    for name in batch:
        record.host(name).drain_s = round(drain_s, 1)

    for name in batch:
        host = record.host(name)
        log = out / "logs" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        host.log = str(log.relative_to(REPO)) if log.is_relative_to(REPO) else str(log)
        say(f"[{name}] deploying it alone, reboots allowed (log: {host.log})")
        deploy_started = time.monotonic()
        host.times["deploy"] = time.time()
        host.deploy_exit = steps.deploy_host(args.inventory, name, args.data, log)
        host.deploy_s = round(time.monotonic() - deploy_started, 1)
        steps.reconnect(fleet, name)
        if host.deploy_exit != 0:
            host.status = "failed"
            host.problem = (f"the deploy exited {host.deploy_exit}: "
                            f"{steps.deploy_failure(log, name)}")
            continue
        versions = steps.host_versions(fleet, name)
        host.after = {k: v for k, v in versions.items() if k != "nvidia"}
        host.after["boot"] = steps.boot_marker(fleet, name)
        host.rebooted = host.after["boot"] != host.before.get("boot")
        host.reboots = steps.reboots_in_log(log, name)
        problems = steps.version_problems(versions, settings)
        node = steps.node_of(steps.swarm_nodes(fleet, manager), name)
        if node is None or node["state"] != "ready":
            problems.append(f"Swarm node {'missing' if node is None else node['state']}")
        if problems:
            host.status, host.problem = "failed", "; ".join(problems)
            continue
        host.labels_set = steps.refresh_gpu_labels(fleet, manager, node, steps.serving_view(
            fleet, name, versions["nvidia"], fleet.settings(name).gpu_health_keep_out))
        say(f"[{name}] verified: {host.after['driver']}, Docker {host.after['docker']}, toolkit "
            f"{host.after['toolkit']}; setting it active")
        steps.set_availability(fleet, manager, name, "active")
        host.times["active"] = time.time()
    failed = [name for name in batch if record.host(name).status == "failed"]
    for name in failed:
        say(f"[{name}] FAILED: {record.host(name).problem}; it stays drained")
    save(record, out)

    back_s = steps.wait_until(steps.serving_without(fleet, manager, settings.stack_name, []),
                              wait_s, "every service at its count", progress)
    time.sleep(steps.GATEWAY_SETTLE_S)
    for name in batch:
        host = record.host(name)
        if host.status != "failed":
            host.status = "done"
            host.back_s = round(back_s, 1)
            host.times["done"] = time.time()
        host.wall_s = round(time.monotonic() - started[name], 1)
    save(record, out)
    return not failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fleet, settings = fleet_or_refuse(args.inventory, args.data)
    out = Path(args.out).resolve()
    resumed = drained_by_rollout(out / "rollout.json")
    record = RolloutRecord(args.inventory, args.data, args.max_unavailable)
    started = time.monotonic()
    try:
        plan = plan_rollout(args, fleet, settings, record, resumed)
        if plan is None:
            record.result = "refused"
            for why in record.refused:
                say(f"refused: {why}")
            return 1
        record.batches, record.refused = plan.batches, plan.refused
        for name, changes in plan.touched.items():
            record.host(name).changes = changes
        if resumed:
            say(f"resuming: {', '.join(f'{n} ({s})' for n, s in resumed.items())} left by the last rollout")
        if not plan.touched:
            record.result = "nothing to do"
            say("no host would change in the driver, toolkit or Docker phases: nothing to do")
            return 0
        say("plan: " + " | ".join(", ".join(b) for b in plan.batches) if plan.batches else "plan: no batch")
        for why in plan.refused:
            say(f"refused: {why}")
        if args.plan:
            record.result = "planned"
            return 0 if not plan.refused else 1
        for index, batch in enumerate(plan.batches, start=1):
            say(f"batch {index}/{len(plan.batches)}: {', '.join(batch)}")
            if not maintain_batch(args, fleet, settings, record, batch, out):
                record.result = "stopped"
                return 1
        record.result = "stopped" if plan.refused else "done"
        return 1 if plan.refused else 0
    except BadInput as error:
        record.result = "refused"
        record.refused.append(str(error))
        print(f"rollout: {error}", file=sys.stderr)
        return 2
    except steps.StepFailed as error:
        record.result = "stopped"
        record.refused.append(str(error))
        say(f"stopped: {error}")
        return 1
    finally:
        record.wall_s = round(time.monotonic() - started, 1)
        from datetime import datetime, timezone
        record.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not args.plan:
            save(record, out)
            say(f"report: {out / 'rollout.md'}")


if __name__ == "__main__":
    sys.exit(main())
