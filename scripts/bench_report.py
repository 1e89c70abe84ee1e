"""The benchmark's report, from its raw records (scripts/bench.py measures them): medians with
min and max per fleet size, ratios between sizes, each of the issue's targets checked against
what was measured, rendered as bench.json, bench.md and PNG charts. Pure but for the writing
and the charts (matplotlib, from .venv).

    report = build_report(runs, machine, plan, reasons)
    markdown = render_markdown(report)
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

# The targets (issue 9), each checked against what was measured.
TARGET_NOCHANGE_RATIO = 2.0  # no-change run, 10 hosts vs 1 host: less than twice
TARGET_NOCHANGE_RATIO_SIZE = 10
TARGET_COMMANDS_PER_HOST = 60  # remote commands per host in a no-change run: fewer than
TARGET_HUB_COPIES = 1.1  # hub bytes for N hosts: within 1.1 copies
TARGET_FAILED_REQUESTS = 0  # during a rolling update under load

# The rolling update's load: requests in flight at once through the gateway, and seconds it
# goes on after the deploy has returned (a failure just after convergence counts too).
STACK_LOAD_CONCURRENCY = 4
STACK_SETTLE_S = 5


# --- Statistics: pure -----------------------------------------------------------------------


def spread(values: list[float]) -> dict | None:
    """Median, min, max and count of the measured values (None: nothing was measured)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def per_host(run: dict, kind: str, stage: str | None = None) -> tuple[float, int] | None:
    """(mean over the run's hosts, max on one host) of a counter (commands, facts, uploads),
    all stages or one. Hosts are the lab's nodes (the probe counts nothing else)."""
    hosts = run.get("counts", {}).get("hosts", {})
    if not hosts:
        return None
    values = [h.get(f"{kind}_by_stage", {}).get(stage, 0) if stage else h.get(kind, 0)
              for h in hosts.values()]
    return sum(values) / run["size"], max(values)


def _runs(runs: list[dict], kind: str, size: int) -> list[dict]:
    return [r for r in runs if r["kind"] == kind and r["size"] == size and r.get("ok")]


def summarize_deploys(runs: list[dict], kind: str) -> dict[int, dict]:
    """Per fleet size: spreads of wall time, per-host counters and phase times of the deploys
    of one kind ("fresh" or "nochange") that succeeded."""
    out = {}
    for size in sorted({r["size"] for r in runs if r["kind"] == kind}):
        chosen = _runs(runs, kind, size)
        failed = [r for r in runs if r["kind"] == kind and r["size"] == size and not r.get("ok")]
        entry = {
            "runs": len(chosen),
            "failed": len(failed),
            "failures": [r.get("error", "") for r in failed],
            "wall_s": spread([r["wall_s"] for r in chosen]),
            "wall_per_host_s": spread([r["wall_s"] / size for r in chosen]),
            "prepare_s": spread([r["counts"]["prepare_s"] for r in chosen]),
            "changed_operations": spread([r.get("changed_operations") for r in chosen]),
            # This machine's 1-minute load when each run ended: other labs share the cores.
            "load_1m": spread([float(r["load"].split()[0]) for r in chosen if r.get("load")]),
        }
        for counter in ("commands", "facts", "uploads"):
            means = [per_host(r, counter) for r in chosen]
            entry[f"{counter}_per_host"] = spread([m[0] for m in means if m])
            entry[f"{counter}_max_host"] = spread([m[1] for m in means if m])
        if kind == "fresh":
            entry["lab_up_s"] = spread([r.get("lab_up_s") for r in chosen])
            entry["total_s"] = spread([r["wall_s"] + r.get("lab_up_s", 0) for r in chosen])
            entry["hub_bytes"] = spread([r.get("hub_bytes") for r in chosen])
            entry["lan_bytes"] = spread([r.get("lan_bytes") for r in chosen])
            entry["one_copy_bytes"] = spread([r.get("one_copy_bytes") for r in chosen])
            entry["hub_copies"] = spread(
                [ratio(r.get("hub_bytes"), r.get("one_copy_bytes")) for r in chosen])
            entry["lan_copies"] = spread(
                [ratio(r.get("lan_bytes"), r.get("one_copy_bytes")) for r in chosen])
            entry["host_memory_mib"] = spread([r.get("host_memory_mib") for r in chosen])
        # In run order: the probe records phases as their first operation ends.
        phases = list(dict.fromkeys(p for r in chosen for p in r["counts"].get("phase_s", {})))
        entry["phase_s"] = {p: spread([r["counts"]["phase_s"].get(p) for r in chosen])
                            for p in phases}
        out[size] = entry
    return out


