"""The field's serving metrics, from the load test's recorded token timings, named and defined as
vLLM's benchmark does (`vllm bench serve`: vllm/benchmarks/serve.py, `calculate_metrics`, and the
per-chunk timestamps its request functions take), so a report here compares with one of theirs:

- TTFT: from sending a request to its first content chunk.
- ITL (inter-token latency): every gap between two successive content chunks of a request, after
  the first; the ITLs of all requests are pooled.
- TPOT (time per output token, excluding the first): per request, (E2EL - TTFT) / (output
  tokens - 1), for requests with more than one output token (vLLM counts TPOT as 0 for goodput
  when there is one token or none).
- E2EL (end-to-end latency): from sending a request to the end of its response.
- Output tokens/s per request: output tokens / E2EL; request throughput: completed requests /
  duration; output throughput: output tokens / duration; total token throughput: input + output
  tokens / duration. Duration: from the first request's start to the last one's end.
- Goodput (vLLM's `--goodput ttft:500 tpot:50`): requests that completed and met every SLO given,
  per second of the duration; here also as a share of all requests sent (failed ones count as
  missing their SLOs).

Each distribution is reported with mean, median, p90 and p99 (loadstats.percentile: linear
interpolation between closest ranks, numpy's default, as vLLM's np.percentile), in ms.

`--gate` limits and `--baseline` comparisons read these metrics back by name (`ttft_p99`,
`goodput_share`, `output_throughput`, ...): gate_failures says which regressed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from scripts.loadstats import Record, percentile

DISTRIBUTIONS = ("ttft", "tpot", "itl", "e2el", "output_tokens_per_s")
STATS = ("mean", "median", "p90", "p99")
SLO_KEYS = ("ttft", "tpot", "e2el")
RATES = ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
         "goodput_share", "completed", "failed")


def request_tpot(record: Record) -> float | None:
    """(E2EL - TTFT) / (output tokens - 1), or None with one output token or none, or no TTFT."""
    if record.ttft_s is None or record.tokens <= 1:
        return None
    return (record.latency_s - record.ttft_s) / (record.tokens - 1)


def distribution(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean, median, p90, p99 of `values` x `scale` (1000: seconds to ms); None for no values."""
    scaled = [v * scale for v in values]
    return {
        "mean": sum(scaled) / len(scaled) if scaled else None,
        "median": percentile(scaled, 50),
        "p90": percentile(scaled, 90),
        "p99": percentile(scaled, 99),
    }


def is_good(record: Record, slo_s: dict[str, float]) -> bool:
    """Completed and within every SLO given (seconds). TPOT of a one-token request counts as 0,
    as in vLLM; a request with no TTFT (not streamed) misses a TTFT SLO."""
    if not record.ok:
        return False
    measured = {"ttft": record.ttft_s, "tpot": request_tpot(record) or 0.0, "e2el": record.latency_s}
    return all(measured[key] is not None and measured[key] <= limit for key, limit in slo_s.items())


def field_metrics(records: list[Record], slo_s: dict[str, float] | None = None) -> dict[str, Any]:
    """Every metric of the module doc over `records` (one scenario, or the run)."""
    ok = [r for r in records if r.ok]
    if records:
        duration = max(r.timestamp + r.latency_s for r in records) - min(r.timestamp for r in records)
    else:
        duration = 0.0
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    output = sum(r.tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpots = [t for t in map(request_tpot, ok) if t is not None]
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "input_tokens": prompt,
        "output_tokens": output,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output),
        "total_token_throughput": per_s(prompt + output),
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None], 1000),
        "tpot_ms": distribution(tpots, 1000),
        "itl_ms": distribution([gap for r in ok for gap in r.itl_s], 1000),
        "e2el_ms": distribution([r.latency_s for r in ok], 1000),
        "output_tokens_per_s": distribution([r.tokens / r.latency_s for r in ok if r.latency_s > 0]),
    }
    if slo_s:
        good = sum(1 for r in records if is_good(r, slo_s))
        metrics["slo_ms"] = {key: value * 1000 for key, value in slo_s.items()}
        metrics["good"] = good
        metrics["request_goodput"] = per_s(good)
        metrics["goodput_share"] = good / len(records) if records else 0.0
    return metrics


# --- Reading limits off the command line ------------------------------------------------------

_DURATION = re.compile(r"^([0-9]*\.?[0-9]+)(ms|s)?$")


