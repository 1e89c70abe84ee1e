"""The serving metrics (scripts/loadmetrics.py) on recorded token timings with known answers, the
open-loop arrivals and prompts (scripts/loadclient.py), and the gates, down to the load test's
exit status on a forced regression."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest

from scripts import loadclient as lc
from scripts import loadmetrics as lm
from scripts import loadstats as ls
from scripts import loadtest as lt
from tests.unit.fake_openai import FakeOpenAI
from tests.unit.test_loadtest_stats import KEY, T0, _inventory


def timed(i, ttft, itl, tokens, latency, ok=True, prompt_tokens=0):
    return ls.Record(timestamp=T0 + i, endpoint="http://x", model="m", status=200 if ok else 503,
                     latency_s=latency, ttft_s=ttft if ok else None, tokens=tokens if ok else 0,
                     error="" if ok else "HTTP 503", prompt_tokens=prompt_tokens, itl_s=itl)


# Three requests with known timings (seconds), and one that failed.
RUN = [
    timed(0, ttft=0.100, itl=[0.010, 0.020, 0.030], tokens=4, latency=0.160, prompt_tokens=20),
    timed(1, ttft=0.200, itl=[0.040], tokens=2, latency=0.240, prompt_tokens=20),
    timed(2, ttft=0.300, itl=[], tokens=1, latency=0.300, prompt_tokens=20),
    timed(3, ttft=None, itl=[], tokens=0, latency=1.0, ok=False),
]


def test_tpot_excludes_the_first_token_and_needs_two():
    assert lm.request_tpot(RUN[0]) == pytest.approx((0.160 - 0.100) / 3)
    assert lm.request_tpot(RUN[1]) == pytest.approx(0.040)
    assert lm.request_tpot(RUN[2]) is None  # one token: no TPOT (vLLM: 0 for goodput)


def test_field_metrics_on_known_timings():
    m = lm.field_metrics(RUN)
    assert (m["completed"], m["failed"]) == (3, 1)
    # Duration: first start (T0) to the last end (T0 + 3 + 1.0).
    assert m["duration_s"] == pytest.approx(4.0)
    assert m["request_throughput"] == pytest.approx(3 / 4.0)
    assert m["output_throughput"] == pytest.approx(7 / 4.0)
    assert m["total_token_throughput"] == pytest.approx((7 + 60) / 4.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p90"] == pytest.approx(280.0)  # h = 1.8: 200 + 0.8 x 100
    assert m["ttft_ms"]["p99"] == pytest.approx(298.0)
    # ITL pooled over requests: 10, 20, 30, 40 ms.
    assert m["itl_ms"]["mean"] == pytest.approx(25.0)
    assert m["itl_ms"]["median"] == pytest.approx(25.0)
    assert m["itl_ms"]["p90"] == pytest.approx(37.0)  # h = 2.7: 30 + 0.7 x 10
    # TPOT over requests with 2+ tokens: 20 ms and 40 ms.
    assert m["tpot_ms"]["mean"] == pytest.approx(30.0)
    assert m["tpot_ms"]["p99"] == pytest.approx(39.8)
    assert m["e2el_ms"]["median"] == pytest.approx(240.0)
    assert m["output_tokens_per_s"]["mean"] == pytest.approx((4 / 0.16 + 2 / 0.24 + 1 / 0.3) / 3)
    assert "good" not in m


def test_goodput_counts_requests_meeting_every_slo_and_failures_miss_them():
    m = lm.field_metrics(RUN, lm.parse_slo("ttft=250ms,tpot=25ms"))
    # Request 0 (TTFT 100 ms, TPOT 20 ms) is good; 1 misses TPOT (40 ms); 2 misses TTFT (300
    # ms; its TPOT counts as 0); 3 failed.
    assert m["good"] == 1
    assert m["goodput_share"] == pytest.approx(0.25)
    assert m["request_goodput"] == pytest.approx(1 / 4.0)
    assert m["slo_ms"] == {"ttft": 250.0, "tpot": 25.0}
    assert lm.field_metrics(RUN, {"e2el": 0.25})["good"] == 2


def test_a_csv_round_trip_keeps_the_token_timings(tmp_path):
    ls.append_csv(tmp_path / "r.csv", RUN)
    back = ls.read_csv(tmp_path / "r.csv")
    assert [len(r.itl_s) for r in back] == [3, 1, 0, 0]
    assert [g for r in back for g in r.itl_s] == pytest.approx([g for r in RUN for g in r.itl_s])
    assert [r.prompt_tokens for r in back] == [20, 20, 20, 0]
    assert lm.field_metrics(back)["itl_ms"]["p90"] == pytest.approx(37.0)


@pytest.mark.parametrize("text, expected", [
    ("500ms", 0.5), ("1.5s", 1.5), ("250", 0.25), (" 20ms ", 0.02)])
def test_durations_read_as_vllm_reads_them(text, expected):
    assert lm.parse_duration_s(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["ttft", "latency=1s", "ttft=fast", ""])
def test_bad_slos_are_refused(text):
    with pytest.raises(ValueError):
        lm.parse_slo(text)


def test_gates_read_units_and_say_what_failed():
    m = lm.field_metrics(RUN, {"ttft": 0.25})
    assert lm.parse_gate("ttft_p99<=800ms") == lm.Gate("ttft_p99", "<=", 800.0)
    assert lm.parse_gate("e2el_median<=1.5s").limit == pytest.approx(1500.0)
    assert lm.parse_gate("goodput_share>=95%").limit == pytest.approx(0.95)
    assert lm.parse_gate("output_throughput>=1.5").limit == pytest.approx(1.5)
    gates = [lm.parse_gate(g) for g in ("ttft_p99<=800ms", "goodput_share>=95%", "failed<=0")]
    # TTFT within 250 ms: requests 0 and 1 of the 4.
    assert lm.gate_failures(m, gates) == ["gate goodput_share>=0.95 failed: goodput_share = 0.5",
                                          "gate failed<=0 failed: failed = 1"]
    with pytest.raises(ValueError, match="unknown metric 'ttft_p95'"):
        lm.parse_gate("ttft_p95<=1s")
    with pytest.raises(ValueError):
        lm.parse_gate("ttft_p99 < 1s")


def test_a_regression_against_a_baseline_fails_its_gates():
    baseline = lm.field_metrics(RUN[:3], {"ttft": 0.25})
    same = lm.gate_failures(baseline, lm.baseline_gates(baseline, 0.10))
    assert same == []
    slower = [timed(i, r.ttft_s * 2, [g * 2 for g in r.itl_s], r.tokens, r.latency_s * 2,
                    prompt_tokens=20) for i, r in enumerate(RUN[:3])]
    failures = lm.gate_failures(lm.field_metrics(slower, {"ttft": 0.25}),
                                lm.baseline_gates(baseline, 0.10))
    failed = {line.split()[1].split("<")[0].split(">")[0] for line in failures}
    assert {"ttft_p99", "tpot_p99", "itl_p99", "e2el_p99", "goodput_share"} <= failed


# --- Arrivals and prompts -------------------------------------------------------------------


def test_poisson_arrivals_have_the_rate_and_burstiness_shapes_them():
    offsets = lc.arrival_offsets(20000, rate=4.0, burstiness=1.0, seed=7)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    # Gamma(k): coefficient of variation 1/sqrt(k): 1 for Poisson, 0.5 for burstiness 4.
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    even = lc.arrival_offsets(20000, rate=4.0, burstiness=4.0, seed=7)
    even_gaps = [b - a for a, b in zip(even, even[1:])]
    assert statistics.pstdev(even_gaps) / statistics.fmean(even_gaps) == pytest.approx(0.5, rel=0.05)
    assert lc.arrival_offsets(5, 2.0, seed=1) == lc.arrival_offsets(5, 2.0, seed=1)


def test_prompts_from_a_dataset_file_or_of_a_length(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hello", "output_tokens": 8}\n\n{"prompt": "World"}\n')
    assert lc.load_prompts(path) == [lc.Prompt("Hello", 8), lc.Prompt("World", None)]
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        lc.load_prompts(path)
    assert len(lc.synthetic_prompt(64).text.split()) == 64


def test_open_loop_load_keeps_its_rate_and_records_every_gap():
    rate, count = 20.0, 30
    with FakeOpenAI(key=KEY, tokens=4, token_delay_s=0.01) as server:
        started = time.monotonic()
        records = asyncio.run(lt.run_load([lt.Endpoint(server.url, ("tiny-llama",))], KEY,
                                          requests=count, concurrency=16, max_seconds=30,
                                          request_rate=rate, seed=3))
        elapsed = time.monotonic() - started
    assert len(records) == count and all(r.ok for r in records)
    planned = lc.arrival_offsets(count, rate, seed=3)[-1]
    assert elapsed >= planned  # the last request left at its planned time, not before
    assert all(len(r.itl_s) == 3 for r in records)  # 4 content chunks: 3 gaps each
    assert all(0.005 <= gap <= 1.0 for r in records for gap in r.itl_s)


# --- The command line -----------------------------------------------------------------------


def _run(tmp_path, server, out, *extra):
    return lt.run([str(_inventory(tmp_path)), "--requests", "12", "--concurrency", "3",
                   "--out", str(out), "--target", server.url, *extra])


def test_the_report_carries_every_metric_and_the_new_charts(tmp_path, capsys):
    out = tmp_path / "out"
    with FakeOpenAI(key=KEY, tokens=4, token_delay_s=0.005) as server:
        code = _run(tmp_path, server, out, "--slo", "ttft=2s,tpot=1s", "--input-tokens", "32")
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "summary.json").read_text())["summaries"]["load"]["metrics"]
    for name in lm.metric_names():
        assert lm.metric_value(metrics, name) is not None, name
    assert metrics["goodput_share"] == 1.0
    for chart in ("ttft_hist", "itl_hist", "throughput_over_time"):
        assert (out / f"{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "summary.md").read_text()
    assert "## Serving metrics" in markdown and "TPOT ms" in markdown


def test_a_forced_regression_fails_the_gates_with_exit_3(tmp_path, capsys):
    with FakeOpenAI(key=KEY, tokens=4, token_delay_s=0.002) as fast:
        assert _run(tmp_path, fast, tmp_path / "before") == 0
    baseline = tmp_path / "before" / "summary.json"
    with FakeOpenAI(key=KEY, tokens=4, token_delay_s=0.06) as slow:  # every token 30x slower
        code = _run(tmp_path, slow, tmp_path / "after", "--baseline", str(baseline),
                    "--tolerance", "50%", "--gate", "ttft_p99<=10s")
    err = capsys.readouterr().err
    assert code == lt.EXIT_GATE == 3, err
    assert "loadtest: gate itl_p99<=" in err and "loadtest: gate ttft_p99<=10000 failed" not in err
    gates = json.loads((tmp_path / "after" / "summary.json").read_text())["gates"]
    assert gates and all(line.startswith("gate ") for line in gates)
    assert "FAILED: gate" in (tmp_path / "after" / "summary.md").read_text()


def test_bad_load_shapes_are_refused(tmp_path):
    inventory = str(_inventory(tmp_path))
    for extra in (["--request-rate", "0"], ["--burstiness", "-1"], ["--slo", "latency=1s"],
                  ["--gate", "ttft_p95<=1s"], ["--dataset", str(tmp_path / "none.jsonl")],
                  ["--baseline", str(tmp_path / "none.json")]):
        with pytest.raises(SystemExit) as refused:
            lt.parse_args([inventory, "--out", str(tmp_path), *extra])
        assert refused.value.code == 2, extra
