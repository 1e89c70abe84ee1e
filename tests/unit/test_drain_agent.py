"""The drain agent (operations/drain_agent.py): its parsing, then the real program with a fake
engine as its child: the gateway's answer turns to "drain" at SIGTERM, the engine is stopped
only once its /metrics count nothing in flight (or at the deadline), and its status is the
agent's."""

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from operations import drain_agent

AGENT = Path(drain_agent.__file__)

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_running_total_bogus 7
"""


def test_in_flight_is_running_plus_waiting_and_none_without_the_gauges():
    assert drain_agent.in_flight(VLLM_METRICS) == 3
    assert drain_agent.in_flight("vllm:num_requests_running 0\n") == 0
    assert drain_agent.in_flight("# HELP nothing\nhttp_requests_total 5\n") is None


def test_the_agent_answers_ready_then_drain_as_haproxy_reads_it():
    assert drain_agent.agent_reply(False) == b"ready\n"
    assert drain_agent.agent_reply(True) == b"drain\n"


# A fake engine: /metrics says the count in COUNT_FILE; SIGTERM is written to MARK_FILE.
FAKE_ENGINE = textwrap.dedent("""\
    import http.server, pathlib, signal, sys
    count, mark, port, status = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    def stop(*_):
        mark.write_text("SIGTERM")
        sys.exit(status)
    signal.signal(signal.SIGTERM, stop)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"vllm:num_requests_running{{model_name=\\"m\\"}} {count.read_text()}\\n".encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(port, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                return conn.recv(64)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def engine(tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(FAKE_ENGINE)
    count, mark = tmp_path / "count", tmp_path / "mark"
    count.write_text("2")
    started = []

    def start(deadline=30.0, status=0, exit_after=None):
        agent_port, engine_port = free_port(), free_port()
        command = [sys.executable, str(script), str(count), str(mark), str(engine_port), str(status)]
        if exit_after is not None:  # an engine that dies on its own
            command = [sys.executable, "-c", f"import time, sys; time.sleep({exit_after}); sys.exit({status})"]
        proc = subprocess.Popen([sys.executable, str(AGENT), "--agent-port", str(agent_port),
                                 "--engine-port", str(engine_port), "--notice", "0.3",
                                 "--deadline", str(deadline), "--", *command],
                                stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc, agent_port

    yield start, count, mark
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_stop_drains_then_stops_the_engine_once_nothing_is_in_flight(engine):
    start, count, mark = engine
    proc, agent_port = start(status=0)
    assert ask(agent_port) == b"ready\n"
    time.sleep(0.5)  # the fake engine listens
    proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: ask(agent_port) == b"drain\n", timeout=3)
    time.sleep(1.5)  # two requests still in flight: the engine is left alone
    assert not mark.exists() and proc.poll() is None
    count.write_text("0")
    assert proc.wait(timeout=10) == 0
    assert mark.read_text() == "SIGTERM"
    log = proc.stderr.read()
    assert "2 request(s) in flight" in log and "drained in" in log


def test_at_the_deadline_the_engine_is_stopped_with_requests_in_flight(engine):
    start, count, mark = engine
    proc, agent_port = start(deadline=1.5, status=0)
    ask(agent_port)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert mark.read_text() == "SIGTERM"
    assert "deadline of 1.5s reached with 2 request(s) in flight" in proc.stderr.read()


def test_an_engine_that_exits_on_its_own_takes_the_agent_with_it_and_its_status(engine):
    start, _, mark = engine
    proc, agent_port = start(status=3, exit_after=0.5)
    assert ask(agent_port) == b"ready\n"
    assert proc.wait(timeout=10) == 3
    assert not mark.exists()