def summarize_simple(runs: list[dict], kind: str, fields: tuple[str, ...]) -> dict[int, dict]:
    """Per fleet size: spreads of some fields of one kind of measurement (drift, stack)."""
    out = {}
    for size in sorted({r["size"] for r in runs if r["kind"] == kind}):
        chosen = _runs(runs, kind, size)
        out[size] = {"runs": len(chosen), **{f: spread([r.get(f) for r in chosen]) for f in fields}}
    return out


def _median(summary: dict, size: int, field: str) -> float | None:
    return ((summary.get(size) or {}).get(field) or {}).get("median")


def ratios(nochange: dict[int, dict], fresh: dict[int, dict]) -> dict[str, dict]:
    """Each size against one host: the figures to track (issue 9). Needs size 1 measured."""
    out = {}
    for size in sorted(set(nochange) | set(fresh)):
        if size == 1:
            continue
        out[str(size)] = {
            "nochange_wall": ratio(_median(nochange, size, "wall_s"), _median(nochange, 1, "wall_s")),
            "nochange_wall_per_host": ratio(_median(nochange, size, "wall_per_host_s"),
                                            _median(nochange, 1, "wall_per_host_s")),
            "fresh_wall": ratio(_median(fresh, size, "wall_s"), _median(fresh, 1, "wall_s")),
            "nochange_commands_per_host": ratio(_median(nochange, size, "commands_per_host"),
                                                _median(nochange, 1, "commands_per_host")),
        }
    return out


def verdict(value: float | None, limit: float, below: bool, unit: str = "") -> dict:
    """met / missed (with by how much) / not measured, for `value` against `limit`.
    `below`: the value must be strictly below the limit; else at most the limit."""
    if value is None:
        return {"status": "not measured", "value": None, "limit": limit}
    ok = value < limit if below else value <= limit
    result = {"status": "met" if ok else "missed", "value": value, "limit": limit}
    if not ok:
        over = value - limit
        result["by"] = ("at the limit: it must be below it" if over == 0 else
                        f"{over:.3g}{unit} over the limit"
                        + (f" ({over / limit:.0%} over)" if limit else ""))
    return result


def hosts(n: int) -> str:
    return f"{n} host" + ("" if int(n) == 1 else "s")


