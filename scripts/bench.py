#!/usr/bin/env python3
"""Benchmarks of the deploy against lab fleets of several sizes (issue 9).

    python3 scripts/bench.py --out DIR [--sizes 1,3,6,10] [--repeats 3]
    python3 scripts/bench.py --out DIR --render-only      # report again from DIR/runs.jsonl

For each fleet size N (a lab named gpulab-bench-N, brought up fresh and taken down after) and
each repeat: `lab.py up --hosts N --no-deploy` (the lab's own hosts: not the product), the
first deploy on those fresh hosts (every phase), a second deploy that must change nothing, and
the drift check when `scripts/drift_check.py` exists. Every deploy runs through
`scripts/bench_probe.py` (pyinfra's own CLI with counters at the SSH connector: commands,
uploads, facts per host; planning time; wall time per phase). The Hub stand-in's
`/_lab/stats` gives the Hub bytes, the weights phase's own report line the LAN bytes.

DIR gets runs.jsonl (one raw record per measurement, appended as it is taken: an interrupted
run keeps what it measured), bench.json (machine, plan, raw runs, medians with min/max,
ratios, targets), bench.md and PNG charts. A figure that was not measured says why; no number
is ever filled in.

Runs under .venv (matplotlib draws the charts): started with another Python, it re-executes
itself with .venv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.bench_report import (  # noqa: E402
    STACK_LOAD_CONCURRENCY, STACK_SETTLE_S, write_report,
)
from scripts.lab.fleet import capped_replicas  # noqa: E402  the lab inventory's own rule
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
LAB = [sys.executable, str(REPO_ROOT / "scripts" / "lab.py")]
PROBE = REPO_ROOT / "scripts" / "bench_probe.py"
DRIFT_SCRIPT = REPO_ROOT / "scripts" / "drift_check.py"
LOADTEST_SCRIPT = REPO_ROOT / "scripts" / "loadtest.py"
MODEL_MANIFEST = "/opt/models/tiny-llama/.gpufleet-manifest.json"  # the lab model (lab data)

DEFAULT_SIZES = (1, 3, 6, 10)
RUN_TIMEOUT_S = 3600  # one deploy or `lab.py up`: bounded, generous for 10 hosts on 2 cores


# A rolling update of a one-replica service stops its only engine (stop-first: a GPU holds one
# copy of the model), so it is measured from this fleet size up (the lab serves 2 replicas).
STACK_MIN_SIZE = 2

WEIGHTS_LINE = re.compile(r"Model weights: hub bytes (\d+) .*?; LAN bytes (\d+)")


# --- The machine ----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_description() -> dict:
    """What the figures were measured on: CPU, cores, memory, kernel, OS, Docker, versions."""
    cpu = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    os_name = re.search(r'^PRETTY_NAME="?([^"\n]+)', _read("/etc/os-release"), re.M)
    docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                            capture_output=True, text=True)
    try:
        from importlib.metadata import version

        pyinfra_version = version("pyinfra")
    except Exception:  # not in the venv: said so rather than guessed
        pyinfra_version = "?"
    return {
        "cpu_model": cpu.group(1).strip() if cpu else platform.processor() or "?",
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "os": os_name.group(1) if os_name else platform.platform(),
        "docker_version": docker.stdout.strip() or "?",
        "python": platform.python_version(),
        "pyinfra": pyinfra_version,
        "load_start": load_average(),
    }


def load_average() -> str:
    return " ".join(_read("/proc/loadavg").split()[:3])


def available_memory_mib() -> int | None:
    found = re.search(r"^MemAvailable:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    return int(found.group(1)) // 1024 if found else None


# --- Driving the lab ------------------------------------------------------------------------


def lab_name(size: int) -> str:
    return f"gpulab-bench-{size}"


def run(command: list[str], lab: str, timeout: int = RUN_TIMEOUT_S) -> tuple[int, float, str, str]:
    """(exit code, seconds, stdout, stderr) of a command for one lab (LAB_NAME set)."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "LAB_NAME": lab},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        return 124, time.monotonic() - started, str(expired.stdout or ""), f"timed out after {timeout}s"
    return done.returncode, time.monotonic() - started, done.stdout, done.stderr


def lab_state(lab: str) -> dict:
    return json.loads((REPO_ROOT / ".lab" / lab / "hosts.json").read_text())


