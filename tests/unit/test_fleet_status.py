"""scripts/fleet_status.py: Prometheus' answers into per-node and per-model rows (pure), and
operations/monitoring_facts.py's parsing of them."""

import json

from operations.config import validate_host_data
from operations.inventory_data import load_group_data
from operations.monitoring_facts import parse_answers
from scripts import fleet_status


def sample(value, **labels):
    return {"metric": labels, "value": [1733490000.0, str(value)]}


def settings():
    return validate_host_data("gpu-01", {
        **load_group_data()["all"], "stack_api_key_file": "/k", "stack_engine_key_file": "/ek",
        "monitoring_grafana": False,
        "models": [{"name": "tiny-llama", "repo_id": "lab/tiny", "revision": "c" * 40, "replicas": 2},
                   {"name": "idle", "repo_id": "lab/idle", "revision": "d" * 40, "port": 8001}]})


def answers():
    found = {key: [] for key in [*fleet_status.node_queries(), *fleet_status.model_queries("5m"), "alerts"]}
    found["gpus"] = [sample(2, node="node-1"), sample(2, node="node-2")]
    found["gpu_util_percent"] = [sample(40, node="node-1"), sample(0, node="node-2")]
    found["gpu_memory_used_mib"] = [sample(1000, node="node-1")]
    found["gpu_memory_total_mib"] = [sample(163118, node="node-1")]
    found["gpu_temperature_max_c"] = [sample(92, node="node-2")]
    found["last_xid"] = [sample(79, node="node-2")]
    found["up"] = [sample(1, node="node-1"), sample(0, node="node-2")]
    found["replicas_up"] = [sample(2, model="tiny-llama")]
    found["requests_per_s"] = [sample(3.5, model="tiny-llama")]
    found["p95_latency_s"] = [sample("NaN", model="tiny-llama")]
    found["p95_ttft_s"] = [sample(0.12, model="tiny-llama")]
    found["errors_per_s"] = [sample(0.25, proxy="be_tiny_llama")]
    found["alerts"] = [sample(1, alertname="GpuXidError", severity="page", node="node-2", gpu="0",
                              alertstate="firing")]
    return found


def test_rows_per_node_and_per_model():
    report = fleet_status.summarise(settings(), answers())
    assert [row["node"] for row in report["nodes"]] == ["node-1", "node-2"]
    assert report["nodes"][1] == {"node": "node-2", "gpus": 2.0, "gpu_util_percent": 0.0,
                                  "gpu_temperature_max_c": 92.0, "last_xid": 79.0, "up": 0.0}
    tiny, idle = report["models"]
    assert tiny == {"model": "tiny-llama", "engine": "vllm", "replicas": 2, "replicas_up": 2,
                    "requests_per_s": 3.5, "p95_latency_s": None, "p95_ttft_s": 0.12,
                    "errors_per_s": 0.25}
    assert idle["replicas_up"] == 0 and idle["requests_per_s"] is None
    assert report["alerts"] == [{"alert": "GpuXidError", "severity": "page", "node": "node-2", "gpu": "0"}]
    json.dumps(report)


def test_the_tables_say_what_an_operator_looks_for():
    text = fleet_status.tables(fleet_status.summarise(settings(), answers()))
    assert "node-2" in text and " NO " in text and "92 C" in text
    assert "tiny-llama" in text and "2/2" in text and "0.120 s" in text
    assert "1 alert(s) firing:\n  GpuXidError (page): node=node-2, gpu=0" in text


def test_prometheus_answers_are_parsed_one_per_query():
    ok = json.dumps({"status": "success", "data": {"resultType": "vector", "result": [sample(1)]}})
    bad = json.dumps({"status": "error", "error": "connection refused"})
    assert parse_answers([ok, bad]) == {"error": None, "results": [[sample(1)], []]}
    assert parse_answers([bad, bad])["error"] == "connection refused"
    assert parse_answers(["Traceback (most recent call last):"])["error"].startswith("no answer")


def test_a_bad_window_is_refused_before_anything_connects(capsys):
    assert fleet_status.main(["inventories/none.py", "--window", "five"]) == 2
    assert "--window 'five'" in capsys.readouterr().err