def parse_duration_s(text: str) -> float:
    """"500ms", "0.5s", "500" (milliseconds, as vLLM's --goodput) -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r}: expected a duration such as 500ms or 1.5s")
    value, unit = float(match[1]), match[2] or "ms"
    return value / 1000 if unit == "ms" else value


def parse_slo(text: str) -> dict[str, float]:
    """--slo ttft=500ms,tpot=50ms,e2el=5s -> {key: seconds}."""
    slo = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"{part!r}: expected KEY=DURATION with KEY one of {', '.join(SLO_KEYS)}")
        slo[key] = parse_duration_s(value)
    if not slo:
        raise ValueError("expected at least one KEY=DURATION, e.g. ttft=500ms")
    return slo


def metric_names() -> list[str]:
    return [f"{d}_{s}" for d in DISTRIBUTIONS for s in STATS] + list(RATES)


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """A metric by its gate name: `<distribution>_<stat>` (ms; output_tokens_per_s in tokens/s)
    or one of RATES."""
    if name in RATES:
        value = metrics.get(name)
        return None if value is None else float(value)
    for dist in DISTRIBUTIONS:
        for stat in STATS:
            if name == f"{dist}_{stat}":
                key = dist if dist == "output_tokens_per_s" else f"{dist}_ms"
                return (metrics.get(key) or {}).get(stat)
    raise ValueError(f"unknown metric {name!r}: expected one of {', '.join(metric_names())}")


@dataclass(frozen=True)
class Gate:
    """`metric<=limit` or `metric>=limit`; latency limits in ms (or with ms/s), shares as 0.95 or
    95%."""

    metric: str
    op: str
    limit: float

    def holds(self, value: float | None) -> bool:
        if value is None:
            return False
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"


_GATE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=)\s*(\S+)\s*$")


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if not match:
        raise ValueError(f"{text!r}: expected METRIC<=LIMIT or METRIC>=LIMIT, e.g. ttft_p99<=800ms")
    name, op, raw = match.groups()
    metric_value({}, name)  # ValueError for an unknown name
    if raw.endswith("%"):
        limit = float(raw[:-1]) / 100
    elif raw.endswith(("ms", "s")) and not name.startswith(RATES + ("output_tokens_per_s",)):
        limit = parse_duration_s(raw) * 1000
    else:
        try:
            limit = float(raw)
        except ValueError:
            raise ValueError(f"{text!r}: {raw!r} is not a number") from None
    return Gate(name, op, limit)


# Compared with --baseline: latency may grow, throughput and goodput shrink, by the tolerance.
BASELINE_LOWER_IS_BETTER = ("ttft_p99", "tpot_p99", "itl_p99", "e2el_p99", "ttft_median",
                            "e2el_median")
BASELINE_HIGHER_IS_BETTER = ("request_throughput", "output_throughput", "goodput_share")


def baseline_gates(baseline: dict[str, Any], tolerance: float) -> list[Gate]:
    """Gates from a previous report's metrics: each latency at most (1 + tolerance) x its
    baseline, each throughput and the goodput share at least (1 - tolerance) x its baseline."""
    gates = []
    for name in BASELINE_LOWER_IS_BETTER:
        value = metric_value(baseline, name)
        if value is not None:
            gates.append(Gate(name, "<=", value * (1 + tolerance)))
    for name in BASELINE_HIGHER_IS_BETTER:
        value = metric_value(baseline, name)
        if value is not None:
            gates.append(Gate(name, ">=", value * (1 - tolerance)))
    return gates


def gate_failures(metrics: dict[str, Any], gates: list[Gate]) -> list[str]:
    """One line per gate that does not hold, with the measured value."""
    failures = []
    for gate in gates:
        value = metric_value(metrics, gate.metric)
        if not gate.holds(value):
            shown = "not measured" if value is None else f"{value:g}"
            failures.append(f"gate {gate} failed: {gate.metric} = {shown}")
    return failures


def markdown_table(metrics_by_name: dict[str, dict[str, Any]]) -> list[str]:
    """The serving metrics per scenario, as vLLM's benchmark prints them (ms; tokens/s)."""
    lines = ["| scenario | metric | mean | median | p90 | p99 |", "|---|---|---:|---:|---:|---:|"]
    labels = {"ttft": "TTFT ms", "tpot": "TPOT ms", "itl": "ITL ms", "e2el": "E2EL ms",
              "output_tokens_per_s": "output tokens/s per request"}
    for name, m in metrics_by_name.items():
        for dist in DISTRIBUTIONS:
            values = m[dist if dist == "output_tokens_per_s" else f"{dist}_ms"]
            cells = ["-" if values[s] is None else f"{values[s]:.1f}" for s in STATS]
            lines.append(f"| {name} | {labels[dist]} | " + " | ".join(cells) + " |")
    lines += ["", "| scenario | completed | failed | duration s | requests/s | output tokens/s | "
              "total tokens/s | goodput req/s | goodput share |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in metrics_by_name.items():
        goodput = (f"{m['request_goodput']:.2f} | {m['goodput_share']:.1%}" if "good" in m
                   else "- | -")
        lines.append(f"| {name} | {m['completed']} | {m['failed']} | {m['duration_s']:.1f} | "
                     f"{m['request_throughput']:.2f} | {m['output_throughput']:.1f} | "
                     f"{m['total_token_throughput']:.1f} | {goodput} |")
    return lines
