"""The load a drill runs under: streamed and non-streamed chat completions, a few of each kind
always in flight, through the gateways, in a thread of its own until the drill stops it.

A request that cannot connect to one gateway is sent to the next (at most once to each), as a
site's load balancer in front of the gateways does: it never reached a gateway, so nothing is
sent twice. Every other failure is the user's: it is recorded, never retried here.

    load = BackgroundLoad(entries, key, verify).start()
    ...  # the fault
    requests = load.stop()
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, replace

import httpx

from scripts import loadstats as ls
from scripts.loadclient import Endpoint, one_request

# What a connection that never reached a gateway looks like in a record (httpx's names).
CONNECT_FAILURES = ("ConnectError", "ConnectTimeout")


@dataclass(frozen=True)
class DrillRequest:
    record: ls.Record
    stream: bool
    failovers: int = 0  # gateways that refused the connection before one took it

    @property
    def started(self) -> float:
        return self.record.timestamp

    @property
    def ended(self) -> float:
        return self.record.timestamp + self.record.latency_s

    @property
    def ok(self) -> bool:
        return self.record.ok

    def in_flight_at(self, moment: float, until: float | None = None) -> bool:
        """In flight at `moment`, or at any time from `moment` to `until`."""
        return self.started <= (moment if until is None else until) and self.ended >= moment


def never_connected(record: ls.Record) -> bool:
    return record.status == 0 and record.error.startswith(CONNECT_FAILURES)


class BackgroundLoad:
    """`per_kind` streamed and `per_kind` non-streamed requests in flight at all times (closed
    loop), round-robin over `entries` (gateway endpoints), until stop() or `max_seconds`.
    Bounded: no new request after `max_seconds`, none waits longer than `request_timeout`."""

    def __init__(self, entries: list[Endpoint], key: str | None,
                 verify: ssl.SSLContext | bool = True, per_kind: int = 2, max_tokens: int = 16,
                 request_timeout: float = 60.0, max_seconds: float = 900.0):
        if not entries:
            raise ValueError("no gateway to send the load to")
        self.entries, self.key, self.verify = entries, key, verify
        self.per_kind, self.max_tokens = per_kind, max_tokens
        self.request_timeout, self.max_seconds = request_timeout, max_seconds
        self.requests: list[DrillRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._turn = 0
        self.problem = ""

    def start(self) -> "BackgroundLoad":
        self._thread.start()
        return self

    def stop(self) -> list[DrillRequest]:
        """Stop sending; wait for the requests in flight (each bounded by request_timeout)."""
        self._stop.set()
        self._thread.join(self.request_timeout + 30)
        return sorted(self.requests, key=lambda r: r.started)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as error:  # reported with the drill, never silently lost
            self.problem = f"{type(error).__name__}: {error}"

    async def _main(self) -> None:
        timeout = httpx.Timeout(self.request_timeout, connect=min(5.0, self.request_timeout))
        deadline = time.monotonic() + self.max_seconds
        limits = httpx.Limits(max_connections=self.per_kind * 4)
        async with httpx.AsyncClient(timeout=timeout, verify=self.verify, limits=limits) as client:
            async def worker(stream: bool):
                while not self._stop.is_set() and time.monotonic() < deadline:
                    self.requests.append(await self._one(client, stream))

            await asyncio.gather(*[worker(stream) for stream in (True, False)
                                   for _ in range(self.per_kind)])

    async def _one(self, client: httpx.AsyncClient, stream: bool) -> DrillRequest:
        first = self._turn
        self._turn += 1
        started = None
        record = None
        for tried in range(len(self.entries)):
            entry = self.entries[(first + tried) % len(self.entries)]
            model = entry.models[first % len(entry.models)]
            got = await one_request(client, entry, model, self.key, stream, self.max_tokens,
                                    "stream" if stream else "plain")
            started = got.timestamp if started is None else started
            # The whole request, failovers included, is what the user waited for.
            record = replace(got, timestamp=started,
                             latency_s=got.timestamp + got.latency_s - started)
            if not never_connected(got):
                return DrillRequest(record, stream, tried)
        return DrillRequest(record, stream, len(self.entries) - 1)
