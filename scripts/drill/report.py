"""The drills' report: one row per drill in Markdown, everything measured in JSON (pure)."""

from __future__ import annotations

import json
from pathlib import Path


def passed(result: dict) -> bool:
    """A drill meets its target: it ran, lost nothing beyond its allowance, its own check
    held, the fleet healed, nothing damaged was left where it is used, the next run converged
    and the one after changed nothing."""
    return (not result.get("error")
            and result["requests"]["failed_beyond_target"] == 0
            and result["requests"]["sent"] > 0
            and (result.get("check") or {}).get("ok", True)
            and result.get("recovered_s") is not None
            and not result.get("damaged_after_fault")
            and not result.get("damaged_after_run")
            and result.get("next_run_exit") == 0
            and result.get("run_after_changes") == [])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Fault drills",
        "",
        f"{meta['when']}, lab `{meta['lab']}` ({meta['hosts']} hosts, {meta['replicas']}), "
        f"`python3 scripts/drills.py {meta['command']}`. The load: {meta['load']}.",
        "",
        "Failed requests are judged against each drill's target: the load cannot tell which "
        "engine served a request, so a fault may cost at most the requests in flight at its "
        "instant (a superset of those on the broken part); drills that break nothing in the "
        "serving path may cost none. Recovered: seconds from the fault until every model has "
        "all its replicas answering through every gateway. Next run: the deploy's exit code "
        "after the drill; run after: operations it changed (must be none).",
        "",
        "| drill | sent | failed | in flight at fault | beyond target | recovered (s) | "
        "next run | run after | files | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r["requests"]
        damaged = r.get("damaged_after_fault") or r.get("damaged_after_run")
        files = "DAMAGED" if damaged else "intact"
        after = r.get("run_after_changes")
        lines.append(
            f"| {r['drill']} | {q['sent']} | {q['failed']} | {q['in_flight_at_fault']} | "
            f"{q['failed_beyond_target']} | {_cell(r.get('recovered_s'))} | "
            f"{_cell(r.get('next_run_exit'))} | "
            f"{'no change' if after == [] else _cell(after and len(after))} | {files} | "
            f"{'pass' if passed(r) else 'FAIL'} |")
    lines += ["", "## Each drill", ""]
    for r in results:
        lines += [f"### {r['drill']}: {'pass' if passed(r) else 'FAIL'}", "",
                  f"- fault: {r['fault']} ({r.get('detail', '')})",
                  f"- target: {r['target']}"]
        if r.get("error"):
            lines.append(f"- **did not complete**: {r['error']}")
        q = r["requests"]
        lines.append(f"- requests: {q['sent']} sent ({q['streamed']} streamed), {q['failed']} "
                     f"failed, {q['failed_in_flight']} of them in flight at the fault, "
                     f"{q['failed_over']} sent to another gateway after a refused connection")
        if q.get("beyond_target_s"):
            start, end = q["beyond_target_s"]
            lines.append(f"  - failures beyond the target from {start:+.1f} s to {end:+.1f} s "
                         "after the fault")
        for failure in q.get("failures", []):
            lines.append(f"  - {failure}")
        for key, value in sorted((r.get("facts") or {}).items()):
            lines.append(f"- {key.replace('_', ' ')}: {_cell(value)}")
        if r.get("check"):
            lines.append("- own check: " + ", ".join(f"{k.replace('_', ' ')} {_cell(v)}"
                                                     for k, v in r["check"].items()))
        for when in ("after_fault", "after_run"):
            for node, problems in (r.get(f"damaged_{when}") or {}).items():
                lines.append(f"- damaged {when.replace('_', ' ')} on {node}: {'; '.join(problems)}")
        lines.append(f"- next run: exit {_cell(r.get('next_run_exit'))} in "
                     f"{_cell(r.get('next_run_s'))} s, changed "
                     f"{len(r.get('next_run_changes') or [])} operation(s); "
                     f"the run after: {_cell(r.get('run_after_changes'))}")
        lines.append("")
    return "\n".join(lines)


def timeline(requests, fault_at: float, struck_by: float | None, healed_at: float | None) -> dict:
    """What the chart draws of one drill: each request's start and latency, relative to the
    fault, whether it failed; the fault's window; when the fleet was healthy again."""
    return {"points": [(round(r.started - fault_at, 3), round(r.record.latency_s * 1000, 1), r.ok)
                       for r in requests],
            "struck_s": round((struck_by or fault_at) - fault_at, 3),
            "healed_s": round(healed_at - fault_at, 3) if healed_at else None}


def chart(path: Path, results: list[dict]) -> Path | None:
    """drills.png: a panel per drill, latency of every request against seconds from the fault
    (failed ones as red crosses), the fault's window in orange, the fleet healthy again in
    green."""
    drawn = [r for r in results if (r.get("timeline") or {}).get("points")]
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = (len(drawn) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(15, 3.2 * rows), squeeze=False)
    for ax, result in zip(axes.flat, drawn):
        line = result["timeline"]
        good = [(t, ms) for t, ms, ok in line["points"] if ok]
        bad = [(t, ms) for t, ms, ok in line["points"] if not ok]
        if good:
            ax.scatter(*zip(*good), s=4, alpha=0.5)
        if bad:
            ax.scatter(*zip(*bad), s=40, marker="x", color="red")
        ax.axvspan(0, max(line["struck_s"], 0.2), color="orange", alpha=0.3)
        if line["healed_s"] is not None:
            ax.axvline(line["healed_s"], color="green", linestyle="--")
        ax.set_yscale("log")
        ax.set_title(f"{result['drill']}: {'pass' if passed(result) else 'FAIL'} "
                     f"({result['requests']['failed']} failed)", fontsize=10)
        ax.set_xlabel("s from the fault", fontsize=8)
        ax.set_ylabel("latency (ms)", fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write(out: Path, results: list[dict], meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / "drills.md", out / "drills.json", out / "drills.png"
    drawn = chart(png, results)
    text = markdown(results, meta)
    if drawn:
        text = text.replace("\n## Each drill\n", "\n![every request of every drill](drills.png)\n\n"
                            "## Each drill\n", 1)
    md.write_text(text + "\n")
    kept = [{k: v for k, v in r.items() if k != "timeline"} for r in results]
    js.write_text(json.dumps({"meta": meta, "drills": kept,
                              "passed": [r["drill"] for r in results if passed(r)],
                              "failed": [r["drill"] for r in results if not passed(r)]},
                             indent=2, default=str) + "\n")
    return [md, js] + ([drawn] if drawn else [])
