"""The load test's client side: what each request asks (prompts from a dataset file, or
synthetic of a given length), when it is sent (closed loop: `concurrency` requests in flight;
open loop: arrivals at a request rate, Poisson or burstier), and what is recorded of it (the
arrival time of every content chunk, as vLLM's benchmark request functions take them).

    records = asyncio.run(run_load([Endpoint(url, ("tiny-llama",))], key, requests=100,
                                   concurrency=8, max_seconds=60, request_rate=4.0))
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from operations.smoke_checks import completion_tokens
from scripts import loadstats as ls

PROMPT = "Write one sentence about GPUs."


@dataclass(frozen=True)
class Endpoint:
    url: str
    models: tuple[str, ...]
    usage_in_stream: bool = True  # vLLM's stream_options.include_usage
    # Sent with every request (an engine task behind the gateway: the pin header naming it).
    headers: tuple[tuple[str, str], ...] = ()
    # What records name this endpoint by, when the URL is shared (pinned engine tasks).
    label: str = ""
    # The name the gateway's certificate is verified for (SNI), when not the URL's host.
    server_name: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.url

    @property
    def extensions(self) -> dict[str, str]:
        return {"sni_hostname": self.server_name} if self.server_name else {}


@dataclass(frozen=True)
class Prompt:
    """One request's content and how many tokens it asks for (None: --max-tokens)."""

    text: str
    max_tokens: int | None = None


def synthetic_prompt(input_tokens: int) -> Prompt:
    """A prompt of about `input_tokens` tokens: that many short common words (one token each
    in the usual BPE vocabularies; the engine's usage.prompt_tokens says what it counted)."""
    words = ("the", "GPU", "fleet", "serves", "a", "model", "on", "every", "node", "and")
    return Prompt(" ".join(words[i % len(words)] for i in range(max(1, input_tokens))))


def load_prompts(path: Path) -> list[Prompt]:
    """A JSONL file: one object per line with "prompt" (a string) and optionally
    "output_tokens" (that request's max_tokens). ValueError naming the line otherwise."""
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        text = item.get("prompt") if isinstance(item, dict) else None
        tokens = item.get("output_tokens") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text:
            raise ValueError(f'{path}:{number}: expected {{"prompt": "...", "output_tokens": N}}')
        if tokens is not None and not (isinstance(tokens, int) and tokens >= 1):
            raise ValueError(f"{path}:{number}: output_tokens must be a whole number >= 1")
        prompts.append(Prompt(text, tokens))
    if not prompts:
        raise ValueError(f"{path}: no prompt in it")
    return prompts


