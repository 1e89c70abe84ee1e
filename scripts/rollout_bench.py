#!/usr/bin/env python3
"""A rolling upgrade measured under load on a lab of its own: every host from driver, toolkit
and Docker version A to B, with a steady load through the gateways, then a deploy that must
change nothing. Writes docs/benchmarks/rollout.md, rollout.json and rollout.png.

    python3 scripts/rollout_bench.py                       # lab gpulab-rollout: 4 hosts, 3 managers
    python3 scripts/rollout_bench.py --fail-host node-2    # node-2 loses its GPUs at the reboot:
                                                           # the rollout stops there; GPUs back, resume

A: the NVIDIA stand-in's older driver and toolkit (580.82.07, 1.19.0-1) and the Docker stand-in's
older engine (26.1.5); B: the production defaults (580.95.05, 1.19.1-1, 28.5.2). The lab is
created fresh (`lab.py down` first) and removed at the end unless --keep. About 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.fleet_access import reexec_in_venv  # noqa: E402

reexec_in_venv()

from scripts.lab.gpu_faults import PULL_GPUS_AT_BOOT, RETURN_GPUS  # noqa: E402

FROM_DATA = ["nvidia_driver_version=580.82.07", "nvidia_container_toolkit_version=1.19.0-1",
             "docker_version=26.1.5"]
def say(message: str) -> None:
    print(f"rollout-bench {time.strftime('%H:%M:%S')}: {message}", flush=True)


def require_ok(done: subprocess.CompletedProcess) -> None:
    if done.returncode != 0:
        raise SystemExit(f"failed: {done.args}: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def lab_cli(name: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "scripts/lab.py", "--name", name, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"lab.py {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def deploy(name: str, data: list[str]) -> tuple[int, list[str], str]:
    """(exit code, operations changed, output tail) of a whole-fleet deploy."""
    from scripts.drill.lab import changed_operations

    command = [str(REPO / ".venv" / "bin" / "pyinfra"), "--json", "-y", "inventories/lab.py", "deploy.py"]
    for item in data:
        command += ["--data", item]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "LAB_NAME": name},
                          capture_output=True, text=True, timeout=1800)
    try:
        changed = changed_operations(json.loads(done.stdout))
    except ValueError:
        changed = ["(no JSON)"]
    return done.returncode, changed, (done.stdout + done.stderr)[-3000:]


def rollout(name: str, out: Path) -> tuple[int, float, str]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "scripts/rollout.py", "inventories/lab.py",
                           "--out", str(out)], cwd=REPO,
                          env={**os.environ, "LAB_NAME": name},
                          capture_output=True, text=True, timeout=3600)
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    return done.returncode, time.monotonic() - started, done.stdout


def merged(runs: list[dict]) -> dict:
    """One record of the rollout's runs (a stopped one, then the one that resumed): each host
    as the last run that took it left it, its first drain time kept for the chart."""
    hosts: dict[str, dict] = {}
    for run in runs:
        for name, host in run["hosts"].items():
            if host["status"] == "pending" and name in hosts:
                continue
            earlier = hosts.get(name, {})
            first = earlier.get("times", {}).get("drained")
            failures = earlier.get("failures", []) + ([host["problem"]] if host.get("problem") else [])
            hosts[name] = {**host, "times": {**host["times"], **({"first_drained": first} if first else {})},
                           "before": earlier.get("before") or host["before"],
                           "attempts": earlier.get("attempts", 0) + (host["status"] != "pending"),
                           "failures": failures}
    return {**runs[-1], "hosts": dict(sorted(hosts.items(), key=lambda kv: kv[1]["times"].get("drained", 0) or 0)),
            "runs": [{k: v for k, v in run.items() if k != "hosts"} for run in runs]}


def load_summary(requests) -> dict:
    latencies = sorted(r.record.latency_s for r in requests if r.record.ok)
    failed = [r for r in requests if not r.record.ok]
    return {
        "sent": len(requests), "streamed": sum(1 for r in requests if r.stream),
        "failed": len(failed),
        "failures": [{"at": round(r.started, 3), "stream": r.stream, "error": r.record.error}
                     for r in failed][:50],
        "failovers": sum(r.failovers for r in requests),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
    }


def chart(path: Path, record: dict, requests, started: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = list(record["hosts"])
    drawn: set[str] = set()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 2]})
    colours = {"failed, left drained": "#999999", "drain": "#f0ad4e", "deploy": "#d9534f",
               "back": "#5cb85c"}
    for row, name in enumerate(hosts):
        t = record["hosts"][name]["times"]
        spans = [("drain", t.get("drained"), t.get("deploy")), ("deploy", t.get("deploy"), t.get("active")),
                 ("back", t.get("active"), t.get("done"))]
        if t.get("first_drained") and t.get("drained"):
            spans.insert(0, ("failed, left drained", t["first_drained"], t["drained"]))
        for label, a, b in spans:
            if a and b:
                top.barh(row, b - a, left=a - started, color=colours[label],
                         label=label if label not in drawn else None)
                drawn.add(label)
    top.set_yticks(range(len(hosts)), hosts)
    top.invert_yaxis()
    top.legend(loc="upper right", fontsize=8, ncols=4)
    top.set_title("each host: drained until its tasks ran elsewhere, deployed alone (reboot), back")
    ok = [(r.started - started, r.record.latency_s) for r in requests if r.record.ok]
    bad = [(r.started - started, r.record.latency_s) for r in requests if not r.record.ok]
    if ok:
        bottom.scatter(*zip(*ok), s=3, color="#337ab7", label=f"{len(ok)} answered")
    if bad:
        bottom.scatter(*zip(*bad), s=12, color="red", marker="x", label=f"{len(bad)} failed")
    bottom.set_ylabel("request latency (s)")
    bottom.set_xlabel("seconds since the load started")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    rec, load = result["rollout"], result["load"]
    lines = [
        "# Rolling upgrade under load", "",
        f"{result['date']}, lab `{result['lab']}`: {result['hosts']} hosts, {result['managers']} managers, "
        f"the lab model with {result['replicas']} replicas, a {result['cores']}-core machine. "
        f"`python3 scripts/rollout_bench.py{' --fail-host ' + result['fail_host'] if result['fail_host'] else ''}`.",
        "",
        f"From {', '.join(FROM_DATA)} to the defaults (driver {result['to']['driver']}, toolkit "
        f"{result['to']['toolkit']}, Docker {result['to']['docker']}), one host at a time, under "
        f"{load['sent']} requests ({load['streamed']} streamed; 2 streamed and 2 non-streamed always "
        "in flight, through every gateway, a refused connection tried on the next gateway).", "",
        f"- requests: **{load['sent']} sent, {load['failed']} failed**; latency p50 "
        f"{load['latency_p50_s']} s, p99 {load['latency_p99_s']} s; {load['failovers']} sent to another "
        "gateway after a refused connection",
        f"- rollout: {result['rollout_s']:.0f} s in all" + (
            f" (the first run stopped at {result['fail_host']} as it should, exit {result['stopped_exit']}; "
            "GPUs back, the second run resumed)" if result["fail_host"] else ""),
        f"- the deploy after: exit {result['after']['exit']}, changed {result['after']['changed'] or 'nothing'}",
        "", "| host | before | after | attempts | reboots | drain (s) | deploy (s) | back (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, host in rec["hosts"].items():
        before, after = host["before"], host["after"]
        lines.append(f"| {name} | {before.get('driver')}, {before.get('docker')}, {before.get('toolkit')} "
                     f"| {after.get('driver')}, {after.get('docker')}, {after.get('toolkit')} "
                     f"| {host.get('attempts', 1)} | {host.get('reboots')} | {host['drain_s']} | {host['deploy_s']} "
                     f"| {host['back_s']} | {host['wall_s']} |")
    failed_attempts = [(name, why) for name, host in rec["hosts"].items() for why in host.get("failures", [])]
    if failed_attempts:
        lines += ["", "Attempts that failed (the host stayed drained, the rollout stopped, exit 1):", ""]
        lines += [f"- {name}: {why}" for name, why in failed_attempts]
    lines += ["", "Before and after: the driver loaded, Docker Engine, the Container Toolkit. Attempts: "
              "the rollout runs that took the host (a stopped run, then the one that resumed). "
              "Reboots: those the host's last deploy did (its boot changed too). "
              "Times are those of the last attempt. Drain: from `docker node update --availability drain` until no task runs on the node "
              "and every service is at its count. Deploy: the whole deploy of that host alone with "
              "reboots allowed (package upgrades, the reboot into the new driver, Docker restarted "
              "on the new engine), then the verification. Back: from setting it active until every "
              "service is at its count again.", "", "![the rollout under load](rollout.png)", ""]
    if load["failures"]:
        lines += ["Failed requests:", ""] + [f"- {f['at']}: {'stream' if f['stream'] else 'plain'}: {f['error']}"
                                            for f in load["failures"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="gpulab-rollout")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--managers", type=int, default=3)
    parser.add_argument("--fail-host", default=None)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    args = parser.parse_args(argv)
    out = Path(args.out)
    os.environ["LAB_NAME"] = args.name
    say(f"a fresh lab {args.name}: {args.hosts} hosts, {args.managers} managers")
    lab_cli(args.name, "down")
    lab_cli(args.name, "up", "--hosts", str(args.hosts), "--no-deploy")
    lab_cli(args.name, "managers", str(args.managers))
    say("deploying version A: " + " ".join(FROM_DATA))
    code, _, tail = deploy(args.name, FROM_DATA)
    if code != 0:
        raise SystemExit(f"the deploy at version A failed:\n{tail}")

    from scripts.drill.lab import DrillLab
    from scripts.drill.load import BackgroundLoad

    lab = DrillLab(args.name)
    waited, why = lab.wait_healthy(300)
    if waited is None:
        raise SystemExit(f"the lab is not healthy: {why}")
    _, stack = lab.stack()
    load = BackgroundLoad(lab.gateways(stack), lab.key, lab.verify, max_seconds=3000).start()
    started = time.time()
    rollout_dir = out / "rollout-run"
    stopped_exit = None
    runs: list[dict] = []
    try:
        time.sleep(5)
        total = 0.0
        if args.fail_host:
            say(f"{args.fail_host} will lose its GPUs at its reboot (LAB FAULT)")
            require_ok(lab.ssh(args.fail_host, PULL_GPUS_AT_BOOT))
            stopped_exit, seconds, _ = rollout(args.name, rollout_dir)
            total += seconds
            runs.append(json.loads((rollout_dir / "rollout.json").read_text()))
            say(f"the rollout stopped with exit {stopped_exit}; GPUs back, reboot, resume")
            require_ok(lab.ssh(args.fail_host, RETURN_GPUS))
        code, seconds, _ = rollout(args.name, rollout_dir)
        total += seconds
        time.sleep(5)
    finally:
        requests = load.stop()
    runs.append(json.loads((rollout_dir / "rollout.json").read_text()))
    record = merged(runs)
    say(f"rollout exit {code}; the deploy after it")
    after_code, changed, _ = deploy(args.name, [])
    settings = lab.settings
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "lab": args.name,
        "hosts": args.hosts, "managers": args.managers, "cores": os.cpu_count(),
        "replicas": sum(m.replicas for m in settings.models), "fail_host": args.fail_host,
        "stopped_exit": stopped_exit, "exit": code, "rollout_s": round(total, 1),
        "to": {"driver": settings.nvidia_driver_version, "docker": settings.docker_version,
               "toolkit": settings.nvidia_container_toolkit_version},
        "load": load_summary(requests), "load_problem": load.problem,
        "after": {"exit": after_code, "changed": changed}, "rollout": record,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "rollout.md").write_text(markdown(result))
    chart(out / "rollout.png", record, requests, started)
    say(f"report: {out / 'rollout.md'}: {result['load']['sent']} requests, {result['load']['failed']} failed")
    if not args.keep:
        lab_cli(args.name, "down")
    ok = code == 0 and result["load"]["failed"] == 0 and after_code == 0 and not changed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