def targets(nochange: dict, fresh: dict, stack: dict, reasons: dict[str, str]) -> list[dict]:
    """The issue's four targets against the measured medians."""
    out = []
    # 1. No-change run, 10 hosts vs 1 host: < 2x.
    r = ratio(_median(nochange, TARGET_NOCHANGE_RATIO_SIZE, "wall_s"), _median(nochange, 1, "wall_s"))
    item = {"id": "nochange_ratio", "text": f"no-change run over {TARGET_NOCHANGE_RATIO_SIZE} "
            f"hosts < {TARGET_NOCHANGE_RATIO:g}x the time of 1 host",
            **verdict(r, TARGET_NOCHANGE_RATIO, below=True, unit="x")}
    if r is None:
        largest = max((s for s in nochange if s > 1 and _median(nochange, s, "wall_s")), default=None)
        item["note"] = (f"{TARGET_NOCHANGE_RATIO_SIZE} hosts not measured"
                        + (f"; largest measured: {largest} hosts, ratio "
                           f"{ratio(_median(nochange, largest, 'wall_s'), _median(nochange, 1, 'wall_s')):.2f}x"
                           if largest and _median(nochange, 1, "wall_s") else ""))
    out.append(item)
    # 2. Remote commands per host in a no-change run: < 60, on every host (so the busiest
    #    host counts: the acting manager does the cluster's reads), at the largest size measured.
    sizes = [s for s in sorted(nochange) if _median(nochange, s, "commands_max_host") is not None]
    size = TARGET_NOCHANGE_RATIO_SIZE if TARGET_NOCHANGE_RATIO_SIZE in sizes else (sizes[-1] if sizes else None)
    value = _median(nochange, size, "commands_max_host") if size else None
    item = {"id": "commands_per_host", "text": f"no-change run: < {TARGET_COMMANDS_PER_HOST} "
            "remote commands per host (busiest host)",
            **verdict(value, TARGET_COMMANDS_PER_HOST, below=True)}
    if size:
        item["note"] = f"at {hosts(size)}; busiest host / mean per host: " + ", ".join(
            f"{hosts(s)}: {_median(nochange, s, 'commands_max_host'):.0f} / "
            f"{_median(nochange, s, 'commands_per_host'):.1f}" for s in sizes)
    out.append(item)
    # 3. Hub bytes for N hosts within 1.1 copies (the worst size measured).
    copies = {s: _median(fresh, s, "hub_copies") for s in fresh if _median(fresh, s, "hub_copies") is not None}
    worst = max(copies, key=lambda s: copies[s]) if copies else None
    item = {"id": "hub_copies", "text": f"hub bytes for N hosts <= {TARGET_HUB_COPIES:g}x one copy",
            **verdict(copies.get(worst) if worst else None, TARGET_HUB_COPIES, below=False, unit="x")}
    if copies:
        item["note"] = f"worst at {hosts(worst)}; " + ", ".join(
            f"{hosts(s)}: {c:.3f}x" for s, c in sorted(copies.items()))
    out.append(item)
    # 4. Failed requests during a rolling update under load: 0.
    failed = [v for s in stack.values() if (v := (s.get("failed_requests") or {}).get("max")) is not None]
    item = {"id": "failed_requests", "text": "zero failed requests during a rolling update under load",
            **verdict(max(failed) if failed else None, TARGET_FAILED_REQUESTS, below=False)}
    if not failed:
        item["note"] = reasons.get("stack", "not measured")
    out.append(item)
    return out


def build_report(runs: list[dict], machine: dict, plan: dict, reasons: dict[str, str]) -> dict:
    """Everything bench.json holds, from the raw runs (pure: the report can be rebuilt)."""
    fresh = summarize_deploys(runs, "fresh")
    nochange = summarize_deploys(runs, "nochange")
    drift = summarize_simple(runs, "drift", ("wall_s",))
    for size, entry in drift.items():
        entry["drift_found"] = spread([sum(1 for r in _runs(runs, "drift", size) if r.get("drift_found"))])
    stack = summarize_simple(runs, "stack", ("converge_s", "deploy_s", "requests",
                                             "failed_requests", "latency_p95_s"))
    for size, entry in stack.items():
        kinds: dict[str, int] = {}
        for r in _runs(runs, "stack", size):
            for kind, n in (r.get("error_kinds") or {}).items():
                kinds[kind] = kinds.get(kind, 0) + n
        entry["error_kinds"] = kinds
        entry["failures"] = [r["error"] for r in runs  # failed runs: kept out of the figures
                             if r["kind"] == "stack" and r["size"] == size and r.get("error")]
    reasons = dict(reasons)
    if not drift and "drift" not in reasons:
        reasons["drift"] = "no drift check run was recorded"
    if not stack and "stack" not in reasons:
        reasons["stack"] = "no stack update run was recorded"
    fits = [r["size"] for r in runs if r["kind"] == "fresh" and r.get("ok")]
    return {
        "schema": 1,
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "plan": plan,
        "largest_fleet_measured": max(fits, default=None),
        "fresh": fresh,
        "nochange": nochange,
        "drift": drift,
        "stack": stack,
        "ratios": ratios(nochange, fresh),
        "targets": targets(nochange, fresh, stack, reasons),
        "not_measured": {k: v for k, v in reasons.items() if not {"drift": drift, "stack": stack}.get(k)},
        "runs": runs,
    }


