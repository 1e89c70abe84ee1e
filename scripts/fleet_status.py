#!/usr/bin/env python3
"""The fleet as its Prometheus sees it: per node and per model, now. Read only.

    python3 scripts/fleet_status.py inventories/prod.py            # tables
    python3 scripts/fleet_status.py inventories/prod.py --json     # the same, as JSON
    python3 scripts/fleet_status.py inventories/lab.py --window 1m

Per node: GPUs, GPU utilisation (mean), GPU memory used of total, hottest GPU, last XID error,
node-exporter up. Per model: replicas answering of those configured, requests/s, p95 end-to-end
latency and time to first token (from the engines' own histograms), 5xx/s at the gateway. Then
the alerts firing.

Prometheus runs on the first of swarm_managers and admits only the fleet: the queries run there,
over SSH (operations/monitoring_facts.py), never across the network to its port.

Exit status: 0 no alert firing, 2 alerts firing, 1 Prometheus could not be asked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.fleet_access import fleet_or_refuse, reexec_in_venv  # noqa: E402

EXIT_OK, EXIT_UNREAD, EXIT_FIRING = 0, 1, 2


def node_queries() -> dict[str, str]:
    return {
        "gpus": 'count by (node) (DCGM_FI_DEV_GPU_TEMP{job="dcgm"})',
        "gpu_util_percent": 'avg by (node) (DCGM_FI_DEV_GPU_UTIL{job="dcgm"})',
        "gpu_memory_used_mib": 'sum by (node) (DCGM_FI_DEV_FB_USED{job="dcgm"})',
        "gpu_memory_total_mib": 'sum by (node) (DCGM_FI_DEV_FB_USED{job="dcgm"} + DCGM_FI_DEV_FB_FREE{job="dcgm"})',
        "gpu_temperature_max_c": 'max by (node) (DCGM_FI_DEV_GPU_TEMP{job="dcgm"})',
        "last_xid": 'max by (node) (DCGM_FI_DEV_XID_ERRORS{job="dcgm"})',
        "up": 'max by (node) (up{job="node"})',
    }


def model_queries(window: str) -> dict[str, str]:
    def p95(histogram: str) -> str:
        return (f"histogram_quantile(0.95, sum by (le, model) "
                f'(rate({histogram}_bucket{{job="engine"}}[{window}])))')
    return {
        "replicas_up": 'count by (model) (up{job="engine"} == 1)',
        "requests_per_s": f'sum by (model) (rate(vllm:request_success_total{{job="engine"}}[{window}]))',
        "p95_latency_s": p95("vllm:e2e_request_latency_seconds"),
        "p95_ttft_s": p95("vllm:time_to_first_token_seconds"),
        "errors_per_s": ('sum by (proxy) (rate(haproxy_backend_http_responses_total'
                         f'{{job="gateway", code="5xx"}}[{window}]))'),
    }


ALERTS_QUERY = 'ALERTS{alertstate="firing"}'


def _value(sample: dict) -> float | None:
    try:
        value = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def by_label(results: list[dict], label: str) -> dict[str, float | None]:
    return {sample["metric"].get(label, ""): _value(sample) for sample in results}


def summarise(settings, answers: dict[str, list[dict]]) -> dict:
    """The report (pure): nodes, models and alerts from the queries' answers."""
    from operations.gateway import backend_id

    nodes: dict[str, dict] = {}
    for key in node_queries():
        for name, value in by_label(answers[key], "node").items():
            nodes.setdefault(name, {"node": name})[key] = value
    models = []
    errors = {proxy.removeprefix("be_"): value
              for proxy, value in by_label(answers["errors_per_s"], "proxy").items()}
    for spec in settings.models:
        if not spec.serve:
            continue
        row = {"model": spec.name, "engine": spec.engine, "replicas": spec.replicas}
        for key in ("replicas_up", "requests_per_s", "p95_latency_s", "p95_ttft_s"):
            row[key] = by_label(answers[key], "model").get(spec.name)
        row["replicas_up"] = int(row["replicas_up"] or 0)
        row["errors_per_s"] = errors.get(backend_id(spec.name), 0.0)
        models.append(row)
    alerts = sorted(({"alert": s["metric"].get("alertname"), "severity": s["metric"].get("severity"),
                      **{k: s["metric"][k] for k in ("node", "model", "gpu", "proxy") if k in s["metric"]}}
                     for s in answers["alerts"]), key=lambda a: (a["alert"] or "", json.dumps(a)))
    return {"nodes": [nodes[name] for name in sorted(nodes)], "models": models, "alerts": alerts}


