"""The drills' judgement and report (scripts/drill/verdict.py, report.py), their load against a
fake OpenAI server (failover to the next gateway only when a connection is refused), and the
pyinfra --json and gateway log reading they rely on."""

import json
import socket
import time

from scripts.drill import report, verdict as v
from scripts.drill.lab import changed_operations, parse_docker_time
from scripts.drill.load import BackgroundLoad, DrillRequest
from scripts.loadclient import Endpoint
from scripts.loadstats import Record
from tests.unit.fake_openai import FakeOpenAI

T = 1_800_000_000.0
KEY = "sk-drill-test"


def req(start, length, stream=True, error="", status=200, failovers=0):
    record = Record(timestamp=T + start, endpoint="gw", model="m", status=status,
                    latency_s=length, ttft_s=None, tokens=1, error=error)
    return DrillRequest(record, stream, failovers)


CUT = "RemoteProtocolError: incomplete chunked read"


def test_a_fault_may_cost_only_what_was_in_flight_when_it_struck():
    requests = [req(0.0, 1.0), req(0.5, 1.0, error=CUT), req(2.0, 0.1, error=CUT), req(3.0, 0.2)]
    judged = v.judge(requests, T + 1.0, v.Allowance())
    assert judged["sent"] == 4 and judged["failed"] == 2
    assert judged["in_flight_at_fault"] == 2  # the first two overlap the instant
    assert judged["failed_in_flight"] == 1 and judged["failed_beyond_target"] == 1
    assert judged["failures"][1].startswith("stream started +1.0s")
    assert judged["beyond_target_s"] == [1.0, 1.1]
    assert v.judge(requests[:1], T + 1.0, v.Allowance())["beyond_target_s"] is None


def test_the_fault_window_widens_what_was_in_flight():
    # The kill was sent at +0 and had struck by +0.6: a request that started at +0.4 was hit.
    late = req(0.4, 0.1, error=CUT)
    assert v.judge([late], T, v.Allowance())["failed_beyond_target"] == 1
    assert v.judge([late], T, v.Allowance(), struck_by=T + 0.6)["failed_beyond_target"] == 0


def test_a_killed_engine_may_cut_streams_but_never_a_plain_request():
    plain = req(0.0, 1.0, stream=False, error="HTTP 502", status=502)
    stream = req(0.0, 1.0, error=CUT)
    judged = v.judge([plain, stream], T + 0.5, v.Allowance(streams_only=True))
    assert judged["failed_in_flight"] == 1 and judged["failed_beyond_target"] == 1


def test_drills_outside_the_serving_path_may_cost_nothing():
    assert v.judge([req(0.0, 1.0, error=CUT)], T + 0.5, v.NONE)["failed_beyond_target"] == 1


def test_the_gateways_mark_down_and_what_it_sent_afterwards_are_read_from_its_log():
    events = [
        (T + 1.0, "[WARNING]  (8) : Server be_m/node-3 is DOWN, reason: Layer7 timeout"),
        (T + 6.9, "[WARNING]  (8) : Server be_m/node-2 is DOWN, reason: Layer7 timeout, check "
                  "duration: 2000ms. 1 active and 0 backup servers left. 2 sessions active"),
        (T + 7.0, "Server be_m/node-2 is DOWN, reason: Layer7 timeout"),
        (T + 8.0, "172.29.1.1:4242 [15/Jan/2027:08:00:07.500] openai be_m/node-2 0/0/0/-1/6154 "
                  "502 209 - - DH-- 4/4/3/2/0 0/0 \"POST /v1/chat/completions HTTP/1.1\""),
        (T + 9.0, "172.29.1.1:4243 [15/Jan/2027:08:00:08.000] openai pin_m_1/node-2 0/0/0/1/1 "
                  "200 9 - - ---- 4/4/3/2/0 0/0 \"GET /health HTTP/1.1\""),
    ]
    assert v.marked_down(events, "node-2", T) == T + 6.9
    assert v.marked_down(events, "node-2", T + 7.5) is None
    # HAProxy's accept dates: T is 15/Jan/2027:08:00:00 UTC. A pinned request is not counted.
    assert v.requests_sent_to(events, "node-2", T + 7.0, T + 20) == 1
    assert v.requests_sent_to(events, "node-2", T + 7.6, T + 20) == 0


def test_a_hung_engines_requests_must_end_soon_after_it_is_marked_down():
    stuck = req(0.0, 7.2, error="RemoteProtocolError: Server disconnected")
    fine = v.hung_verdict([stuck, req(6.0, 2.0)], T + 7.0, sent_after_down=0)
    assert fine["ok"] and fine["in_flight_at_down"] == 2 and fine["ended_within_s"] == 1.0
    slow = v.hung_verdict([req(0.0, 30.0, error="ReadTimeout")], T + 7.0, 0)
    assert not slow["ok"] and "23.0 s later" in slow["why"]
    assert not v.hung_verdict([], T + 7.0, sent_after_down=2)["ok"]
    assert v.hung_verdict([], None, 0) == {"marked_down": False, "ok": False,
                                            "why": "the gateway never marked it down"}