# --- Report rendering: pure -----------------------------------------------------------------


def fmt(s: dict | None, digits: int = 1, unit: str = "") -> str:
    """"median (min-max)" of a spread, or "-" when nothing was measured."""
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(report: dict) -> str:
    """bench.md: the machine, the plan, each measurement, ratios and targets."""
    m, plan = report["machine"], report["plan"]
    lines = [
        "# Benchmarks", "",
        f"Generated {report['generated_at']} by `{plan.get('command', 'scripts/bench.py')}`. "
        "Each figure is the median of the repeats, with (min-max) when they differ. "
        "Raw runs are in `bench.json`.", "",
        "## Machine", "",
        f"- CPU: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores",
        f"- Memory: {m.get('memory_gib', '?')} GiB; kernel {m.get('kernel', '?')}; "
        f"{m.get('os', '?')}",
        f"- Docker engine {m.get('docker_version', '?')}; Python {m.get('python', '?')}; "
        f"pyinfra {m.get('pyinfra', '?')}",
        f"- Load average at start / end: {m.get('load_start', '?')} / {m.get('load_end', '?')}",
    ]
    if m.get("note"):
        lines.append(f"- {m['note']}")
    lines += ["", "## Plan", "",
              f"Fleet sizes {', '.join(map(str, plan.get('sizes', [])))}; repeats per size: "
              f"{plan.get('repeats', '?')}; largest fleet measured: "
              f"{report.get('largest_fleet_measured') or 'none'} hosts. "
              f"Code measured: commit {plan.get('commit') or 'not recorded'}.", ""]
    notes = [f"- {note}" for note in plan.get("notes", [])]
    lines += notes + ([""] if notes else [])
    if plan.get("skipped"):
        lines += [f"- {s}" for s in plan["skipped"]] + [""]

    fresh, nochange = report["fresh"], report["nochange"]
    lines += ["## Fresh provisioning (every phase)", "",
              "`lab.py up --no-deploy` starts the lab's fresh hosts (not the product); the deploy "
              "is the first `pyinfra inventories/lab.py deploy.py` on them. Per host: the mean "
              "over the fleet's hosts.", ""]
    rows = []
    for size, e in sorted(fresh.items(), key=lambda kv: int(kv[0])):
        rows.append([str(size), str(e["runs"]), fmt(e.get("lab_up_s")), fmt(e["wall_s"]),
                     fmt(e.get("total_s")), fmt(e["prepare_s"]), fmt(e["commands_per_host"], 0),
                     fmt(e["facts_per_host"], 0), fmt(e["uploads_per_host"], 0), fmt(e.get("load_1m"))])
    lines += _table(["hosts", "runs", "lab up s", "deploy s", "total s", "planning s",
                     "commands/host", "facts/host", "uploads/host", "load"], rows) if rows else ["Not measured."]
    phases = list(dict.fromkeys(p for e in fresh.values() for p in e.get("phase_s", {})))
    if phases:
        lines += ["", "Deploy wall time by phase (s, the sum of its operations' wall times):", ""]
        lines += _table(["hosts", *phases], [
            [str(size), *[fmt(e["phase_s"].get(p)) for p in phases]]
            for size, e in sorted(fresh.items(), key=lambda kv: int(kv[0]))])
    _failures(lines, fresh)

    lines += ["", "## Second run (no change)", "",
              "The deploy again on the converged fleet; it must change nothing.", ""]
    rows = []
    for size, e in sorted(nochange.items(), key=lambda kv: int(kv[0])):
        rows.append([str(size), str(e["runs"]), fmt(e["wall_s"]), fmt(e["wall_per_host_s"], 2),
                     fmt(e["prepare_s"]), fmt(e["commands_per_host"], 1), fmt(e["commands_max_host"], 0),
                     fmt(e["facts_per_host"], 1), fmt(e["changed_operations"], 0), fmt(e.get("load_1m"))])
    lines += _table(["hosts", "runs", "wall s", "wall s per host", "planning s", "commands/host",
                     "commands (max host)", "facts/host", "operations changed", "load"], rows) \
        if rows else ["Not measured."]
    _failures(lines, nochange)

    lines += ["", "## Ratios against one host", ""]
    rows = [[size, *(f"{v:.2f}x" if v is not None else "-" for v in (
        r["nochange_wall"], r["nochange_wall_per_host"], r["fresh_wall"], r["nochange_commands_per_host"]))]
        for size, r in sorted(report["ratios"].items(), key=lambda kv: int(kv[0]))]
    lines += _table(["hosts", "no-change wall", "no-change wall per host", "fresh deploy wall",
                     "no-change commands per host"], rows) if rows else \
        ["Not measured (needs size 1 and a larger size)."]

    lines += ["", "## Model weights", "",
              "Hub bytes: what the Hub stand-in served (its `/_lab/stats`) during the fresh "
              "deploy; LAN bytes: the weights phase's own report line; both against one copy "
              "of the model.", ""]
    rows = [[str(size), fmt(e.get("one_copy_bytes"), 0), fmt(e.get("hub_bytes"), 0),
             fmt(e.get("hub_copies"), 3, "x"), fmt(e.get("lan_bytes"), 0), fmt(e.get("lan_copies"), 2, "x")]
            for size, e in sorted(fresh.items(), key=lambda kv: int(kv[0]))]
    lines += _table(["hosts", "one copy (bytes)", "hub bytes", "hub copies", "LAN bytes",
                     "LAN copies"], rows) if rows else ["Not measured."]

    lines += ["", "## Drift check", ""]
    if report["drift"]:
        lines += _table(["hosts", "runs", "wall s", "runs that found drift"], [
            [str(s), str(e["runs"]), fmt(e["wall_s"]), fmt(e.get("drift_found"), 0)]
            for s, e in sorted(report["drift"].items(), key=lambda kv: int(kv[0]))])
        lines += ["", "On the converged fleet, right after the no-change run: any drift found "
                  "there is a finding (the deploy and the check disagree)."]
    else:
        lines.append(f"Not measured: {report['not_measured'].get('drift', 'no run recorded')}.")

    lines += ["", "## Stack update under load", ""]
    if report["stack"]:
        lines += [f"The first served model's `gpu_memory_utilization` moves by 0.01 (`lab.py set` on "
                  f"every host), and the deploy runs under `loadtest.py --during` with "
                  f"{STACK_LOAD_CONCURRENCY} streamed requests in flight through the gateway, from "
                  f"before the deploy starts until {STACK_SETTLE_S} s after it returns. Deploy to "
                  "convergence: the inference stack phase (render, `docker stack deploy`, poll until "
                  "every task of the new spec runs and is healthy); deploy: the whole run. A "
                  "request fails on any non-2xx status, a transport error, or a stream that ends "
                  "before `data: [DONE]`.", ""]
        ordered = sorted(report["stack"].items(), key=lambda kv: int(kv[0]))
        lines += _table(["hosts", "runs", "deploy to convergence s", "deploy s", "requests",
                         "failed requests", "latency p95 s", "failures by kind"], [
            [str(s), str(e["runs"]), fmt(e["converge_s"]), fmt(e.get("deploy_s")),
             fmt(e["requests"], 0), fmt(e["failed_requests"], 0), fmt(e.get("latency_p95_s"), 2),
             ", ".join(f"{k} x{n}" for k, n in (e.get("error_kinds") or {}).items()) or "-"]
            for s, e in ordered])
        for s, e in ordered:
            for failure in e.get("failures") or []:
                lines.append(f"- {hosts(int(s))}: a run failed: {failure}")
        lines += ["", "Latency over time during the last rolling update (the deploy's window "
                  "shaded; errors marked x): " + ", ".join(
                      f"[{hosts(int(s))}](stack-update-{s}/latency_over_time.png)"
                      for s, _ in ordered) + "."]
    else:
        lines.append(f"Not measured: {report['not_measured'].get('stack', 'no run recorded')}.")

    lines += ["", "## Targets", ""]
    rows = []
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        detail = "; ".join(x for x in (t.get("by"), t.get("note")) if x)
        rows.append([t["text"], t["status"], value, detail or ""])
    lines += _table(["target", "status", "value", "detail"], rows)

    lines += ["", "## Method", "",
              "- Every deploy runs through `scripts/bench_probe.py`: pyinfra's own CLI with "
              "counters. Commands: every command sent over a host's SSH connection (facts, "
              "operations, the commands a FunctionCommand runs, the connector's helpers for a sudo "
              "upload); uploads: files sent; facts: facts gathered (pyinfra 3 caches none). "
              "Planning: from start to the first operation. Phase times: the sum of the wall "
              "times of the phase's operations.",
              "- Wall times are end to end (process start to exit), on a machine shared with "
              "other work: `load` is this machine's 1-minute load average when each run ended "
              "(the machine's cores are in Machine). Compare ratios, not single seconds.",
              "- Charts: `time_vs_hosts.png`, `commands_per_host.png`, `weights_bytes.png`.", ""]
    return "\n".join(lines)


