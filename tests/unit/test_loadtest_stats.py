"""The load test's statistics and reports on recorded data, and its client against a fake
streaming server on 127.0.0.1 (bounded count, TTFT, tokens, errors)."""

import asyncio
import csv
import json
import time

import pytest

from scripts import loadstats as ls
from scripts import loadtest as lt
from tests.unit.fake_openai import FakeOpenAI

KEY = "sk-load-test-secret"
T0 = 1_795_000_000.0


def rec(i, latency, status=200, ttft=0.05, tokens=10, scenario="load", error=""):
    return ls.Record(timestamp=T0 + i, endpoint="http://10.0.0.1:8080", model="tiny-llama",
                     status=status, latency_s=latency, ttft_s=ttft, tokens=tokens,
                     scenario=scenario, error=error)


# --- Percentiles and summary ----------------------------------------------------------------


@pytest.mark.parametrize("values, q, expected", [
    ([1, 2, 3, 4], 50, 2.5),
    ([1, 2, 3, 4], 0, 1),
    ([1, 2, 3, 4], 100, 4),
    ([15, 20, 35, 40, 50], 40, 29.0),  # h = 1.6: 20 + 0.6 * 15
    (list(range(1, 101)), 95, 95.05),
    (list(range(1, 101)), 99, 99.01),
    ([7], 99, 7),
])
def test_percentile_interpolates_between_closest_ranks(values, q, expected):
    assert ls.percentile(values, q) == pytest.approx(expected)
    assert ls.percentile(list(reversed(values)), q) == pytest.approx(expected)


def test_percentile_of_nothing_is_none_and_q_is_checked():
    assert ls.percentile([], 50) is None
    with pytest.raises(ValueError):
        ls.percentile([1], 101)


def test_summary_counts_throughput_over_wall_time_and_excludes_errors_from_latency():
    # 10 requests, one per second, each 0.5 s; the last one a 503 that took 30 s.
    records = [rec(i, 0.5, tokens=20) for i in range(9)] + [rec(9, 30.0, status=503, tokens=0,
                                                                 error="HTTP 503")]
    s = ls.summarize(records)
    assert (s["requests"], s["ok"], s["errors"]) == (10, 9, 1)
    assert s["error_kinds"] == {"HTTP 503": 1}
    assert s["error_first"] == {"HTTP 503": "at +9.0 s, http://10.0.0.1:8080: HTTP 503"}
    assert s["wall_s"] == pytest.approx(39.0)  # first start to the 503's end
    assert s["latency_s"]["p99"] == pytest.approx(0.5)  # the 30 s error is not a latency
    assert s["tokens_out"] == 180
    assert s["requests_per_s"] == pytest.approx(9 / 39.0)
    assert s["tokens_per_s"] == pytest.approx(180 / 39.0)


def test_summary_of_no_request():
    s = ls.summarize([])
    assert s["requests"] == 0 and s["requests_per_s"] == 0.0 and s["latency_s"]["p95"] is None


# --- docker stats ---------------------------------------------------------------------------


STATS = [
    '{"BlockIO":"0B / 0B","CPUPerc":"150.25%","Container":"a1","ID":"a1","MemPerc":"3.1%",'
    '"MemUsage":"512MiB / 15.5GiB","Name":"gpufleet_tiny-llama.1.x1","NetIO":"1.5kB / 2MB","PIDs":"9"}',
    '{"BlockIO":"0B / 0B","CPUPerc":"50.75%","Container":"a1","ID":"a1","MemPerc":"3.2%",'
    '"MemUsage":"1GiB / 15.5GiB","Name":"gpufleet_tiny-llama.1.x1","NetIO":"11.5kB / 3MB","PIDs":"9"}',
    '{"BlockIO":"0B / 0B","CPUPerc":"1.00%","Container":"b2","ID":"b2","MemPerc":"0.1%",'
    '"MemUsage":"20MiB / 15.5GiB","Name":"registry","NetIO":"0B / 0B","PIDs":"3"}',
]