def result(**over):
    base = {"drill": "engine-killed", "fault": "f", "target": "t", "detail": "d",
            "requests": v.judge([req(0.0, 1.0)], T + 0.5, v.Allowance()), "recovered_s": 12.0,
            "next_run_exit": 0, "next_run_s": 5.0, "next_run_changes": [],
            "run_after_changes": [], "damaged_after_run": {}, "facts": {"node": "node-2"}}
    return {**base, **over}


def test_a_drill_passes_only_when_every_part_of_its_target_holds():
    assert report.passed(result())
    assert not report.passed(result(requests={**result()["requests"], "failed_beyond_target": 1}))
    assert not report.passed(result(recovered_s=None))
    assert not report.passed(result(next_run_exit=1))
    assert not report.passed(result(run_after_changes=["Model weights | Model m"]))
    assert not report.passed(result(damaged_after_fault={"node-2": ["m: config.json is missing"]}))
    assert not report.passed(result(check={"ok": False, "why": "never marked down"}))
    assert not report.passed(result(error="the load stopped"))
    assert not report.passed(result(requests=v.judge([], T, v.Allowance())))  # nothing was measured


def test_the_report_has_a_row_per_drill_and_the_json_every_measure(tmp_path):
    meta = {"when": "2027-01-15 08:00 UTC", "lab": "gpulab", "hosts": 3, "replicas": "m x2",
            "command": "--drill engine-killed", "load": "2+2", "seconds": 60}
    failed = result(drill="leader-lost", run_after_changes=["Docker Swarm | Swarm roles"])
    paths = report.write(tmp_path, [result(), failed], meta)
    markdown = paths[0].read_text()
    assert "| engine-killed | 1 | 0 | 1 | 0 | 12.0 | 0 | no change | intact | pass |" in markdown
    assert "| leader-lost | 1 | 0 | 1 | 0 | 12.0 | 0 | 1 | intact | FAIL |" in markdown
    assert "- node: node-2" in markdown
    data = json.loads(paths[1].read_text())
    assert data["passed"] == ["engine-killed"] and data["failed"] == ["leader-lost"]
    assert len(paths) == 2  # no timeline: no chart


def test_the_chart_draws_every_request_around_the_fault_and_stays_out_of_the_json(tmp_path):
    requests = [req(-1.0, 0.1), req(0.1, 0.2, error=CUT), req(2.0, 0.1)]
    drawn = result(timeline=report.timeline(requests, T, T + 0.5, T + 12.0))
    assert drawn["timeline"]["points"][1] == (0.1, 200.0, False)
    assert drawn["timeline"]["struck_s"] == 0.5 and drawn["timeline"]["healed_s"] == 12.0
    meta = {"when": "w", "lab": "l", "hosts": 3, "replicas": "m x2", "command": "", "load": "",
            "seconds": 1}
    md, js, png = report.write(tmp_path, [drawn], meta)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "![every request of every drill](drills.png)" in md.read_text()
    assert "timeline" not in json.loads(js.read_text())["drills"][0]


def test_pyinfras_json_names_changed_hosts_under_success():
    run = {"results": {"operations": [
        {"name": "Model weights | Model m", "success": ["node-2"], "no_change": ["node-1"]},
        {"name": "Preflight | Host is ready", "success": [], "no_change": ["node-1", "node-2"]}]}}
    assert changed_operations(run) == ["Model weights | Model m"]


def test_dockers_nanosecond_timestamps_are_read():
    assert parse_docker_time("2027-01-15T08:00:07.500000000Z") == T + 7.5
    assert parse_docker_time("2027-01-15T08:00:07Z") == T + 7.0


def run_for_a_while(load: BackgroundLoad, count: int = 8) -> list[DrillRequest]:
    """Let the load send `count` requests (at most 10 s), then stop it. time.sleep, not an event
    loop: the fixture harness's gevent patching makes the load's thread a greenlet of this one."""
    try:
        for _ in range(200):
            if len(load.requests) >= count:
                break
            time.sleep(0.05)
    finally:  # a load left running would hold its event loop past this test
        requests = load.stop()
    return requests


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_load_sends_both_kinds_and_fails_over_only_from_a_refused_connection():
    with FakeOpenAI(key=KEY, tokens=2) as server:
        dead = Endpoint(f"http://127.0.0.1:{_closed_port()}", ("tiny-llama",))
        live = Endpoint(server.url, ("tiny-llama",))
        load = BackgroundLoad([dead, live], KEY, per_kind=1, max_seconds=20).start()
        requests = run_for_a_while(load)
    assert load.problem == ""
    assert requests and all(r.ok for r in requests), [r.record.error for r in requests[:3]]
    assert {r.stream for r in requests} == {True, False}
    assert any(r.failovers == 1 for r in requests)  # the ones that tried the dead gateway first
    assert all(r.record.endpoint == server.url for r in requests)


def test_a_request_that_reached_a_gateway_is_never_sent_again():
    with FakeOpenAI(key=KEY, fail_every=2) as server:
        load = BackgroundLoad([Endpoint(server.url, ("tiny-llama",))], KEY, per_kind=1,
                              max_seconds=20).start()
        requests = run_for_a_while(load)
        sent = server.requests
    assert len(requests) == sent  # one request each, failures included
    assert any(not r.ok and r.record.status == 503 for r in requests)