def _failures(lines: list[str], summary: dict) -> None:
    for size, e in sorted(summary.items(), key=lambda kv: int(kv[0])):
        for failure in e.get("failures", []):
            lines.append(f"- {size} hosts: a run failed: {failure}")


# --- Charts ---------------------------------------------------------------------------------


def _series(summary: dict, field: str):
    """(sizes, medians, [below, above]) of a field, for an errorbar from min to max."""
    points = sorted((int(s), e[field]) for s, e in summary.items() if e.get(field))
    xs = [s for s, _ in points]
    med = [v["median"] for _, v in points]
    err = [[v["median"] - v["min"] for _, v in points], [v["max"] - v["median"] for _, v in points]]
    return xs, med, err


def charts(report: dict, out: Path) -> list[Path]:
    """The PNG charts of the report (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def draw(name, title, ylabel, series, hline=None):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        sizes = set()
        # Distinct markers and lines: two series can be equal (every no-change command is a fact).
        styles = [("o", "-"), ("s", "--"), ("^", ":")]
        for (label, summary, field), (marker, line) in zip(series, styles):
            xs, med, err = _series(summary, field)
            if xs:
                sizes.update(xs)
                ax.errorbar(xs, med, yerr=err, marker=marker, linestyle=line, capsize=4,
                            markersize=7 if marker == "^" else 5, label=label)
        if sizes:
            ax.set_xticks(sorted(sizes))
        if hline:
            ax.axhline(hline[0], linestyle="--", color="grey", label=hline[1])
        ax.set_title(title)
        ax.set_xlabel("lab hosts")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    fresh, nochange = report["fresh"], report["nochange"]
    one = _median(nochange, 1, "wall_s") or _median(nochange, "1", "wall_s")
    draw("time_vs_hosts.png", "Deploy wall time (median, min-max)", "seconds",
         [("fresh: lab up + first deploy", fresh, "total_s"), ("fresh: first deploy", fresh, "wall_s"),
          ("second run (no change)", nochange, "wall_s")],
         hline=(TARGET_NOCHANGE_RATIO * one, f"target: {TARGET_NOCHANGE_RATIO:g}x no-change at 1 host")
         if one else None)
    draw("commands_per_host.png", "Remote commands and facts per host", "per host",
         [("commands, fresh", fresh, "commands_per_host"),
          ("commands, no change", nochange, "commands_per_host"),
          ("facts, no change", nochange, "facts_per_host")],
         hline=(TARGET_COMMANDS_PER_HOST, f"target: < {TARGET_COMMANDS_PER_HOST} commands/host (no change)"))
    draw("weights_bytes.png", "Model weights moved, in copies of the model", "copies",
         [("hub bytes / one copy", fresh, "hub_copies"), ("LAN bytes / one copy", fresh, "lan_copies")],
         hline=(TARGET_HUB_COPIES, f"target: hub <= {TARGET_HUB_COPIES:g} copies"))
    return written


def write_report(runs: list[dict], machine: dict, plan: dict, reasons: dict, out: Path) -> dict:
    report = build_report(runs, machine, plan, reasons)
    (out / "bench.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (out / "bench.md").write_text(render_markdown(report))
    charts(report, out)
    return report