def test_docker_stats_lines_become_samples():
    sample = ls.parse_stats_line(STATS[0])
    assert sample == {"container": "gpufleet_tiny-llama.1.x1", "cpu_pct": 150.25,
                      "mem_bytes": 512 * 1024**2, "net_rx_bytes": 1500.0,
                      "net_tx_bytes": 2e6}
    assert ls.parse_stats_line("not json") is None
    assert ls.parse_size("1.5GiB") == 1.5 * 1024**3 and ls.parse_size("0B") == 0


def test_container_usage_is_mean_cpu_peak_memory_and_io_delta_of_the_stack_only():
    samples = [{**ls.parse_stats_line(line), "node": "node-2", "t": i}
               for i, line in enumerate(STATS)]
    usage = ls.container_usage(samples, "gpufleet_")
    assert list(usage) == ["gpufleet_tiny-llama.1.x1"]
    u = usage["gpufleet_tiny-llama.1.x1"]
    assert u["cpu_pct"] == pytest.approx(100.5)
    assert u["mem_bytes"] == 1024**3
    assert (u["net_rx_bytes"], u["net_tx_bytes"]) == (10_000.0, 1e6)
    assert ls.usage_totals(usage)["cpu_pct"] == pytest.approx(100.5)


# --- Files ----------------------------------------------------------------------------------


def test_csv_is_appended_with_one_header_and_reads_back(tmp_path):
    path = tmp_path / "requests.csv"
    ls.append_csv(path, [rec(0, 0.25), rec(1, 0.5, ttft=None)])
    ls.append_csv(path, [rec(2, 1.0, status=0, error="ConnectError: refused")])
    rows = list(csv.reader(path.open()))
    assert rows[0] == ls.CSV_FIELDS
    assert len(rows) == 4 and rows[1][:7] == ["2026-11-18T11:06:40.000+00:00",
                                              "http://10.0.0.1:8080", "tiny-llama", "200",
                                              "0.2500", "0.0500", "10"]
    back = ls.read_csv(path)
    assert [r.latency_s for r in back] == [0.25, 0.5, 1.0]
    assert back[1].ttft_s is None and back[2].error.startswith("ConnectError")
    assert back[0].timestamp == pytest.approx(T0)


