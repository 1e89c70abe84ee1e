"""Monitoring on the lab's serving fleet: every target Prometheus is given answers (engines: one
per replica), a load test moves the engine's and the gateway's counters by exactly the requests
it sent, every dashboard panel's query returns data, fleet_status.py shows the numbers, a stopped
model fires ModelNoHealthyReplica and an engine killed fires EngineRestarted, a simulated XID
and a hot GPU fire the GPU alerts (and reach a receiver configured as Slack, its URL a Docker
secret), and each clears after recovery.

Prometheus admits only the fleet: the queries run on the first manager (the way
scripts/fleet_status.py asks), through `docker exec` into the lab host.
"""

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from operations.monitoring_facts import _QUERY_SCRIPT, parse_answers
from operations.monitoring_render import dashboard_queries

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
ENGINE_SERVICE = "gpufleet_tiny-llama"
PROMETHEUS_PORT = 9090


def script(lab, name, *args, timeout=600):
    return subprocess.run([PYTHON, str(REPO / "scripts" / name), "inventories/lab.py", *args],
                          cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=timeout)


def manager(lab):
    return lab.hosts[0]


def docker_on(lab, node, command):
    container = next(h["container"] for h in lab.hosts if h["name"] == node)
    result = subprocess.run(["docker", "exec", container, "sh", "-c", command],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def query(lab, *queries):
    """Each query's samples, asked on the first manager (Prometheus' port admits the fleet only)."""
    command = (f"python3 -c {shlex.quote(_QUERY_SCRIPT)} {PROMETHEUS_PORT} "
               + " ".join(shlex.quote(q) for q in queries))
    answers = parse_answers(docker_on(lab, manager(lab)["name"], command).splitlines())
    assert answers["error"] is None, answers
    return answers["results"]


def total(lab, promql):
    samples = query(lab, promql)[0]
    return sum(float(s["value"][1]) for s in samples)


def settled(lab, promql, quiet_s=22):
    """The value of `promql` once two reads quiet_s apart (more than two scrapes) agree: what
    earlier traffic (the deploy's smoke tests) sent is counted before a test starts."""
    value = total(lab, promql)
    for _ in range(10):
        time.sleep(quiet_s)
        again = total(lab, promql)
        if again == value:
            return value
        value = again
    raise AssertionError(f"{promql} did not settle")


def wait_until(what, check, timeout_s=120, poll_s=2):
    """Poll `check` (returns a truthy result when done) up to timeout_s; the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not within {timeout_s}s"
            return value
        time.sleep(poll_s)


def firing(lab, alertname, **labels):
    matchers = "".join(f', {key}="{value}"' for key, value in labels.items())
    return query(lab, f'ALERTS{{alertname="{alertname}", alertstate="firing"{matchers}}}')[0]


@pytest.fixture(scope="module")
def monitored(lab):
    """The fleet deployed (every phase, monitoring last; tests/lab/test_run.py checks that a
    second run changes nothing, the monitoring phase included)."""
    result = lab.pyinfra("-y", "inventories/lab.py", "deploy.py")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return lab


def test_every_target_answers_and_each_engine_replica_is_scraped(monitored):
    nodes = [h["name"] for h in monitored.hosts]

    def scraped():
        samples = query(monitored, "up")[0]
        by_job = {}
        for s in samples:
            by_job.setdefault(s["metric"]["job"], []).append((s["metric"].get("node"), s["value"][1]))
        return by_job if all(v == "1" for job, rows in by_job.items() if job != "engine"
                             for _, v in rows) and "engine" in by_job else None

    by_job = wait_until("every target up", scraped, timeout_s=90)
    for job in ("node", "dcgm"):
        assert sorted(n for n, _ in by_job[job]) == nodes, by_job[job]
    assert [n for n, _ in by_job["gateway"]] == [manager(monitored)["name"]]
    assert by_job["prometheus"] and by_job["alertmanager"]
    # Engine targets are the nodes that may run the model: those running a replica answer.
    running = set(docker_on(monitored, manager(monitored)["name"],
                            f"docker service ps -f desired-state=running --format '{{{{.Node}}}}' "
                            f"{ENGINE_SERVICE}").split())
    assert {n for n, v in by_job["engine"] if v == "1"} == running and len(running) == 2
    # The GPU exporter reports each simulated GPU with dcgm-exporter's labels.
    gpus = query(monitored, 'DCGM_FI_DEV_GPU_TEMP{job="dcgm"}')[0]
    assert len(gpus) == 2 * len(nodes)
    assert {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"} <= set(gpus[0]["metric"])


def test_a_load_test_moves_the_engine_and_gateway_counters_by_the_requests_it_sent(monitored, tmp_path):
    engine = 'sum(vllm:request_success_total{job="engine"})'
    gateway = 'sum(haproxy_backend_http_requests_total{job="gateway", proxy="be_tiny_llama"})'
    tokens = 'sum(vllm:generation_tokens_total{job="engine"})'
    before = {q: settled(monitored, q) for q in (engine, gateway)}
    before[tokens] = total(monitored, tokens)
    result = script(monitored, "loadtest.py", "--requests", "12", "--concurrency", "3",
                    "--max-tokens", "4", "--out", str(tmp_path / "load"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "load" / "summary.json").read_text())["summaries"]["load"]
    sent = summary["requests"]
    assert sent == 12 and summary["errors"] == 0

    def moved():
        now = {q: total(monitored, q) for q in (engine, gateway)}
        return now if all(now[q] - before[q] >= sent for q in now) else None

    now = wait_until("the counters moved", moved, timeout_s=60)
    assert now[engine] - before[engine] == sent
    assert now[gateway] - before[gateway] == sent
    assert total(monitored, tokens) - before[tokens] >= sent


def test_every_dashboard_panel_returns_data(monitored):
    queries = dashboard_queries()
    answers = query(monitored, *[expr for _, _, expr in queries])
    empty = [f"{board}: {title}" for (board, title, _), samples in zip(queries, answers) if not samples]
    assert empty == [], empty


def test_fleet_status_shows_the_numbers(monitored):
    result = script(monitored, "fleet_status.py", "--json")
    assert result.returncode in (0, 2), result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert [row["node"] for row in report["nodes"]] == [h["name"] for h in monitored.hosts]
    assert all(row["gpus"] == 2 and row["up"] == 1 and row["gpu_temperature_max_c"] == 30
               for row in report["nodes"]), report["nodes"]
    (model,) = report["models"]
    assert model["model"] == "tiny-llama" and model["replicas_up"] == model["replicas"] == 2
    assert model["requests_per_s"] > 0 and model["p95_latency_s"] > 0  # the load test's
    table = script(monitored, "fleet_status.py")
    assert "tiny-llama" in table.stdout and "2/2" in table.stdout, table.stdout + table.stderr


def test_a_stopped_model_and_a_killed_engine_fire_their_alerts_and_clear(monitored):
    node = manager(monitored)["name"]
    docker_on(monitored, node, f"docker service scale --detach {ENGINE_SERVICE}=0")
    try:
        alert = wait_until("ModelNoHealthyReplica fires",
                           lambda: firing(monitored, "ModelNoHealthyReplica", model="tiny-llama"))
        assert alert[0]["metric"]["severity"] == "page"
    finally:
        docker_on(monitored, node, f"docker service scale --detach {ENGINE_SERVICE}=2")
    wait_until("ModelNoHealthyReplica clears",
               lambda: not firing(monitored, "ModelNoHealthyReplica"), timeout_s=180)
    # An engine process killed: Swarm starts a new task, a new process.
    where = docker_on(monitored, node, f"docker service ps -f desired-state=running "
                                       f"--format '{{{{.Node}}}}' {ENGINE_SERVICE}").split()[0]
    docker_on(monitored, where, "docker kill $(docker ps -q --filter "
                                f"label=com.docker.swarm.service.name={ENGINE_SERVICE})")
    restarted = wait_until("EngineRestarted fires", lambda: firing(monitored, "EngineRestarted"),
                           timeout_s=180)
    assert {s["metric"]["node"] for s in restarted} >= {where}
    assert script(monitored, "smoke.py", "--deadline", "120").returncode == 0


# A receiver for the test, on the first manager's loopback (where Alertmanager runs, on the
# node's own network): it appends every POST's body to a file. LAB: a stand-in for Slack.
SINK_PORT = 9199
SINK = f"""
import http.server, os
open("/tmp/alert-sink.pid", "w").write(str(os.getpid()))
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open("/tmp/alert-sink.jsonl", "ab") as out:
            out.write(body + b"\\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", {SINK_PORT}), Sink).serve_forever()