def hub_request(lab: str, method: str, path: str) -> dict:
    """A control request to this lab's Hub stand-in (its address on the lab network); the token
    is read from the lab's 0600 file and only put in the header."""
    settings = lab_state(lab)["settings"]
    token = Path(settings["hf_token_file"]).read_text().strip()
    request = urllib.request.Request(f"{settings['hf_endpoint'].rstrip('/')}{path}", method=method,
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body.strip() else {}


def one_copy_bytes(lab: str) -> int | None:
    """The model's size, from the manifest the deploy wrote on the first host."""
    code, _, out, _ = run([*LAB, "ssh", "node-1", f"cat {MODEL_MANIFEST}"], lab, timeout=60)
    try:
        return sum(entry["size"] for entry in json.loads(out)["files"]) if code == 0 else None
    except (ValueError, KeyError, TypeError):
        return None


def host_memory_mib(lab: str) -> float | None:
    """Mean resident memory of a lab host now: the RSS of its container's processes summed
    (`docker top`; `docker stats` reads 0 B on these machines, which have no memory cgroup
    accounting). An estimate to judge which fleet size fits, not a product figure."""
    values = []
    for host in lab_state(lab)["hosts"]:
        code, _, out, _ = run(["docker", "top", host["container"], "-eo", "pid,rss"], lab, timeout=60)
        rss = [int(line.split()[1]) for line in out.splitlines()[1:]
               if len(line.split()) == 2 and line.split()[1].isdigit()]
        if code == 0 and rss:
            values.append(sum(rss) / 1024)
    return round(sum(values) / len(values), 1) if values else None


def changed_operations(stdout: str) -> int | None:
    """Operations that changed a host, from pyinfra's --json output."""
    try:
        results = json.loads(stdout)["results"]
    except (ValueError, KeyError, TypeError):
        return None
    return sum(1 for op in results.get("operations", []) if op.get("success"))


def probe_deploy(lab: str, size: int, kind: str, repeat: int, work: Path) -> dict:
    """One deploy through the probe: wall time, counters, changes, weights bytes."""
    counts_file = work / f"{lab}-{kind}-{repeat}.counts.json"
    counts_file.unlink(missing_ok=True)
    code, seconds, out, err = run([str(VENV_PYTHON), str(PROBE), str(counts_file), "--",
                                   "--json", "-y", "inventories/lab.py", "deploy.py"], lab)
    record = {"kind": kind, "size": size, "repeat": repeat, "lab": lab, "wall_s": round(seconds, 3),
              "exit_code": code, "ok": code == 0, "load": load_average()}
    record["counts"] = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    record["changed_operations"] = changed_operations(out)
    weights = WEIGHTS_LINE.search(out + err)
    if weights:
        record["weights_hub_bytes_reported"] = int(weights.group(1))
        record["lan_bytes"] = int(weights.group(2))
    if code != 0:
        record["error"] = failure_summary(out, err)
        record["output"] = _redact(err)[-20000:]  # the whole story of a failed run, for the report's raw data
    return record


def failure_summary(stdout: str, stderr: str) -> str:
    """Why a deploy failed, in one line: the operations that failed on which hosts (pyinfra's
    --json) and the hosts' own error lines; else the output's last lines."""
    parts = []
    try:
        for op in json.loads(stdout)["results"]["operations"]:
            if op.get("error"):
                parts.append(f"{op['name']}: {', '.join(op['error'])}")
    except (ValueError, KeyError, TypeError):
        pass
    lines = [line.strip() for line in stderr.splitlines()
             if re.search(r"\[node-\d+\].*(error|fail|refused|timed out|timeout)", line, re.I)]
    parts += lines[:5]
    return _redact("; ".join(parts))[:800] if parts else _tail(stderr or stdout)


def _redact(text: str) -> str:
    return re.sub(r"hf_[A-Za-z0-9_]+", "hf_***", re.sub(r"SWMTKN-[A-Za-z0-9-]+", "SWMTKN-***", text))


def _tail(text: str, lines: int = 3) -> str:
    """The last lines of an output, for a failure record; never a token (lab hub tokens start
    with hf_)."""
    kept = " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])
    return _redact(kept)[:400]


def fresh_provisioning(size: int, repeat: int, work: Path) -> dict:
    """Down, up (hosts only, timed), then the first deploy on the fresh hosts (probed)."""
    lab = lab_name(size)
    run([*LAB, "down"], lab, timeout=600)
    code, up_s, out, err = run([*LAB, "up", "--hosts", str(size), "--no-deploy"], lab)
    if code != 0:
        return {"kind": "fresh", "size": size, "repeat": repeat, "lab": lab, "ok": False,
                "wall_s": None, "error": f"lab up failed: {_tail(err or out)}", "counts": {}}
    models = lab_state(lab).get("settings", {}).get("models", [])
    capped = capped_replicas(models, size) != models  # inventories/lab.py caps them
    if capped:
        print(f"bench: {lab}: replicas capped at {size} (one per node)", flush=True)
    try:
        hub_request(lab, "POST", "/_lab/stats/reset")
    except OSError as error:
        print(f"bench: {lab}: cannot reset the hub stats ({error}): counting from its start")
    record = probe_deploy(lab, size, "fresh", repeat, work)
    record["lab_up_s"] = round(up_s, 3)
    record["replicas_capped"] = capped
    try:
        record["hub_bytes"] = int(hub_request(lab, "GET", "/_lab/stats")["total_bytes"])
    except (OSError, KeyError, ValueError) as error:
        record["hub_bytes_error"] = str(error)
    record["one_copy_bytes"] = one_copy_bytes(lab)
    record["host_memory_mib"] = host_memory_mib(lab)
    return record


def drift_check(size: int, repeat: int, command: list[str]) -> dict:
    lab = lab_name(size)
    code, seconds, out, err = run(command, lab)
    # drift_check.py: 0 no drift, 2 drift found (still a complete check: timed), 1 it failed.
    record = {"kind": "drift", "size": size, "repeat": repeat, "lab": lab, "ok": code in (0, 2),
              "drift_found": code == 2, "wall_s": round(seconds, 3), "exit_code": code}
    if code not in (0, 2):
        record["error"] = _tail(err or out)
    return record


def toggled_models(models: list[dict]) -> list[dict]:
    """The lab's models with the first served model's gpu_memory_utilization moved by 0.01
    (0.90 -> 0.89 -> 0.90 ...): the engine's command line changes, so Swarm rolls every task of
    its service, as a real tuning change would."""
    changed, done = [], False
    for model in models:
        if not done and model.get("serve", True):
            current = float(model.get("gpu_memory_utilization", 0.9))
            model = {**model, "gpu_memory_utilization": round(
                current - 0.01 if current >= 0.9 else current + 0.01, 2)}
            done = True
        changed.append(model)
    return changed


def set_models(lab: str, models: list[dict]) -> None:
    """`lab.py set all models=...`, as an operator would change the inventory: on every host in
    one edit (the key must agree fleet-wide, which the inventory checks)."""
    code, _, out, err = run([*LAB, "set", "all", f"models={json.dumps(models)}"], lab, timeout=60)
    if code != 0:
        raise RuntimeError(f"lab.py set all models failed: {_tail(err or out)}")


def stack_update(size: int, repeat: int, work: Path, out: Path) -> dict:
    """A rolling update of the stack under a steady load: the model's engine setting changes
    (toggled_models), and the deploy runs through the probe as `loadtest.py --during`, with
    STACK_LOAD_CONCURRENCY requests in flight through the gateway from before the deploy starts
    until STACK_SETTLE_S after it ends. The load test's reports of the last repeat are kept in
    DIR/stack-update-N/."""
    lab = lab_name(size)
    record = {"kind": "stack", "size": size, "repeat": repeat, "lab": lab, "ok": False}
    models = capped_replicas(lab_state(lab).get("settings", {}).get("models", []), size)
    set_models(lab, toggled_models(models))
    counts_file = work / f"{lab}-stack-{repeat}.counts.json"
    report_dir = out / f"stack-update-{size}"
    shutil.rmtree(report_dir, ignore_errors=True)
    deploy = shlex.join([str(VENV_PYTHON), str(PROBE), str(counts_file), "--", "-y",
                         "inventories/lab.py", "deploy.py"])
    code, seconds, stdout, stderr = run(
        [str(VENV_PYTHON), str(LOADTEST_SCRIPT), "inventories/lab.py", "--out", str(report_dir),
         "--concurrency", str(STACK_LOAD_CONCURRENCY), "--requests", "1000000",
         "--max-seconds", "1800", "--settle", str(STACK_SETTLE_S), "--during", deploy], lab)
    record.update({"wall_s": round(seconds, 3), "exit_code": code, "load": load_average()})
    (report_dir / "requests.csv").unlink(missing_ok=True)  # one row per request: not committed
    try:
        summary = json.loads((report_dir / "summary.json").read_text())
        counts = json.loads(counts_file.read_text())
    except (OSError, ValueError) as error:
        record["error"] = f"no load test or deploy result ({error}): {_tail(stderr or stdout)}"
        return record
    meta, load = summary["meta"], summary["summaries"]["load"]
    hosts = counts.get("hosts", {}).values()
    record.update({
        "requests": load["requests"], "failed_requests": load["errors"],
        "error_kinds": load["error_kinds"],
        "latency_p95_s": (load.get("latency_s") or {}).get("p95"),
        "deploy_s": meta.get("during_s"), "deploy_exit_code": meta.get("during_exit_code"),
        "covered": meta.get("during_covered"),
        # Deploy to convergence: the stack phase (render, deploy, poll until every task of the
        # new spec runs and is healthy), not the phases before it.
        "converge_s": counts.get("phase_s", {}).get("Inference stack"),
        "changed_operations": sum(h.get("changed_operations", 0) for h in hosts),
    })
    problems = []
    if record["deploy_exit_code"] != 0:
        problems.append(f"the deploy exited {record['deploy_exit_code']}")
    if not record["covered"]:
        problems.append("the load stopped before the deploy ended")
    if not record["changed_operations"]:
        problems.append("the deploy changed nothing: no rolling update was measured")
    if problems:
        record["error"] = "; ".join(problems)
    record["ok"] = not problems
    return record


def append_run(out: Path, record: dict) -> None:
    with (out / "runs.jsonl").open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def read_runs(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fits(size: int, per_host_mib: float | None) -> str | None:
    """Why a fleet of `size` hosts would not fit in this machine's available memory (None: it
    fits, or nothing measured yet to judge by): measured memory per host x size, 80% of what
    is available now."""
    available = available_memory_mib()
    if per_host_mib is None or available is None:
        return None
    needed = per_host_mib * size
    if needed > 0.8 * available:
        return (f"{size} hosts need about {needed / 1024:.1f} GiB ({per_host_mib:.0f} MiB per host "
                f"measured), {available / 1024:.1f} GiB available now")
    return None


def measure(sizes: list[int], repeats: int, out: Path, keep: bool, drift_cmd,
            stack_updates: bool) -> dict:
    """The plan: each size, each repeat; raw records appended as they are taken."""
    # The probe's counts files are scratch: each lands whole in its run record.
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as scratch:
        return _measure(sizes, repeats, out, keep, drift_cmd, stack_updates, Path(scratch))


def _measure(sizes, repeats, out, keep, drift_cmd, stack_updates, work: Path) -> dict:
    reasons, skipped = {}, []
    if drift_cmd is None:
        reasons["drift"] = f"{DRIFT_SCRIPT.relative_to(REPO_ROOT)} is not in this checkout"
    if not stack_updates:
        reasons["stack"] = "not asked for (--no-stack-update)"
    elif max(sizes) < STACK_MIN_SIZE:
        reasons["stack"] = (f"measured from {STACK_MIN_SIZE} hosts: a one-replica service has no "
                            "other engine to serve while its only one restarts")
    per_host_mib = None
    for size in sizes:
        reason = fits(size, per_host_mib)
        if reason:
            skipped.append(f"{size} hosts skipped: {reason}")
            print(f"bench: {skipped[-1]}", flush=True)
            continue
        lab = lab_name(size)
        try:
            for repeat in range(1, repeats + 1):
                print(f"bench: {size} hosts, repeat {repeat}/{repeats}: fresh provisioning", flush=True)
                record = fresh_provisioning(size, repeat, work)
                append_run(out, record)
                _say(record)
                if not record["ok"]:
                    break
                per_host_mib = record.get("host_memory_mib") or per_host_mib
                record = probe_deploy(lab, size, "nochange", repeat, work)
                append_run(out, record)
                _say(record)
                if drift_cmd:
                    append_run(out, drift_check(size, repeat, drift_cmd))
                if stack_updates and size >= STACK_MIN_SIZE:
                    print(f"bench: {size} hosts, repeat {repeat}/{repeats}: rolling update under "
                          "load", flush=True)
                    record = stack_update(size, repeat, work, out)
                    append_run(out, record)
                    _say_stack(record)
        finally:
            if not keep:
                run([*LAB, "down"], lab, timeout=600)
    return {"reasons": reasons, "skipped": skipped}


def _say(record: dict) -> None:
    hosts = record.get("counts", {}).get("hosts", {})
    commands = sum(h.get("commands", 0) for h in hosts.values())
    print(f"bench:   {record['kind']}: {'ok' if record['ok'] else 'FAILED'} "
          f"{record.get('wall_s') or 0:.0f}s, {commands} commands over {len(hosts)} hosts, "
          f"{record.get('changed_operations')} operations changed"
          + (f"; {record['error']}" if record.get("error") else ""), flush=True)


def _say_stack(record: dict) -> None:
    print(f"bench:   stack: {'ok' if record['ok'] else 'FAILED'} converged in "
          f"{record.get('converge_s') or 0:.0f}s, {record.get('failed_requests')} of "
          f"{record.get('requests')} requests failed"
          + (f" {record['error_kinds']}" if record.get("error_kinds") else "")
          + (f"; {record['error']}" if record.get("error") else ""), flush=True)


def git_commit() -> str:
    """HEAD of the checkout measured, with "+changes" when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                          capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def merge_passes(saved: dict, machine: dict, plan: dict) -> tuple[dict, dict]:
    """One report from several passes into one DIR (e.g. `--sizes 1,3 --repeats 3`, then
    `--sizes 6 --repeats 2`): the sizes of all passes, every pass's command, the load at the
    start of the first and the end of the last."""
    before_plan, before_machine = saved.get("plan", {}), saved.get("machine", {})
    merged_plan = {
        "sizes": sorted(set(before_plan.get("sizes", [])) | set(plan["sizes"])),
        "repeats": plan["repeats"] if before_plan.get("repeats") in (None, plan["repeats"])
        else f"{before_plan['repeats']}, then {plan['repeats']}",
        "command": "; ".join(c for c in (before_plan.get("command"), plan["command"]) if c),
        "commit": plan.get("commit") if before_plan.get("commit") in (None, plan.get("commit"))
        else f"{before_plan['commit']}, then {plan.get('commit')}",
        "notes": before_plan.get("notes", []),
        "skipped": [*before_plan.get("skipped", []), *plan.get("skipped", [])],
    }
    merged_machine = {**machine, "load_start": before_machine.get("load_start", machine["load_start"])}
    return merged_machine, merged_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="report directory")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="fleet sizes, comma-separated (default 1,3,6,10)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per size (default 3)")
    parser.add_argument("--keep", action="store_true", help="leave the last lab of each size up")
    parser.add_argument("--render-only", action="store_true",
                        help="no measurement: the report again from DIR/runs.jsonl")
    parser.add_argument("--note", action="append", help="with --render-only: a line the report's "
                        "plan section carries from now on (repeatable)")
    parser.add_argument("--drift-cmd", help="drift check command (default: scripts/drift_check.py "
                        "inventories/lab.py under .venv, when that script exists)")
    parser.add_argument("--no-stack-update", action="store_true",
                        help="skip the rolling update under load")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected whole numbers, comma-separated, e.g. 1,3,6,10")
    if not sizes or sizes[0] < 1 or not 1 <= args.repeats <= 20:
        parser.error("sizes must be >= 1 and repeats 1-20")
    args.out.mkdir(parents=True, exist_ok=True)
    plan_file = args.out / "plan.json"
    if args.render_only:
        saved = json.loads(plan_file.read_text()) if plan_file.exists() else {}
        machine, plan, reasons = saved.get("machine", {}), saved.get("plan", {}), saved.get("reasons", {})
        if args.note:  # kept with the plan, so the next rendering says it too
            plan["notes"] = [*plan.get("notes", []), *args.note]
            plan_file.write_text(json.dumps({**saved, "plan": plan}, indent=2) + "\n")
    else:
        drift_cmd = args.drift_cmd.split() if args.drift_cmd else (
            [str(VENV_PYTHON), str(DRIFT_SCRIPT), "inventories/lab.py"] if DRIFT_SCRIPT.exists() else None)
        machine = machine_description()
        plan = {"sizes": sizes, "repeats": args.repeats, "commit": git_commit(),
                "command": "scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        if not plan_file.exists():  # so an interrupted pass can still be rendered (--render-only)
            plan_file.write_text(json.dumps({"machine": machine, "plan": plan, "reasons": {}}, indent=2) + "\n")
            first_pass = True
        else:
            first_pass = False
        outcome = measure(sizes, args.repeats, args.out, args.keep, drift_cmd,
                          not args.no_stack_update)
        machine["load_end"] = load_average()
        machine["note"] = ("Shared development machine: other labs may have run at the same time "
                           "(load averages above).")
        plan["skipped"] = outcome["skipped"]
        reasons = outcome["reasons"]
        if not first_pass:  # another pass into the same DIR: its runs are in runs.jsonl too
            machine, plan = merge_passes(json.loads(plan_file.read_text()), machine, plan)
        plan_file.write_text(json.dumps({"machine": machine, "plan": plan, "reasons": reasons},
                                        indent=2) + "\n")
    report = write_report(read_runs(args.out), machine, plan, reasons, args.out)
    for target in report["targets"]:
        print(f"bench: target {target['status']}: {target['text']}"
              + (f" ({target['by']})" if target.get("by") else ""))
    print(f"bench: report in {args.out}/bench.md")
    return 0


if __name__ == "__main__":
    if Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve() and VENV_PYTHON.exists():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    sys.exit(main())
