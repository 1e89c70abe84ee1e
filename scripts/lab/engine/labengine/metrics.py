"""The lab engine's Prometheus series, under vLLM's own names, labels and buckets (vLLM 0.11's V1
engine, vllm/v1/metrics/loggers.py): what a dashboard or an alert written for vLLM reads, moving
as requests flow through the lab's CPU engine. LAB STAND-IN: the numbers are this engine's, on
CPU; there is no KV cache, no queue (a request runs as it comes: waiting is always 0).

Each finished choice counts as one request (vLLM counts a request with n > 1 once).
"""

from __future__ import annotations

import threading
import time

# vLLM's buckets (vllm/v1/metrics/loggers.py, PrometheusStatLogger).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def one_two_five(max_value: int) -> tuple[int, ...]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    """A Prometheus histogram: cumulative buckets, sum and count (text exposition format)."""

    def __init__(self, name: str, help_text: str, buckets: tuple):
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.buckets, self.counts):
            lines.append(f'{self.name}_bucket{{{labels},le="{_number(float(bound))}"}} {count}')
        lines += [f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}',
                  f"{self.name}_sum{{{labels}}} {self.total!r}",
                  f"{self.name}_count{{{labels}}} {self.count}"]
        return lines


class Metrics:
    """vLLM's series for one served model (labels model_name and engine="0", as vLLM's V1
    engine with one engine core)."""

    def __init__(self, model: str, max_model_len: int = 256):
        self.model = model
        self.lock = threading.Lock()
        # prometheus_client's process collector, which vLLM's /metrics carries: a restarted
        # engine shows as a new start time (the EngineRestarted alert).
        self.started = time.time()
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: dict[str, int] = {}
        self.http: dict[tuple[str, str, str], int] = {}
        lengths = one_two_five(max_model_len)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", TOKEN_BUCKETS)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", TOKEN_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", REQUEST_BUCKETS)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               REQUEST_BUCKETS)
        self.prompt_hist = Histogram("vllm:request_prompt_tokens",
                                     "Number of prefill tokens processed.", lengths)
        self.generation_hist = Histogram("vllm:request_generation_tokens",
                                         "Number of generation tokens processed.", lengths)

    def token(self, seconds: float, first: bool) -> None:
        """A token came `seconds` after the previous one (after the request's start: first)."""
        with self.lock:
            if first:
                self.ttft.observe(seconds)
            else:
                self.itl.observe(seconds)
                self.tpot.observe(seconds)

    def finished(self, reason: str, seconds: float, prompt_tokens: int, tokens: int) -> None:
        with self.lock:
            self.success[reason] = self.success.get(reason, 0) + 1
            self.e2e.observe(seconds)
            self.queue.observe(0.0)
            self.prompt_hist.observe(prompt_tokens)
            self.generation_hist.observe(tokens)

    def render(self) -> str:
        m = f'engine="0",model_name="{self.model}"'
        with self.lock:
            lines = [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{m}}} {self.running}",
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed "
                "(lab CPU engine: none, a request runs as it comes).",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{m}}} 0",
                "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total{{{m}}} {self.prompt_tokens}",
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total{{{m}}} {self.generation_tokens}",
                "# HELP vllm:request_success_total Count of successfully processed requests.",
                "# TYPE vllm:request_success_total counter",
            ]
            for reason in sorted(set(self.success) | {"stop", "length", "abort"}):
                lines.append(f'vllm:request_success_total{{{m},finished_reason="{reason}"}} '
                             f"{self.success.get(reason, 0)}")
            for histogram in (self.ttft, self.itl, self.tpot, self.e2e, self.queue,
                              self.prompt_hist, self.generation_hist):
                lines += histogram.render(m)
            lines += ["# HELP process_start_time_seconds Start time of the process since unix "
                      "epoch in seconds.", "# TYPE process_start_time_seconds gauge",
                      f"process_start_time_seconds {self.started!r}"]
            lines += ["# HELP http_requests_total Total number of requests by method, status and "
                      "handler.", "# TYPE http_requests_total counter"]
            for (handler, method, status), count in sorted(self.http.items()):
                lines.append(f'http_requests_total{{handler="{handler}",method="{method}",'
                             f'status="{status}"}} {count}')
        return "\n".join(lines) + "\n"