def _fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def tables(report: dict) -> str:
    """The report for people: two tables and the firing alerts."""
    lines = [f"{'node':<16} {'up':>3} {'GPUs':>4} {'GPU util':>8} {'GPU memory (MiB)':>20} "
             f"{'max temp':>8} {'last XID':>8}"]
    for row in report["nodes"]:
        memory = (f"{_fmt(row.get('gpu_memory_used_mib'), '.0f')} / "
                  f"{_fmt(row.get('gpu_memory_total_mib'), '.0f')}")
        lines.append(f"{row['node']:<16} {'yes' if row.get('up') == 1 else 'NO':>3} "
                     f"{_fmt(row.get('gpus'), '.0f'):>4} {_fmt(row.get('gpu_util_percent'), '.0f', '%'):>8} "
                     f"{memory:>20} {_fmt(row.get('gpu_temperature_max_c'), '.0f', ' C'):>8} "
                     f"{_fmt(row.get('last_xid'), '.0f'):>8}")
    lines += ["", f"{'model':<24} {'engine':<7} {'replicas':>8} {'req/s':>7} {'p95 latency':>11} "
                  f"{'p95 TTFT':>9} {'5xx/s':>7}"]
    for row in report["models"]:
        lines.append(f"{row['model']:<24} {row['engine']:<7} "
                     f"{str(row['replicas_up']) + '/' + str(row['replicas']):>8} "
                     f"{_fmt(row['requests_per_s'], '.2f'):>7} {_fmt(row['p95_latency_s'], '.3f', ' s'):>11} "
                     f"{_fmt(row['p95_ttft_s'], '.3f', ' s'):>9} {_fmt(row['errors_per_s'], '.2f'):>7}")
    lines.append("")
    if report["alerts"]:
        lines.append(f"{len(report['alerts'])} alert(s) firing:")
        for alert in report["alerts"]:
            where = ", ".join(f"{k}={v}" for k, v in alert.items() if k not in ("alert", "severity"))
            lines.append(f"  {alert['alert']} ({alert['severity']}){': ' + where if where else ''}")
    else:
        lines.append("no alert firing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--window", default="5m",
                        help="Prometheus range for rates and percentiles (default 5m)")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, as pyinfra's --data")
    args = parser.parse_args(argv)
    if not args.window[:-1].isdigit() or args.window[-1] not in "smhd" or args.window[0] == "0":
        print(f"fleet_status: --window {args.window!r}: expected a number and s, m, h or d "
              "(e.g. 5m)", file=sys.stderr)
        return 2
    reexec_in_venv()
    from operations.monitoring_facts import PrometheusQueries

    fleet, settings = fleet_or_refuse(args.inventory, args.data)
    if not settings.monitoring_enabled:
        print("fleet_status: monitoring_enabled is False: there is no Prometheus to ask",
              file=sys.stderr)
        return EXIT_UNREAD
    queries = {**node_queries(), **model_queries(args.window), "alerts": ALERTS_QUERY}
    where = fleet.managers[0]
    try:
        found = fleet.read_fact(where, PrometheusQueries, port=settings.monitoring_prometheus_port,
                                queries=list(queries.values()))
    except Exception as error:  # unreachable host: said in one line
        print(f"fleet_status: cannot reach {where}: {error}", file=sys.stderr)
        return EXIT_UNREAD
    if found["error"] or len(found["results"]) != len(queries):
        print(f"fleet_status: Prometheus on {where} did not answer: {found['error']}", file=sys.stderr)
        return EXIT_UNREAD
    report = summarise(settings, dict(zip(queries, found["results"])))
    report["prometheus"] = f"{where}:{settings.monitoring_prometheus_port}"
    report["window"] = args.window
    print(json.dumps(report, indent=2) if args.json else tables(report))
    return EXIT_FIRING if report["alerts"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
