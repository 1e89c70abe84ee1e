"""The drain agent: an engine task's PID 1, so that a replica Swarm stops (a rolling update, a
node drained) finishes the requests it has before the engine sees SIGTERM.

vLLM 0.11 aborts the requests in flight at SIGTERM (vllm-project/vllm#34730 says so; its
`--shutdown-timeout` came later). So the stop is taken in hand here, in three steps:
1. SIGTERM (Swarm's stop) reaches this program, not the engine. It answers the gateway's agent
   check (HAProxy `agent-check`, every `agent-inter`) with "drain" from then on: HAProxy sets the
   server's weight to 0 and sends it no new request, while the ones it has go on.
2. It waits for every gateway to have asked once (--notice), then until the engine's own
   /metrics count no request running or waiting (vllm:num_requests_running and
   vllm:num_requests_waiting), twice in a row, or until --deadline (under the service's
   stop_grace_period, after which Docker kills).
3. Then it sends the engine SIGTERM, waits for it, and exits with its status.
Until then it answers "ready", which also lifts a drain the task before it left on this node.
If the engine exits on its own, so does this program, with its status.

Shipped into the engine's container as a Swarm config by the stack phase (operations/stack.py)
and run with the image's own python3: standard library only, never imported by the deploy
except for its pure functions under test.

    python3 drain_agent.py --agent-port 18000 --engine-port 8000 --notice 3 --deadline 295 \\
        -- vllm serve /models/m --port 8000 ...
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

# vLLM's gauges of the requests it holds (vllm/v1/metrics/loggers.py): one series per model.
_IN_FLIGHT = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+(\S+)\s*$",
                        re.M)


def in_flight(metrics_text: str) -> int | None:
    """Requests running or waiting in the engine, from its Prometheus text; None when the
    text has neither gauge (not an engine this agent can drain by)."""
    values = _IN_FLIGHT.findall(metrics_text)
    if not values:
        return None
    return int(sum(float(v) for v in values))


def agent_reply(draining: bool) -> bytes:
    """HAProxy's agent-check protocol: one line of words; "ready" lifts a drain (or a
    maintenance) set earlier, "drain" sets the weight to 0 while the server stays up."""
    return b"drain\n" if draining else b"ready\n"


def say(message: str) -> None:
    print(f"gpufleet drain agent: {message}", file=sys.stderr, flush=True)


class Agent:
    """The agent-check listener: each connection gets the state as one line, then is closed."""

    def __init__(self, port: int):
        self.draining = False
        self.sock = socket.create_server(("0.0.0.0", port), reuse_port=False)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(agent_reply(self.draining))
                except OSError:
                    pass


def engine_in_flight(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
            return in_flight(response.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None


def drain(child: subprocess.Popen, agent: Agent, engine_port: int, notice_s: float,
          deadline_s: float) -> None:
    """Steps 1 and 2 of the module doc: returns when the engine may be stopped."""
    started = time.monotonic()
    agent.draining = True
    say(f"stop asked: the gateway gets 'drain', waiting {notice_s:g}s for it to see so")
    time.sleep(notice_s)
    quiet, last = 0, None
    while time.monotonic() - started < deadline_s and child.poll() is None:
        count = engine_in_flight(engine_port)
        if count is None:
            say("the engine's /metrics do not say what it holds: stopping it now")
            return
        if count != last:
            say(f"{count} request(s) in flight")
            last = count
        quiet = quiet + 1 if count == 0 else 0
        if quiet >= 2:
            say(f"drained in {time.monotonic() - started:.1f}s")
            return
        time.sleep(0.5)
    if child.poll() is None:
        say(f"deadline of {deadline_s:g}s reached with {last} request(s) in flight: stopping")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="drain_agent.py")
    parser.add_argument("--agent-port", type=int, required=True)
    parser.add_argument("--engine-port", type=int, required=True)
    parser.add_argument("--notice", type=float, required=True)
    parser.add_argument("--deadline", type=float, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no engine command after --")

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent = Agent(args.agent_port)
    child = subprocess.Popen(command)
    threading.Thread(target=agent.serve, daemon=True).start()
    while child.poll() is None and not stop.wait(0.5):
        pass
    if child.poll() is None:
        drain(child, agent, args.engine_port, args.notice, args.deadline)
        child.send_signal(signal.SIGTERM)
    status = child.wait()
    agent.sock.close()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
