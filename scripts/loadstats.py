"""The load test's numbers and reports, from recorded requests: percentiles, throughput, errors,
the CSV of every request, the Markdown and JSON summaries, the PNG charts, and the scenario
comparison with per-container CPU, memory and network I/O from `docker stats`. The serving
metrics the field compares (TTFT, TPOT, ITL, goodput) are defined in scripts/loadmetrics.py.

Pure functions over `Record`s (and `docker stats` samples): scripts/loadtest.py produces them,
tests/unit/test_loadtest_stats.py checks them on recorded data.

Percentiles use linear interpolation between the two closest ranks (Hyndman and Fan's type 7,
numpy's default): for sorted values x[0..n-1] and q in [0, 100], h = (n - 1) * q / 100 and
p = x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]). Latency and TTFT
percentiles are over successful requests only (an error's latency is a timeout, not a
response time); errors are counted apart.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

CSV_FIELDS = ["timestamp", "endpoint", "model", "status", "latency_s", "ttft_s", "tokens",
              "scenario", "error", "prompt_tokens", "itl_ms"]


@dataclass
class Record:
    """One request: when it started (epoch seconds), where, what came back."""

    timestamp: float
    endpoint: str
    model: str
    status: int  # HTTP status; 0 when no response came (connection refused, timeout)
    latency_s: float
    ttft_s: float | None  # time to the first content token (streamed requests only)
    tokens: int
    scenario: str = "load"
    error: str = ""
    prompt_tokens: int = 0  # from the response's usage, when the engine reports it
    # Every gap between two successive content chunks after the first (streamed requests).
    itl_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and not self.error


# --- Statistics -----------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile by linear interpolation between closest ranks (see module doc);
    None for no values.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    """
    data = sorted(values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    h = (len(data) - 1) * q / 100.0
    low = math.floor(h)
    high = min(low + 1, len(data) - 1)
    return data[low] + (h - low) * (data[high] - data[low])


def _dist(values: list[float]) -> dict[str, float | None]:
    return {
        "min": min(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def summarize(records: list[Record]) -> dict[str, Any]:
    """Counts, latency and TTFT distributions (seconds), throughput over the run's wall time
    (first request's start to last request's end), and errors by kind, with the first of each
    kind as it came (when after the start, which endpoint, the whole message): what someone
    reading the report needs to find the failure in the gateway's or the engine's log."""
    ok = [r for r in records if r.ok]
    if records:
        start = min(r.timestamp for r in records)
        end = max(r.timestamp + r.latency_s for r in records)
        wall = max(end - start, 1e-9)
    else:
        wall = 0.0
    tokens = sum(r.tokens for r in ok)
    errors: dict[str, int] = {}
    first: dict[str, str] = {}
    for r in sorted(records, key=lambda r: r.timestamp):
        if not r.ok:
            kind = r.error.split(":", 1)[0] if r.error else f"HTTP {r.status}"
            errors[kind] = errors.get(kind, 0) + 1
            first.setdefault(kind, f"at +{r.timestamp - start:.1f} s, {r.endpoint}: "
                                   f"{r.error or f'HTTP {r.status}'}")
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(sorted(errors.items())),
        "error_first": dict(sorted(first.items())),
        "wall_s": wall,
        "latency_s": _dist([r.latency_s for r in ok]),
        "ttft_s": _dist(ttfts),
        "tokens_out": tokens,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens_per_s": tokens / wall if wall else 0.0,
    }


# --- docker stats ---------------------------------------------------------------------------

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> float:
    """'1.5GiB' / '12.3kB' / '0B' -> bytes (docker prints SI units for I/O, binary for memory)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text or "")
    if not match:
        return 0.0
    return float(match.group(1)) * _UNITS.get(match.group(2).lower() or "b", 1)


def parse_stats_line(line: str) -> dict[str, Any] | None:
    """One `docker stats --no-stream --format '{{json .}}'` line -> a sample; None if not one."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict) or "Name" not in raw:
        return None
    rx, _, tx = (raw.get("NetIO") or "0B / 0B").partition("/")
    return {
        "container": raw["Name"],
        "cpu_pct": float((raw.get("CPUPerc") or "0%").rstrip("%") or 0),
        "mem_bytes": parse_size((raw.get("MemUsage") or "0B").split("/")[0]),
        "net_rx_bytes": parse_size(rx),
        "net_tx_bytes": parse_size(tx),
    }


def container_usage(samples: list[dict[str, Any]], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Per container (name starting with `prefix`): mean CPU %, peak memory, and network bytes
    received/sent between its first and last sample. `samples` carry "t" and "node" too."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for sample in sorted(samples, key=lambda s: s.get("t", 0)):
        if sample["container"].startswith(prefix):
            by_name.setdefault(sample["container"], []).append(sample)
    usage = {}
    for name, rows in sorted(by_name.items()):
        usage[name] = {
            "node": rows[0].get("node", ""),
            "samples": len(rows),
            "cpu_pct": sum(r["cpu_pct"] for r in rows) / len(rows),
            "mem_bytes": max(r["mem_bytes"] for r in rows),
            "net_rx_bytes": max(0.0, rows[-1]["net_rx_bytes"] - rows[0]["net_rx_bytes"]),
            "net_tx_bytes": max(0.0, rows[-1]["net_tx_bytes"] - rows[0]["net_tx_bytes"]),
        }
    return usage


def usage_totals(usage: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The stack's containers together: CPU % and memory summed, network I/O summed."""
    keys = ("cpu_pct", "mem_bytes", "net_rx_bytes", "net_tx_bytes")
    totals = {key: sum(u[key] for u in usage.values()) for key in keys}
    totals["containers"] = len(usage)
    totals["samples"] = sum(u["samples"] for u in usage.values())
    return totals


# --- Files ----------------------------------------------------------------------------------


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def append_csv(path: Path, records: list[Record]) -> None:
    """Append one row per request (header written when the file is new)."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in records:
            writer.writerow({
                "timestamp": iso(r.timestamp), "endpoint": r.endpoint, "model": r.model,
                "status": r.status, "latency_s": f"{r.latency_s:.4f}",
                "ttft_s": "" if r.ttft_s is None else f"{r.ttft_s:.4f}", "tokens": r.tokens,
                "scenario": r.scenario, "error": r.error, "prompt_tokens": r.prompt_tokens,
                "itl_ms": " ".join(f"{gap * 1000:.3f}" for gap in r.itl_s),
            })


def read_csv(path: Path) -> list[Record]:
    """Records back from a CSV this module wrote (for reports on recorded data)."""
    records = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            records.append(Record(
                timestamp=datetime.fromisoformat(row["timestamp"]).timestamp(),
                endpoint=row["endpoint"], model=row["model"], status=int(row["status"]),
                latency_s=float(row["latency_s"]),
                ttft_s=float(row["ttft_s"]) if row["ttft_s"] else None,
                tokens=int(row["tokens"]), scenario=row.get("scenario") or "load",
                error=row.get("error") or "", prompt_tokens=int(row.get("prompt_tokens") or 0),
                itl_s=[float(gap) / 1000 for gap in (row.get("itl_ms") or "").split()],
            ))
    return records


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024**2:.1f}"


def _kb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e3:.1f}"


def stats_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: one line per scenario (or the single run)."""
    lines = [
        "| scenario | requests | errors | p50 ms | p95 ms | p99 ms | mean ms | TTFT p50 ms | "
        "TTFT p95 ms | req/s | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        lat, ttft = s["latency_s"], s["ttft_s"]
        lines.append(
            f"| {name} | {s['requests']} | {s['errors']} | {_ms(lat['p50'])} | {_ms(lat['p95'])} "
            f"| {_ms(lat['p99'])} | {_ms(lat['mean'])} | {_ms(ttft['p50'])} | {_ms(ttft['p95'])} "
            f"| {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} |"
        )
    return lines


def comparison_table(scenarios: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of the scenario comparison: resources (the stack's containers, summed)
    beside average latency, p95 and throughput."""
    lines = [
        "| scenario | replicas | path | CPU % | memory MiB | net in kB | net out kB | "
        "avg latency ms | p95 ms | req/s | tokens/s | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in scenarios:
        s, u = sc["summary"], sc.get("usage_totals") or {}
        cpu = f"{u['cpu_pct']:.1f}" if u.get("samples") else "-"
        lines.append(
            f"| {sc['name']} | {sc['replicas']} | {sc['path']} | {cpu} "
            f"| {_mib(u.get('mem_bytes')) if u.get('samples') else '-'} "
            f"| {_kb(u.get('net_rx_bytes')) if u.get('samples') else '-'} "
            f"| {_kb(u.get('net_tx_bytes')) if u.get('samples') else '-'} "
            f"| {_ms(s['latency_s']['mean'])} | {_ms(s['latency_s']['p95'])} "
            f"| {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | {s['errors']} |"
        )
    return lines


def markdown_report(summaries: dict[str, dict[str, Any]], meta: dict[str, Any],
                    scenarios: list[dict[str, Any]] | None = None,
                    charts: list[str] | None = None, gates: list[str] | None = None) -> str:
    from scripts.loadmetrics import markdown_table

    lines = ["# Load test", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "Latency and TTFT percentiles: successful requests, linear interpolation "
              "between closest ranks (numpy's default). Throughput: successful requests and "
              "their output tokens over the wall time from the first start to the last end.", ""]
    lines += stats_table(summaries)
    lines += ["", "## Serving metrics", "",
              "As `vllm bench serve` defines them (scripts/loadmetrics.py): TTFT to the first "
              "content chunk, TPOT = (E2EL - TTFT) / (output tokens - 1), ITL every gap between "
              "chunks, E2EL to the end of the response; goodput: requests meeting every SLO.", ""]
    lines += markdown_table({name: s["metrics"] for name, s in summaries.items()})
    if gates is not None:
        lines += ["", "## Gates", ""] + ([f"- FAILED: {g}" for g in gates] or ["- all gates hold"])
    errors = {name: s["error_kinds"] for name, s in summaries.items() if s["error_kinds"]}
    if errors:
        lines += ["", "## Errors", ""]
        for name, kinds in errors.items():
            lines.append(f"- {name}: " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
            for kind, example in summaries[name].get("error_first", {}).items():
                lines.append(f"  - first {kind} {example}")
    if scenarios:
        lines += ["", "## Scenarios", "",
                  "CPU % (mean of the samples) and memory (peak) summed over the stack's "
                  "containers on every node, network I/O received/sent during the scenario, "
                  "from `docker stats`.", ""]
        lines += comparison_table(scenarios)
    if charts:
        lines += ["", "## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts]
    return "\n".join(lines) + "\n"


def _finish(plt, fig, ax, path: Path, legend: bool) -> Path:
    """Legend, layout, write the PNG, free the figure: how every chart here ends."""
    if legend:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_charts(records: list[Record], out: Path,
                 window: tuple[float, float] | None = None) -> list[Path]:
    """latency_hist.png (distribution of successful requests' latency, per scenario) and
    latency_over_time.png (each request's latency at its start time; errors marked x; the
    `window` (epoch start, end) of a command run under the load shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.scenario, []).append(r)
    start = min((r.timestamp for r in records), default=0.0)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rows in groups.items():
        values = [r.latency_s * 1000 for r in rows if r.ok]
        if values:
            ax.hist(values, bins=min(30, max(5, len(values) // 4)), alpha=0.6, label=name)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title("Latency distribution (successful requests)")
    paths.append(_finish(plt, fig, ax, out / "latency_hist.png", legend=bool(groups)))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rows in groups.items():
        good = [(r.timestamp - start, r.latency_s * 1000) for r in rows if r.ok]
        bad = [(r.timestamp - start, r.latency_s * 1000) for r in rows if not r.ok]
        if good:
            ax.scatter(*zip(*good), s=10, label=name)
        if bad:
            ax.scatter(*zip(*bad), s=30, marker="x", color="red", label=f"{name} errors")
    if window and all(window):
        ax.axvspan(window[0] - start, window[1] - start, color="orange", alpha=0.15,
                   label="--during command")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency over time")
    paths.append(_finish(plt, fig, ax, out / "latency_over_time.png", legend=bool(groups)))

    for stem, title, values_of in (
            ("ttft_hist", "TTFT distribution (ms)",
             lambda rows: [r.ttft_s * 1000 for r in rows if r.ok and r.ttft_s is not None]),
            ("itl_hist", "Inter-token latency distribution (ms, every gap)",
             lambda rows: [gap * 1000 for r in rows if r.ok for gap in r.itl_s])):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = False
        for name, rows in groups.items():
            values = values_of(rows)
            if values:
                ax.hist(values, bins=min(40, max(5, len(values) // 4)), alpha=0.6, label=name)
                drawn = True
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
        ax.set_title(title + ("" if drawn else ": none measured (not streamed?)"))
        paths.append(_finish(plt, fig, ax, out / f"{stem}.png", legend=drawn))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    seconds = throughput_series(records, start)
    if seconds:
        xs = sorted(seconds)
        ax.bar(xs, [seconds[x][1] for x in xs], width=0.8, alpha=0.5, label="output tokens/s")
        ax.legend(loc="upper left", fontsize="small")
        ax2 = ax.twinx()
        ax2.plot(xs, [seconds[x][0] for x in xs], "o-", color="green", label="requests/s")
        ax2.set_ylabel("requests/s (completed)")
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("second since the first request (requests counted in the second they ended)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput over time")
    paths.append(_finish(plt, fig, ax, out / "throughput_over_time.png", legend=False))
    return paths


def throughput_series(records: list[Record], start: float) -> dict[int, tuple[int, int]]:
    """{second since `start`: (requests completed, output tokens)} of successful requests, by
    the second each one ended in."""
    series: dict[int, tuple[int, int]] = {}
    for r in records:
        if r.ok:
            second = int(r.timestamp + r.latency_s - start)
            done, tokens = series.get(second, (0, 0))
            series[second] = (done + 1, tokens + r.tokens)
    return series


def write_reports(out: Path, records: list[Record], meta: dict[str, Any],
                  scenarios: list[dict[str, Any]] | None = None,
                  window: tuple[float, float] | None = None, slo_s: dict[str, float] | None = None,
                  gates: list[str] | None = None) -> dict[str, Path]:
    """Everything into `out`: requests.csv (appended), summary.md, summary.json and the PNGs.
    Summaries are per scenario when there are several, else one for the run; each carries the
    serving metrics (scripts/loadmetrics.py) under "metrics". `gates`: the gate failures, when
    gates were given ([] when all hold)."""
    from scripts.loadmetrics import field_metrics

    out.mkdir(parents=True, exist_ok=True)
    append_csv(out / "requests.csv", records)
    names = list(dict.fromkeys(r.scenario for r in records)) or ["load"]
    summaries = {}
    for name in names:
        rows = [r for r in records if r.scenario == name]
        summaries[name] = {**summarize(rows), "metrics": field_metrics(rows, slo_s)}
    charts = write_charts(records, out, window)
    (out / "summary.md").write_text(markdown_report(summaries, meta, scenarios,
                                                    [str(c) for c in charts], gates))
    payload = {"meta": meta, "summaries": summaries, "scenarios": scenarios or [],
               "gates": gates, "written": iso(time.time())}
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    return {"csv": out / "requests.csv", "markdown": out / "summary.md",
            "json": out / "summary.json", **{c.stem: c for c in charts}}


def record_dict(record: Record) -> dict[str, Any]:
    return asdict(record)