def test_reports_hold_the_numbers_and_the_charts_are_pngs(tmp_path):
    records = [rec(i, 0.1 * (i + 1), scenario="1 replica(s), gateway") for i in range(20)]
    records += [rec(20 + i, 0.05 * (i + 1), scenario="3 replica(s), gateway") for i in range(20)]
    scenarios = [{"name": name, "replicas": n, "path": "gateway", "endpoints": [],
                  "summary": ls.summarize([r for r in records if r.scenario == name]),
                  "usage_totals": {"cpu_pct": 123.4, "mem_bytes": 2 * 1024**3,
                                   "net_rx_bytes": 5000.0, "net_tx_bytes": 7000.0,
                                   "containers": 2, "samples": 8}}
                 for name, n in (("1 replica(s), gateway", 1), ("3 replica(s), gateway", 3))]
    written = ls.write_reports(tmp_path, records, {"requests": 20}, scenarios)
    for name in ("requests.csv", "summary.md", "summary.json", "latency_hist.png",
                 "latency_over_time.png"):
        assert (tmp_path / name).stat().st_size > 0
    for png in ("latency_hist.png", "latency_over_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    one = summary["summaries"]["1 replica(s), gateway"]
    assert one["latency_s"]["p50"] == pytest.approx(1.05)
    assert one["latency_s"]["p95"] == pytest.approx(1.905)
    markdown = (tmp_path / "summary.md").read_text()
    assert "| 1 replica(s), gateway | 20 | 0 | 1050.0 | 1905.0 | 1981.0 |" in markdown
    assert "| 1 replica(s), gateway | 1 | gateway | 123.4 | 2048.0 | 5.0 | 7.0 |" in markdown
    assert "![latency_hist](latency_hist.png)" in markdown
    assert set(written) >= {"csv", "markdown", "json", "latency_hist", "latency_over_time"}


# --- The client against a fake server -------------------------------------------------------


def test_streamed_load_measures_ttft_and_tokens_and_stops_at_the_count():
    with FakeOpenAI(key=KEY, tokens=5, token_delay_s=0.01) as server:
        endpoint = lt.Endpoint(server.url, ("tiny-llama",))
        records = asyncio.run(lt.run_load([endpoint], KEY, requests=12, concurrency=4,
                                          max_seconds=30))
        assert server.requests == 12
    assert len(records) == 12 and all(r.ok for r in records)
    assert all(r.tokens == 5 for r in records)
    assert all(0 < r.ttft_s < r.latency_s for r in records)


def test_non_streamed_load_counts_the_answers_tokens():
    # `--no-stream` (and the drills' plain requests) read the whole answer's usage.
    with FakeOpenAI(key=KEY, tokens=3) as server:
        records = asyncio.run(lt.run_load([lt.Endpoint(server.url, ("tiny-llama",))], KEY,
                                          requests=4, concurrency=2, max_seconds=30,
                                          stream=False))
    assert len(records) == 4 and all(r.ok for r in records), [r.error for r in records]
    assert all(r.tokens == 3 and r.ttft_s is None for r in records)


def test_load_stops_at_its_time_limit():
    with FakeOpenAI(key=KEY, tokens=2, token_delay_s=0.2) as server:
        started = time.monotonic()
        records = asyncio.run(lt.run_load([lt.Endpoint(server.url, ("tiny-llama",))], KEY,
                                          requests=10_000, concurrency=2, max_seconds=1.0))
        elapsed = time.monotonic() - started
    assert 0 < len(records) < 20
    assert elapsed < 5


def test_errors_are_recorded_not_raised():
    with FakeOpenAI(key=KEY, fail_every=3) as server:
        records = asyncio.run(lt.run_load([lt.Endpoint(server.url, ("tiny-llama",))], KEY,
                                          requests=9, concurrency=3, max_seconds=30))
        wrong_key = asyncio.run(lt.run_load([lt.Endpoint(server.url, ("tiny-llama",))], "sk-no",
                                            requests=2, concurrency=1, max_seconds=30,
                                            stream=False))
    assert sum(1 for r in records if r.status == 503) == 3
    assert ls.summarize(records)["error_kinds"] == {"HTTP 503": 3}
    assert {r.status for r in wrong_key} == {401}


def _inventory(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    engine_file = tmp_path / "engine-key"
    engine_file.write_text("ek-load-test-engine-key")
    engine_file.chmod(0o600)
    model = {"name": "tiny-llama", "repo_id": "lab/tiny", "revision": "c" * 40}
    inventory = tmp_path / "inv.py"
    inventory.write_text(f"gpu_nodes = [('node-1', {{'models': [{model!r}], "
                         f"'stack_api_key_file': {str(key_file)!r}, "
                         f"'stack_engine_key_file': {str(engine_file)!r}, 'monitoring_grafana': False}})]\n"
                         "swarm_managers = ['node-1']\n")
    return inventory


def test_the_cli_writes_every_report_against_a_url(tmp_path, capsys):
    inventory = _inventory(tmp_path)
    out = tmp_path / "out"
    with FakeOpenAI(key=KEY, tokens=3) as server:
        code = lt.run([str(inventory), "--requests", "24", "--concurrency", "4", "--out", str(out),
                       "--target", server.url])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 24 and {r["status"] for r in rows} == {"200"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summaries"]["load"]["tokens_out"] == 72
    assert (out / "latency_hist.png").exists() and (out / "latency_over_time.png").exists()
    everything = printed.out + printed.err + "".join(p.read_text(errors="ignore")
                                                     for p in out.iterdir() if p.suffix != ".png")
    assert KEY not in everything


def test_a_stream_cut_before_done_is_a_failed_request():
    with FakeOpenAI(key=KEY, tokens=3, cut_streams=True) as server:
        records = asyncio.run(lt.run_load([lt.Endpoint(server.url, ("tiny-llama",))], KEY,
                                          requests=3, concurrency=1, max_seconds=30))
    assert [r.status for r in records] == [200, 200, 200]
    assert not any(r.ok for r in records)
    assert ls.summarize(records)["error_kinds"] == {"IncompleteStream": 3}


def test_a_stream_that_carries_an_error_event_is_a_failed_request_even_with_done():
    # vLLM answers a request that fails after its 200 with `data: {"error": ...}`, then [DONE].
    with FakeOpenAI(key=KEY, tokens=3, error_streams=True) as server:
        records = asyncio.run(lt.run_load([lt.Endpoint(server.url, ("tiny-llama",))], KEY,
                                          requests=2, concurrency=1, max_seconds=30))
    assert [r.status for r in records] == [200, 200] and not any(r.ok for r in records)
    assert {r.error for r in records} == {"StreamError: engine shut down"}


# --- A command under load (--during) --------------------------------------------------------


def _during(tmp_path, server, command, *extra):
    out = tmp_path / "out"
    code = lt.run([str(_inventory(tmp_path)), "--requests", "100000", "--concurrency", "2",
                   "--out", str(out), "--target", server.url, "--during", command, *extra])
    return code, json.loads((out / "summary.json").read_text())["meta"], out


def test_the_load_runs_until_the_command_has_exited_and_settled(tmp_path, capsys):
    with FakeOpenAI(key=KEY, tokens=2, token_delay_s=0.01) as server:
        code, meta, out = _during(tmp_path, server, "sleep 1; echo rolled", "--settle", "0.5",
                                  "--max-seconds", "30")
    assert code == 0, capsys.readouterr().err
    assert meta["during_exit_code"] == 0 and meta["during_covered"] is True
    assert meta["failed_during"] == 0 and 1.0 <= meta["during_s"] < 10
    assert (out / "during.log").read_text().strip() == "rolled"
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) > 10  # a steady load, not a single request
    load = json.loads((out / "summary.json").read_text())["summaries"]["load"]
    assert load["wall_s"] >= 1.3  # the command's second, and most of the settle time after it


def test_failed_requests_during_the_command_fail_the_run(tmp_path, capsys):
    with FakeOpenAI(key=KEY, tokens=2, token_delay_s=0.01, fail_every=4) as server:
        code, meta, _ = _during(tmp_path, server, "sleep 0.5", "--settle", "0.2")
    assert code == 1
    assert meta["failed_during"] > 0
    assert "request(s) failed" in capsys.readouterr().err


def test_a_command_that_fails_fails_the_run(tmp_path, capsys):
    with FakeOpenAI(key=KEY, tokens=2) as server:
        code, meta, _ = _during(tmp_path, server, "exit 3", "--settle", "0.2")
    assert code == 1 and meta["during_exit_code"] == 3
    assert "--during exited 3" in capsys.readouterr().err


def test_a_load_that_stops_before_the_command_ends_says_so(tmp_path, capsys):
    with FakeOpenAI(key=KEY, tokens=2, token_delay_s=0.01) as server:
        code, meta, _ = _during(tmp_path, server, "sleep 3", "--max-seconds", "1")
    assert code == 1 and meta["during_covered"] is False
    assert "raise --max-seconds" in capsys.readouterr().err


def test_during_and_scenarios_are_refused_together(tmp_path):
    with pytest.raises(SystemExit) as refused:
        lt.parse_args([str(_inventory(tmp_path)), "--out", str(tmp_path), "--scenarios",
                       "--during", "true"])
    assert refused.value.code == 2


def test_the_report_gives_the_first_failure_of_each_kind_whole():
    # What a reader needs to find it in the gateway's log: when, where, and the whole message.
    cut = "RemoteProtocolError: peer closed connection without sending complete message body"
    records = [rec(0, 0.5), rec(4, 0.2, status=0, tokens=0, error=cut),
               rec(7, 0.2, status=0, tokens=0, error="RemoteProtocolError: later"),
               rec(9, 0.1, status=502, tokens=0)]
    s = ls.summarize(records)
    assert s["error_kinds"] == {"HTTP 502": 1, "RemoteProtocolError": 2}
    assert s["error_first"]["RemoteProtocolError"] == f"at +4.0 s, http://10.0.0.1:8080: {cut}"
    from scripts.loadmetrics import field_metrics
    text = ls.markdown_report({"load": {**s, "metrics": field_metrics(records, {})}}, {})
    assert f"first RemoteProtocolError at +4.0 s, http://10.0.0.1:8080: {cut}" in text
    assert "later" not in text
