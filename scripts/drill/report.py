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
        files = "intact" if not (r.get("damaged_after_fault") or r.get("damaged_after_run")) else "DAMAGED"
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
                     f"{_cell(r.get('next_run_s'))} s, changed {len(r.get('next_run_changes') or [])} "
                     f"operation(s); the run after: {_cell(r.get('run_after_changes'))}")
        lines.append("")
    return "\n".join(lines)


def write(out: Path, results: list[dict], meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "drills.md", out / "drills.json"
    md.write_text(markdown(results, meta) + "\n")
    js.write_text(json.dumps({"meta": meta, "drills": results,
                              "passed": [r["drill"] for r in results if passed(r)],
                              "failed": [r["drill"] for r in results if not passed(r)]},
                             indent=2, default=str) + "\n")
    return [md, js]