def arrival_offsets(count: int, rate: float, burstiness: float = 1.0,
                    seed: int | None = 0) -> list[float]:
    """Seconds after the start at which each of `count` requests is sent, at `rate` requests/s
    on average: gaps drawn from a gamma distribution of shape `burstiness` and scale
    1 / (rate x burstiness), as vLLM's benchmark draws them (burstiness 1: exponential gaps, a
    Poisson process; below 1 burstier, above 1 more even). The first request goes at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    draw = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += draw.gammavariate(burstiness, theta)
    return offsets


def _body(model: str, prompt: Prompt, stream: bool, max_tokens: int, usage_in_stream: bool) -> dict:
    # ignore_eos (vLLM's sampling parameter, as its own benchmarks use it): every request
    # generates max_tokens, so runs compare like with like and none ends empty on an early EOS.
    body = {"model": model, "messages": [{"role": "user", "content": prompt.text}],
            "max_tokens": prompt.max_tokens or max_tokens, "stream": stream, "ignore_eos": True}
    if stream and usage_in_stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class StreamRead:
    chunk_times: list[float]  # seconds after sending, one per content chunk
    tokens: int
    prompt_tokens: int
    complete: bool
    # An error event in the stream (vLLM sends `data: {"error": ...}` then [DONE] when a request
    # fails after its 200, an engine shut down under it included): a failed request.
    error: str = ""


async def _read_stream(response: httpx.Response, started: float) -> StreamRead:
    """An SSE stream: the arrival of every chunk carrying content (TTFT is the first, ITLs the
    gaps between the next ones), tokens from the usage of the last chunk (else the number of
    content chunks); complete when the stream ended with `data: [DONE]` (a stream cut short by
    an engine going away may still end cleanly at the HTTP level); an error event is kept."""
    read = StreamRead([], 0, 0, False)
    usage = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            read.complete = True
            break
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("error") and not read.error:
            failure = event["error"]
            read.error = str(failure.get("message") if isinstance(failure, dict) else failure)
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                read.chunk_times.append(time.perf_counter() - started)
        reported = event.get("usage") or {}
        if isinstance(reported.get("completion_tokens"), int):
            usage = reported["completion_tokens"]
            read.prompt_tokens = int(reported.get("prompt_tokens") or 0)
    read.tokens = usage if usage is not None else len(read.chunk_times)
    return read


async def one_request(client: httpx.AsyncClient, endpoint: Endpoint, model: str, key: str | None,
                      stream: bool, max_tokens: int, scenario: str,
                      prompt: Prompt = Prompt(PROMPT)) -> ls.Record:
    """One chat completion; never raises (a failure is a Record with status 0 or the HTTP
    status, and the error's kind)."""
    headers = {**dict(endpoint.headers), **({"Authorization": f"Bearer {key}"} if key else {})}
    body = _body(model, prompt, stream, max_tokens, endpoint.usage_in_stream)
    stamp, started = time.time(), time.perf_counter()
    status, ttft, tokens, prompt_tokens, itl, error = 0, None, 0, 0, [], ""
    try:
        if stream:
            async with client.stream("POST", endpoint.url + "/v1/chat/completions", json=body,
                                     headers=headers, extensions=endpoint.extensions) as response:
                status = response.status_code
                if status == 200:
                    read = await _read_stream(response, started)
                    tokens, prompt_tokens = read.tokens, read.prompt_tokens
                    if read.chunk_times:
                        ttft = read.chunk_times[0]
                        itl = [b - a for a, b in zip(read.chunk_times, read.chunk_times[1:])]
                    if read.error:
                        error = f"StreamError: {read.error}"[:200]
                    elif not read.complete:
                        error = "IncompleteStream: the stream ended before data: [DONE]"
                else:
                    await response.aread()
        else:
            response = await client.post(endpoint.url + "/v1/chat/completions", json=body,
                                         headers=headers, extensions=endpoint.extensions)
            status = response.status_code
            if status == 200:
                answer = response.json()
                tokens = completion_tokens(answer)
                prompt_tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
    except (httpx.HTTPError, ValueError) as failure:
        error = f"{type(failure).__name__}: {failure}"[:200]
    if status and status != 200 and not error:
        error = f"HTTP {status}"
    return ls.Record(timestamp=stamp, endpoint=endpoint.name, model=model, status=status,
                     latency_s=time.perf_counter() - started, ttft_s=ttft, tokens=tokens,
                     scenario=scenario, error=error, prompt_tokens=prompt_tokens, itl_s=itl)


async def run_load(endpoints: list[Endpoint], key: str | None, requests: int, concurrency: int,
                   max_seconds: float, stream: bool = True, max_tokens: int = 32,
                   request_timeout: float = 60.0, scenario: str = "load",
                   until: Callable[[], bool] | None = None,
                   prompts: list[Prompt] | None = None, request_rate: float | None = None,
                   burstiness: float = 1.0, seed: int | None = 0,
                   verify: ssl.SSLContext | bool = True) -> list[ls.Record]:
    """Send at most `requests` requests, round-robin over endpoints and their models and over
    `prompts` (default: one short prompt). Closed loop (no `request_rate`): `concurrency` in
    flight, the next as soon as one ends. Open loop: request i leaves at arrival_offsets(...)[i],
    whatever the others do, with at most `concurrency` in flight (vLLM's --max-concurrency). No
    new request after `max_seconds`, nor once `until()` is true. Bounded: at most max_seconds +
    request_timeout of wall time."""
    if not endpoints:
        return []
    prompts = prompts or [Prompt(PROMPT)]
    records: list[ls.Record] = []
    issued = 0
    begun = time.monotonic()
    stop_at = begun + max_seconds
    offsets = arrival_offsets(requests, request_rate, burstiness, seed) if request_rate else None
    timeout = httpx.Timeout(request_timeout, connect=min(10.0, request_timeout))
    limits = httpx.Limits(max_connections=concurrency * 2)

    def more() -> bool:
        return issued < requests and time.monotonic() < stop_at and not (until and until())

    async with httpx.AsyncClient(timeout=timeout, limits=limits, verify=verify) as client:
        def request(index: int):
            endpoint = endpoints[index % len(endpoints)]
            model = endpoint.models[(index // len(endpoints)) % len(endpoint.models)]
            return one_request(client, endpoint, model, key, stream, max_tokens, scenario,
                               prompts[index % len(prompts)])

        async def worker():
            nonlocal issued
            while more():
                index = issued
                issued += 1
                records.append(await request(index))

        async def open_loop():
            nonlocal issued
            in_flight = asyncio.Semaphore(max(1, concurrency))
            tasks = []

            async def send(index: int):
                async with in_flight:
                    records.append(await request(index))

            while more():
                wait = begun + offsets[issued] - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(min(wait, max(0.0, stop_at - time.monotonic())))
                    continue  # checked again: the time limit or `until` may have come first
                tasks.append(asyncio.create_task(send(issued)))
                issued += 1
            await asyncio.gather(*tasks)

        runners = [open_loop()] if offsets else [worker() for _ in range(max(1, concurrency))]
        try:
            await asyncio.wait_for(asyncio.gather(*runners),
                                   timeout=max_seconds + request_timeout + 5)
        except asyncio.TimeoutError:
            pass  # the hard stop; requests cut short are not recorded
    return sorted(records, key=lambda r: r.timestamp)
