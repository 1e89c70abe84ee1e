#!/usr/bin/env python3
"""A bounded load test of the served models, through the gateway or straight to the engines.

    python scripts/loadtest.py inventories/lab.py --requests 160 --concurrency 8 --out load/
    python scripts/loadtest.py inventories/lab.py --target engines --out load/
    python scripts/loadtest.py inventories/lab.py --target http://10.20.0.11:8080 --out load/
    python scripts/loadtest.py inventories/lab.py --scenarios --replicas 3 --out load/
    python scripts/loadtest.py inventories/prod.py --concurrency 4 --requests 100000 \
        --during "pyinfra -y inventories/prod.py deploy.py" --out rollout/

Sends `--requests` chat completions (default 160), `--concurrency` at a time (closed loop) or
at `--request-rate` requests/s (open loop: Poisson arrivals, or burstier with `--burstiness`),
streamed (SSE) unless `--no-stream`, with prompts from `--dataset FILE.jsonl` or of
`--input-tokens N`, and stops by itself: no new request after `--max-seconds`, and no request
waits longer than `--request-timeout`. Per request: latency, the arrival of every token chunk
(TTFT, ITL, TPOT), tokens in and out.

Writes into --out: requests.csv (one row per request, appended), summary.md and summary.json
(p50/p95/p99, throughput in requests/s and tokens/s, errors, and the serving metrics of
scripts/loadmetrics.py: TTFT, TPOT, ITL, E2EL and output tokens/s with mean, median, p90, p99;
goodput against `--slo`), latency_hist.png, latency_over_time.png, ttft_hist.png, itl_hist.png
and throughput_over_time.png. Exit 0; 1 when any request failed; 2 on a refused configuration;
3 when a `--gate` (or the `--baseline` comparison) does not hold.

--scenarios runs the same load four times: one replica of the model's engine service and
--replicas replicas (`docker service scale` on a manager; the original count is restored
afterwards, whatever happens), each through the gateway and directly to the engine tasks,
while `docker stats` samples every node's stack containers; the comparison table (CPU %,
memory, network I/O, average and p95 latency, throughput) goes into the same reports.

--during COMMAND runs a command (a deploy that rolls the stack, a node drain) under a steady
load of --concurrency requests at a time, and keeps the load on until --settle seconds after it
exits: every failed request is one a user would have seen during the change. The report adds
the command's exit code and duration, whether the load covered it, and the failures during it;
latency_over_time.png shades the command's window; its output goes to during.log. A streamed
request counts as failed unless its stream ends with `data: [DONE]`.

The API key comes from stack_api_key_file and is sent only as the Authorization header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.fleet_access import reexec_in_venv  # noqa: E402

reexec_in_venv()

import httpx  # noqa: E402

from operations import smoke as sm  # noqa: E402
from scripts import loadmetrics as lm  # noqa: E402
from scripts import loadstats as ls  # noqa: E402
from scripts.fleet_access import Fleet, fleet_or_refuse  # noqa: E402
from scripts.loadclient import (  # noqa: E402
    Endpoint, Prompt, load_prompts, one_request, run_load, synthetic_prompt,
)

# A --gate or --baseline that does not hold: the rollout (or CI) that ran the load test stops.
EXIT_GATE = 3
STATS_COMMAND = "docker stats --no-stream --format '{{json .}}'"
# A sampler thread stops after this many rounds whatever happens (bounded loop).
MAX_SAMPLE_ROUNDS = 2000


# --- Where the load goes --------------------------------------------------------------------


def endpoints_for(target: str, settings, stack: dict | None) -> list[Endpoint]:
    """`gateway`: every gateway address (each serves every model); `engines`: every engine task
    (its own model); a URL: that base URL, serving every configured model."""
    served = sm.served_models(settings)
    vllm_only = all(spec.engine == "vllm" for spec in served)
    if target not in ("gateway", "engines"):
        return [Endpoint(target.rstrip("/"), tuple(s.served_name for s in served), vllm_only)]
    targets, _ = sm.stack_targets(settings, stack or {"services": [], "tasks": [], "nodes": []})
    kind = "gateway" if target == "gateway" else "engine"
    engines = {spec.served_name: spec.engine for spec in served}
    return [
        Endpoint(t.url, t.models,
                 vllm_only if t.kind == "gateway" else engines.get(t.models[0]) == "vllm",
                 headers=t.headers, label=t.url if t.kind == "gateway" else t.name,
                 server_name=t.server_name)
        for t in targets if t.kind == kind
    ]


def only_model(endpoints: list[Endpoint], settings, model: str | None) -> list[Endpoint]:
    """The endpoints that serve `model` (a name or served name), sending only it; all when None."""
    if model is None:
        return endpoints
    names = {s.served_name for s in sm.served_models(settings) if model in (s.name, s.served_name)}
    return [replace(e, models=tuple(n for n in e.models if n in names))
            for e in endpoints if names & set(e.models)]


# --- docker stats sampling ------------------------------------------------------------------


class Sampler:
    """Samples `docker stats` on each node in a thread of its own: once before the load starts
    (entering waits for it), then every `interval_s` until stopped, and once more after (so
    network I/O is counted over the whole scenario). Bounded: MAX_SAMPLE_ROUNDS rounds."""

    def __init__(self, fleet: Fleet, nodes: list[str], interval_s: float = 1.0):
        self.fleet, self.nodes, self.interval_s = fleet, nodes, interval_s
        self.samples: list[dict] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._ready = {n: threading.Event() for n in nodes}
        self._threads = [threading.Thread(target=self._loop, args=(n,), daemon=True)
                         for n in nodes]

    def _sample(self, node: str) -> bool:
        try:
            ok, stdout, stderr = self.fleet.run(node, STATS_COMMAND, timeout=30)
        except Exception as error:  # a node that stops answering: say so, stop sampling it
            self.problems.append(f"{node}: {error}")
            return False
        if not ok:
            self.problems.append(f"{node}: {' '.join(stderr)[:200]}")
            return False
        now = time.time()
        for line in stdout:
            sample = ls.parse_stats_line(line)
            if sample:
                self.samples.append({**sample, "node": node, "t": now})
        return True

    def _loop(self, node: str) -> None:
        answered = self._sample(node)
        self._ready[node].set()
        for _ in range(MAX_SAMPLE_ROUNDS):
            if not answered or self._stop.wait(self.interval_s):
                break
            answered = self._sample(node)
        if answered:
            self._sample(node)  # after the load

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        for event in self._ready.values():
            event.wait(timeout=60)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


# --- Scenarios ------------------------------------------------------------------------------


def scale(fleet: Fleet, manager: str, service: str, replicas: int) -> None:
    """Ask Swarm for `replicas` tasks (detached: wait_ready does the bounded waiting)."""
    try:
        ok, _, stderr = fleet.run(
            manager, f"docker service scale --detach {service}={int(replicas)}", timeout=120)
    except Exception as error:  # the manager stopped answering
        raise RuntimeError(f"docker service scale {service}={replicas}: {error}") from None
    if not ok:
        raise RuntimeError(f"docker service scale {service}={replicas}: {' '.join(stderr)[:300]}")


def wait_ready(fleet: Fleet, manager: str, settings, deadline_s: float, wanted: int,
               service: str, key: str | None = None) -> dict:
    """Re-read the stack (every 2 s, until the deadline) until `wanted` tasks of `service` run,
    then wait for every endpoint's /health; the stack as read. RuntimeError with Swarm's
    reasons (a rejected task's error) when it does not get there in time."""
    end = time.monotonic() + deadline_s
    stack: dict = {}
    for _ in range(int(deadline_s // 2) + 2):
        stack = fleet.read_fact(manager, sm.SmokeStack, stack_name=settings.stack_name)
        running = [t for t in stack["tasks"] if t["service"] == service and t["state"] == "running"]
        if len(running) >= wanted:
            break
        if time.monotonic() > end:
            _, problems = sm.stack_targets(settings, stack)
            reasons = "; ".join(p.detail for p in problems if p.endpoint == service)
            raise RuntimeError(f"{service}: {len(running)} of {wanted} task(s) running after "
                               f"{deadline_s:g}s" + (f" ({reasons})" if reasons else ""))
        time.sleep(2)
    targets, _ = sm.stack_targets(settings, stack)
    with httpx.Client(verify=sm.tls_context(settings.stack_gateway_ca_file)) as client:
        for target in targets:
            result = sm.check_health(client, target, max(1.0, end - time.monotonic()), key=key)
            if result.failed:
                raise RuntimeError(result.failure_line())
    return stack


def run_scenarios(fleet: Fleet, settings, manager: str, stack: dict, key: str | None,
                  args, records: list | None = None,
                  scenarios: list | None = None) -> tuple[list[ls.Record], list[dict]]:
    """1 replica and N replicas of one model's engine service, each through the gateway and
    direct; the original replica count is restored in every case. Results are appended to
    `records` and `scenarios` as each scenario ends, so a later failure keeps them."""
    spec = next((s for s in sm.served_models(settings)
                 if args.model in (None, s.name, s.served_name)), None)
    if spec is None:
        raise RuntimeError(f"no served model {args.model}")
    service = f"{settings.stack_name}_{sm.service_key(spec.name)}"
    found = next((s for s in stack["services"] if s["name"] == service), None)
    if found is None or found["mode"] != "replicated":
        raise RuntimeError(f"service {service} is not a replicated service of the stack")
    original = found["replicas"]
    ready = [n for n in stack["nodes"] if n["state"] == "ready" and n["availability"] == "active"]
    many = args.replicas or len(ready)
    node_hosts = [n["host"] for n in stack["nodes"] if n["host"] in fleet.hosts]
    for name in node_hosts:  # connect every node before the sampler's threads use them
        fleet.pyinfra_host(name)
    records = [] if records is None else records
    scenarios = [] if scenarios is None else scenarios
    try:
        for replicas in dict.fromkeys([1, many]):
            print(f"scaling {service} to {replicas} replica(s)")
            scale(fleet, manager, service, replicas)
            current = wait_ready(fleet, manager, settings, settings.smoke_deadline_s, replicas,
                                 service, key)
            time.sleep(args.settle)  # the gateway re-resolves its backends (DNS round-robin)
            for path in ("gateway", "engines"):
                endpoints = [e for e in endpoints_for(path, settings, current)
                             if spec.served_name in e.models]
                endpoints = [replace(e, models=(spec.served_name,)) for e in endpoints]
                name = f"{replicas} replica(s), {'gateway' if path == 'gateway' else 'pinned'}"
                print(f"scenario {name}: {len(endpoints)} endpoint(s)")
                with Sampler(fleet, node_hosts, args.sample_interval) as sampler:
                    got = asyncio.run(run_load(endpoints, key, args.requests, args.concurrency,
                                               args.max_seconds, not args.no_stream,
                                               args.max_tokens, args.request_timeout, name,
                                               verify=sm.tls_context(settings.stack_gateway_ca_file),
                                               **shape_of(args)))
                usage = ls.container_usage(sampler.samples, f"{settings.stack_name}_")
                records += got
                scenarios.append({
                    "name": name, "replicas": replicas, "path": path,
                    "endpoints": [e.name for e in endpoints], "summary": ls.summarize(got),
                    "usage": usage, "usage_totals": ls.usage_totals(usage),
                    "sampling_problems": sampler.problems,
                })
    finally:
        print(f"restoring {service} to {original} replica(s)")
        scale(fleet, manager, service, original)
    return records, scenarios


# --- A command under load -------------------------------------------------------------------


class During:
    """COMMAND (through the shell, its output into `log`) run in a thread while the load runs:
    the load stops `settle_s` after the command exits, so requests sent just after a rolling
    update count too. Bounded: the command is killed after `timeout_s`."""

    def __init__(self, command: str, log: Path, settle_s: float, timeout_s: float):
        self.command, self.log, self.settle_s, self.timeout_s = command, log, settle_s, timeout_s
        self.started: float | None = None
        self.ended: float | None = None
        self.exit_code: int | None = None
        self.problem = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.started = time.time()
        try:
            with self.log.open("w") as log:
                done = subprocess.run(self.command, shell=True, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=self.timeout_s)
            self.exit_code = done.returncode
        except subprocess.TimeoutExpired:
            self.problem = f"killed after {self.timeout_s:g}s"
        except OSError as error:
            self.problem = f"could not run: {error.strerror}"
        finally:
            self.ended = time.time()

    def start(self) -> "During":
        self._thread.start()
        return self

    def settled(self) -> bool:
        """The command has exited and the settle time after it has passed."""
        return self.ended is not None and time.time() >= self.ended + self.settle_s

    def join(self) -> None:
        self._thread.join()

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.problem

    def meta(self, records: list[ls.Record]) -> dict:
        """What the reports say of the command: its result, and whether the load covered it
        (a load that stopped first, at --max-seconds or --requests, measured only part)."""
        last_start = max((r.timestamp for r in records), default=0.0)
        covered = self.ended is not None and last_start >= self.ended
        return {
            "during": self.command,
            "during_exit_code": self.exit_code if not self.problem else self.problem,
            "during_s": round((self.ended or time.time()) - (self.started or time.time()), 1),
            "during_log": str(self.log),
            "during_covered": covered,
            "failed_during": sum(1 for r in records if not r.ok),
        }


# --- CLI ------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inventory")
    parser.add_argument("--requests", type=int, default=160, help="requests per run (default 160)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", required=True, help="directory for CSV, Markdown, JSON and PNGs")
    parser.add_argument("--target", default="gateway", help="gateway | engines | a base URL")
    parser.add_argument("--scenarios", action="store_true",
                        help="1 vs N replicas, gateway vs direct, with docker stats")
    parser.add_argument("--replicas", type=int, help="N of the scenarios (default: ready nodes)")
    parser.add_argument("--model", help="only this model (name or served name); the model of "
                                        "the scenarios (default: every served model; the "
                                        "scenarios: the first)")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="no new request after this many seconds (per run or scenario)")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-stream", action="store_true", help="plain (non-streamed) requests")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait after scaling, once healthy (scenarios); seconds "
                             "the load goes on after --during's command exits")
    parser.add_argument("--sample-interval", type=float, default=1.0)
    parser.add_argument("--during", metavar="COMMAND",
                        help="run COMMAND (a shell command line, e.g. a deploy that rolls the "
                             "stack) under the load; the load stops --settle seconds after it "
                             "exits (or at --max-seconds / --requests, which the report flags)")
    parser.add_argument("--during-timeout", type=float, default=3600.0,
                        help="seconds after which COMMAND is killed (default 3600)")
    parser.add_argument("--request-rate", type=float, metavar="R",
                        help="open loop: R requests/s on average (arrivals as --burstiness "
                             "says), at most --concurrency in flight; default: closed loop")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the gaps between arrivals: 1 Poisson (default), "
                             "<1 burstier, >1 more even (vLLM's --burstiness)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--dataset", metavar="FILE.jsonl",
                        help='prompts, one JSON object a line: {"prompt": "...", "output_tokens": N}')
    parser.add_argument("--input-tokens", type=int, metavar="N",
                        help="a synthetic prompt of about N tokens (output: --max-tokens)")
    parser.add_argument("--slo", metavar="ttft=500ms,tpot=50ms,e2el=5s",
                        help="goodput: the share (and rate) of requests meeting every SLO given")
    parser.add_argument("--gate", action="append", default=[], metavar="METRIC<=LIMIT",
                        help="exit 3 unless METRIC<=LIMIT (or >=) holds, e.g. ttft_p99<=800ms, "
                             "goodput_share>=95%%, output_throughput>=50 (repeatable)")
    parser.add_argument("--baseline", metavar="summary.json",
                        help="exit 3 when latency (p99, median) grew or throughput or goodput "
                             "fell by more than --tolerance against this earlier report")
    parser.add_argument("--tolerance", default="10%",
                        help="how much worse than --baseline still passes (default 10%%)")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.request_rate is not None and args.request_rate <= 0:
        parser.error("--request-rate must be above 0")
    if args.burstiness <= 0:
        parser.error("--burstiness must be above 0")
    if args.dataset and args.input_tokens:
        parser.error("--dataset and --input-tokens both say what to send: choose one")
    if args.input_tokens is not None and args.input_tokens < 1:
        parser.error("--input-tokens must be at least 1")
    try:
        args.prompts = (load_prompts(Path(args.dataset)) if args.dataset else
                        [synthetic_prompt(args.input_tokens)] if args.input_tokens else None)
        args.slo_s = lm.parse_slo(args.slo) if args.slo else None
        args.gates = [lm.parse_gate(text) for text in args.gate]
        tolerance = args.tolerance.rstrip("%")
        args.tolerance_share = float(tolerance) / (100 if args.tolerance.endswith("%") else 1)
        if args.baseline:
            args.gates += lm.baseline_gates(baseline_metrics(Path(args.baseline)),
                                            args.tolerance_share)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    for name in ("requests", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 < args.max_seconds <= 3600:
        parser.error("--max-seconds must be in (0, 3600]")
    if args.during and args.scenarios:
        parser.error("--during and --scenarios measure different things: choose one")
    return args


def shape_of(args) -> dict:
    """What run_load needs of --dataset/--input-tokens and --request-rate/--burstiness/--seed."""
    return {"prompts": args.prompts, "request_rate": args.request_rate,
            "burstiness": args.burstiness, "seed": args.seed}


def baseline_metrics(path: Path) -> dict:
    """The serving metrics of an earlier summary.json: its run, or its only scenario."""
    try:
        summaries = json.loads(path.read_text())["summaries"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"--baseline {path}: not a summary.json of this load test") from None
    if len(summaries) != 1 or "metrics" not in next(iter(summaries.values())):
        raise ValueError(f"--baseline {path}: expected one run with serving metrics, found "
                         f"{', '.join(summaries) or 'none'}")
    return next(iter(summaries.values()))["metrics"]


def run(argv) -> int:
    args = parse_args(argv)
    fleet, settings = fleet_or_refuse(args.inventory, args.data)
    if not sm.served_models(settings):
        print("no model is served: nothing to load", file=sys.stderr)
        return 1
    try:
        key = sm.read_api_key(settings.stack_api_key_file)
    except OSError as error:
        print(f"loadtest: cannot read stack_api_key_file: {error.strerror}", file=sys.stderr)
        return 1
    out = Path(args.out)
    meta = {"requests": args.requests, "concurrency": args.concurrency,
            "stream": not args.no_stream, "max_tokens": args.max_tokens,
            "max_seconds": args.max_seconds, "started": ls.iso(time.time()),
            "arrivals": (f"open loop, {args.request_rate:g} req/s, burstiness {args.burstiness:g}"
                         f" (seed {args.seed})" if args.request_rate else "closed loop"),
            "prompts": (args.dataset or (f"synthetic, {args.input_tokens} tokens"
                                         if args.input_tokens else "one short prompt"))}
    if args.slo:
        meta["slo"] = args.slo
    records: list[ls.Record] = []
    scenarios: list[dict] | None = None
    failure = None
    during: During | None = None
    try:
        if args.scenarios:
            manager, stack = fleet.read_from_manager(sm.SmokeStack, stack_name=settings.stack_name)
            meta["target"] = "scenarios"
            scenarios = []
            run_scenarios(fleet, settings, manager, stack, key, args, records, scenarios)
        else:
            stack = None
            if args.target in ("gateway", "engines"):
                _, stack = fleet.read_from_manager(sm.SmokeStack, stack_name=settings.stack_name)
            endpoints = only_model(endpoints_for(args.target, settings, stack), settings,
                                   args.model)
            if not endpoints:
                print(f"loadtest: no {args.target} endpoint in the stack", file=sys.stderr)
                return 1
            meta["target"] = args.target
            meta["endpoints"] = ", ".join(e.name for e in endpoints)
            if args.during:
                out.mkdir(parents=True, exist_ok=True)
                during = During(args.during, out / "during.log", args.settle,
                                args.during_timeout).start()
            records = asyncio.run(run_load(endpoints, key, args.requests, args.concurrency,
                                           args.max_seconds, not args.no_stream, args.max_tokens,
                                           args.request_timeout,
                                           until=during.settled if during else None,
                                           verify=sm.tls_context(settings.stack_gateway_ca_file),
                                           **shape_of(args)))
            if during:
                during.join()
                meta.update(during.meta(records))
    except RuntimeError as error:
        failure = str(error)
        meta["stopped"] = failure
    if failure and not records:
        print(f"loadtest: {failure}", file=sys.stderr)
        return 1
    gate_lines = None
    if args.gates:
        gate_lines = lm.gate_failures(lm.field_metrics(records, args.slo_s), args.gates)
    written = ls.write_reports(out, records, meta, scenarios,
                               window=(during.started, during.ended) if during else None,
                               slo_s=args.slo_s, gates=gate_lines)
    print((out / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    failed = [r for r in records if not r.ok]
    if failed:
        print(f"loadtest: {len(failed)} of {len(records)} request(s) failed", file=sys.stderr)
    if failure:  # the scenarios that ran are in the reports
        print(f"loadtest: stopped: {failure}", file=sys.stderr)
    if during and not during.ok:
        print(f"loadtest: --during exited {meta.get('during_exit_code')} (its output: "
              f"{during.log})", file=sys.stderr)
    if during and not meta.get("during_covered"):
        print("loadtest: the load stopped before --during's command ended: raise --max-seconds "
              "or --requests", file=sys.stderr)
    during_bad = during is not None and not (during.ok and meta.get("during_covered"))
    if gate_lines:
        for line in gate_lines:
            print(f"loadtest: {line}", file=sys.stderr)
        return EXIT_GATE
    return 1 if failed or failure or not records or during_bad else 0


def _exit_on_sigterm(signum, frame):
    # A killed load test still restores the replica count it changed (run_scenarios' finally).
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(run(sys.argv[1:]))