"""


def with_receiver(lab, tmp_path):
    """The lab's Alertmanager sends to the sink as to Slack: the URL in a 0600 file, then a
    deploy (the secret created, Alertmanager rolled onto it). Returns the URL."""
    url = f"http://127.0.0.1:{SINK_PORT}/services/T000/B000/lab-sink-secret"
    secret = tmp_path / "slack-url"
    secret.touch(mode=0o600)
    secret.write_text(url + "\n")
    node = manager(lab)["name"]
    container = next(h["container"] for h in lab.hosts if h["name"] == node)
    subprocess.run(["docker", "exec", "-d", container, "python3", "-c", SINK], check=True)
    edited = lab.cli("set", "all", "monitoring_alert_receiver=slack",
                     f"monitoring_alert_receiver_file={secret}")
    assert edited.returncode == 0, edited.stdout + edited.stderr
    deployed = lab.pyinfra("-y", "inventories/lab.py", "deploy.py")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert "lab-sink-secret" not in deployed.stdout + deployed.stderr
    config = docker_on(lab, node, "cat /etc/gpufleet/monitoring/alertmanager.yml")
    assert "api_url_file: \"/run/secrets/alert_receiver\"" in config and "lab-sink" not in config
    return url


def without_receiver(lab):
    edited = lab.cli("unset", "all", "monitoring_alert_receiver", "monitoring_alert_receiver_file")
    assert edited.returncode == 0, edited.stdout + edited.stderr
    deployed = lab.pyinfra("-y", "inventories/lab.py", "deploy.py")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    node = manager(lab)["name"]
    docker_on(lab, node, "kill $(cat /tmp/alert-sink.pid); rm -f /tmp/alert-sink.*")
    # The receiver's secret went with it.
    assert "alert_receiver" not in docker_on(lab, node, "docker secret ls --format '{{.Name}}'")


def test_a_simulated_xid_and_a_hot_gpu_fire_the_gpu_alerts_reach_the_receiver_and_clear(
        monitored, tmp_path):
    node = monitored.hosts[1]["name"]
    with_receiver(monitored, tmp_path)
    for fault in ("xid=79", "temperature=95"):
        result = monitored.cli("gpu-fault", node, "1", fault)
        assert result.returncode == 0, result.stdout + result.stderr
    try:
        xid = wait_until("GpuXidError fires", lambda: firing(monitored, "GpuXidError", node=node))
        assert [(s["metric"]["gpu"], s["value"][1]) for s in xid] == [("1", "1")]
        hot = wait_until("GpuTemperatureHigh fires",
                         lambda: firing(monitored, "GpuTemperatureHigh", node=node))
        assert hot[0]["metric"]["UUID"].startswith("GPU-")
        report = json.loads(script(monitored, "fleet_status.py", "--json").stdout)
        row = next(r for r in report["nodes"] if r["node"] == node)
        assert row["last_xid"] == 79 and row["gpu_temperature_max_c"] == 95
        assert {a["alert"] for a in report["alerts"]} >= {"GpuXidError", "GpuTemperatureHigh"}
        # Alertmanager sent it on (after its group_wait of 30 s), labelled, to the receiver.
        manager_node = manager(monitored)["name"]
        sent = wait_until("the alert reached the receiver", lambda: "GpuXidError" in docker_on(
            monitored, manager_node, "cat /tmp/alert-sink.jsonl 2>/dev/null || true"), timeout_s=120)
        assert sent
    finally:
        assert monitored.cli("gpu-fault", node, "1", "clear").returncode == 0
    wait_until("the GPU alerts clear", lambda: not firing(monitored, "GpuXidError")
               and not firing(monitored, "GpuTemperatureHigh"), timeout_s=120)
    without_receiver(monitored)
