"""Monitoring as rendered (operations/monitoring_render.py) and planned (operations/monitoring.py):
targets from the fleet, rules from group data, the stack file, the gateway's exporter."""

import json

import pytest
import yaml

from operations import gateway, monitoring, monitoring_render as render, sizing
from operations.config import ConfigError, validate_host_data
from operations.inventory_data import load_group_data
from operations.stack_render import stack_problems

H100 = "NVIDIA H100 80GB HBM3"


def model(name="tiny-llama", **extra):
    return {"name": name, "repo_id": "lab/tiny", "revision": "c" * 40, **extra}


def settings(models=None, **overrides):
    data = {**load_group_data()["all"], "models": models or [model(replicas=2)],
            "stack_api_key_file": "/k", "stack_engine_key_file": "/ek",
            "monitoring_grafana_admin_password_file": "/gk", **overrides}
    return validate_host_data("gpu-01", data)


def node(name, addr, gpus=2, manager=False, active=True):
    return sizing.Node(name, gpus, H100, 81559, 64 << 30, addr=addr, manager=manager, active=active)


FLEET = [node("node-1", "10.0.0.11", manager=True), node("node-2", "10.0.0.12"),
         node("node-3", "10.0.0.13")]


def targets(s, nodes=FLEET):
    return {job: [(e["targets"][0], e["labels"]) for e in entries]
            for job, entries in render.scrape_targets(s, nodes).items()}


def test_targets_come_from_the_fleet():
    joined = sizing.Node.from_swarm({"hostname": "joined", "addr": "10.0.0.40", "role": "worker",
                                     "availability": "active", "state": "ready", "labels": {}})
    assert not joined.labelled  # joined with --limit: its labels (and targets) come with a full run
    found = targets(settings(), FLEET + [node("cpu-1", "10.0.0.20", gpus=0), joined,
                                         node("new", ""), node("drained", "10.0.0.30", active=False)])
    # Every node with an address and not drained has a node-exporter target; GPU nodes a dcgm one.
    assert [a for a, _ in found["node"]] == ["10.0.0.11:9100", "10.0.0.12:9100", "10.0.0.13:9100",
                                            "10.0.0.20:9100"]
    assert [a for a, _ in found["dcgm"]] == ["10.0.0.11:9400", "10.0.0.12:9400", "10.0.0.13:9400"]
    # The engine on every node that may run it, labelled for dashboards and alerts.
    assert found["engine"][0] == ("10.0.0.11:8000", {
        "node": "node-1", "replica": "node-1", "model": "tiny-llama",
        "served_model_name": "tiny-llama", "inference_engine": "vllm"})
    assert len(found["engine"]) == 3
    # The gateway's exporter on each manager only.
    assert found["gateway"] == [("10.0.0.11:8405", {"node": "node-1"})]


def test_ollama_has_no_metrics_endpoint_and_pieces_switched_off_have_no_targets():
    s = settings([model(replicas=1), model("small", engine="ollama", port=8001,
                                          gguf_file="small.gguf")],
                 monitoring_node_exporter=False, monitoring_dcgm_exporter=False)
    found = targets(s)
    assert set(found) == {"engine", "gateway"}
    assert {labels["model"] for _, labels in found["engine"]} == {"tiny-llama"}


def test_onboarding_a_node_changes_the_targets_and_nothing_else():
    s = settings()
    before = render.render_files(s, FLEET, "node-1")
    after = render.render_files(s, FLEET + [node("node-4", "10.0.0.14")], "node-1")
    changed = sorted(path for path in after if after[path] != before.get(path))
    assert changed == [f"{render.MONITORING_DIR}/targets/{job}.json"
                       for job in ("dcgm", "engine", "node")]
    secrets = {"grafana_admin": "gpufleet-monitoring_grafana_admin_0a1b2c3d4e5f"}
    assert render.render_stack(s, "node-1", secrets) == render.render_stack(s, "node-1", secrets)
    # The same fleet in another order renders the same bytes.
    assert render.render_files(s, list(reversed(FLEET)), "node-1") == before


def test_rules_carry_group_datas_thresholds_and_one_replica_rule_per_model():
    s = settings([model(replicas=2), model("big", port=8001, replicas=1)],
                 monitoring_alert_gpu_temperature_c=80, monitoring_alert_p95_ttft_s=2.5,
                 monitoring_alert_for_s=60, models_dir="/srv/models")
    text = render.render_rules(s)
    rules = {}
    for group in yaml.safe_load(text)["groups"]:
        for rule in group["rules"]:
            rules.setdefault(rule.get("alert") or rule.get("record"), []).append(rule)
    assert [r["labels"]["model"] for r in rules["ModelNoHealthyReplica"]] == ["tiny-llama", "big"]
    assert 'proxy="be_big"' in rules["ModelNoHealthyReplica"][1]["expr"]
    assert rules["ModelDegraded"][0]["expr"].endswith("< 2")
    assert rules["GpuTemperatureHigh"][0]["expr"] == 'DCGM_FI_DEV_GPU_TEMP{job="dcgm"} > 80'
    assert rules["ModelTimeToFirstTokenHigh"][0]["expr"].endswith("> 2.5")
    assert rules["GpuTemperatureHigh"][0]["for"] == "60s"
    # An XID pages at once; the models disk is the one holding models_dir or one above it.
    assert "for" not in rules["GpuXidError"][0]
    assert 'mountpoint=~"/|/srv|/srv/models"' in rules["gpufleet:models_disk_free:percent"][0]["expr"]
    assert "for" not in yaml.safe_load(render.render_rules(settings(monitoring_alert_for_s=0)))[
        "groups"][1]["rules"][0]


def test_the_issues_alerts_are_all_there():
    names = {name for name, _ in render.rule_expressions(render.render_rules(settings()))}
    assert {"ModelNoHealthyReplica", "EngineRestarted", "GpuXidError", "GpuTemperatureHigh",
            "GpuEccErrors", "NodeDown", "ModelLatencyHigh", "ModelTimeToFirstTokenHigh",
            "ModelsDiskFilling"} <= names


@pytest.mark.parametrize(("kind", "key"), [("webhook", "url_file"), ("slack", "api_url_file"),
                                           ("pagerduty", "routing_key_file")])
def test_the_receivers_secret_is_a_file_never_in_the_configuration(kind, key):
    s = settings(monitoring_alert_receiver=kind, monitoring_alert_receiver_file="/etc/receiver")
    files = render.render_files(s, FLEET, "node-1")
    config = yaml.safe_load(files[f"{render.MONITORING_DIR}/alertmanager.yml"])
    receiver = config["receivers"][0]
    assert config["route"]["receiver"] == receiver["name"] == kind
    assert receiver[f"{kind}_configs"][0][key] == "/run/secrets/alert_receiver"
    stack = yaml.safe_load(render.render_stack(s, "node-1", {
        "grafana_admin": "m_grafana_admin_1", "alert_receiver": "m_alert_receiver_2"}))
    assert stack["services"]["alertmanager"]["secrets"] == [
        {"source": "alert_receiver", "target": "alert_receiver", "uid": "65534", "gid": "65534",
         "mode": 0o400}]


def test_without_a_receiver_alerts_stay_in_alertmanager():
    config = yaml.safe_load(render.render_files(settings(), FLEET, "node-1")[
        f"{render.MONITORING_DIR}/alertmanager.yml"])
    assert config["receivers"] == [{"name": "none"}]
    assert render.wanted_secret_kinds(settings()) == ["grafana_admin"]


def test_the_stack_pins_prometheus_to_the_first_manager_and_mounts_no_secret_in_its_files():
    s = settings(monitoring_retention="30d")
    text = render.render_stack(s, "node-1", {"grafana_admin": "m_grafana_admin_0a1b2c3d4e5f"})
    assert stack_problems(text) == []
    doc = yaml.safe_load(text)
    assert set(doc["services"]) == {"prometheus", "alertmanager", "grafana", "node-exporter",
                                    "dcgm-exporter"}
    prometheus = doc["services"]["prometheus"]
    assert prometheus["deploy"]["placement"]["constraints"] == ["node.hostname == node-1"]
    assert "--storage.tsdb.retention.time=30d" in prometheus["command"]
    assert {"source": "prometheus-data", "target": "/prometheus", "type": "volume"} in prometheus["volumes"]
    grafana = doc["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin"
    assert doc["secrets"]["grafana_admin"] == {"external": True, "name": "m_grafana_admin_0a1b2c3d4e5f"}
    # The GPU exporter gets every GPU from the runtime without reserving Swarm's generic resources.
    dcgm = doc["services"]["dcgm-exporter"]
    assert dcgm["deploy"]["mode"] == "global" and "resources" not in dcgm["deploy"]
    assert dcgm["environment"]["NVIDIA_VISIBLE_DEVICES"] == "all"
    # `docker stack deploy` interpolates $: node-exporter's regular expressions escape it.
    exclude = next(a for a in doc["services"]["node-exporter"]["command"] if "mount-points" in a)
    assert exclude.endswith("($$|/)") and "$" not in exclude.replace("$$", "")


def test_a_changed_image_or_secret_changes_only_that_services_spec():
    s = settings()
    secrets = {"grafana_admin": "m_grafana_admin_1"}
    before = render.plan_services(s, "node-1", secrets)
    after = render.plan_services(settings(monitoring_node_exporter_image="prom/node-exporter:v1.9.2"),
                                 "node-1", {"grafana_admin": "m_grafana_admin_2"})
    spec = {svc["key"]: svc["labels"]["gpufleet.spec"] for svc in before}
    respec = {svc["key"]: svc["labels"]["gpufleet.spec"] for svc in after}
    assert sorted(k for k in spec if spec[k] != respec[k]) == ["grafana", "node-exporter"]


def test_switched_off_pieces_leave_nothing_behind():
    s = settings(monitoring_grafana=False, monitoring_alertmanager=False,
                 monitoring_dcgm_exporter=False)
    rendered = render.render_files(s, FLEET, "node-1")
    assert "alerting" not in yaml.safe_load(rendered[f"{render.MONITORING_DIR}/prometheus.yml"])
    stale = monitoring.stale_paths(rendered)
    assert f"{render.MONITORING_DIR}/alertmanager.yml" in stale
    assert f"{render.MONITORING_DIR}/targets/dcgm.json" in stale
    assert f"{render.MONITORING_DIR}/targets/node.json" not in stale
    assert any(path.endswith("dashboards/models.json") for path in stale)


def test_what_is_reloaded_when_files_change():
    d = render.MONITORING_DIR
    assert monitoring.reloads([f"{d}/targets/node.json"], set()) == []  # file_sd: read by itself
    assert monitoring.reloads([f"{d}/rules/gpufleet.yml"], set()) == ["prometheus"]
    assert monitoring.reloads([f"{d}/prometheus.yml", f"{d}/alertmanager.yml"], {"prometheus"}) == [
        "alertmanager"]


def test_only_the_pinned_services_are_waited_for():
    services = [{"name": "m_prometheus", "running": 1, "desired": 1},
                {"name": "m_dcgm-exporter", "running": 2, "desired": 3}]
    assert monitoring.monitoring_progress(services, {"prometheus"}) == (
        True, ["prometheus 1/1", "dcgm-exporter 2/3"])
    services[0]["running"] = 0
    assert monitoring.monitoring_progress(services, {"prometheus"})[0] is False
    assert monitoring.own_hostname([{"id": "a", "hostname": "node-1"}], "a") == "node-1"


def test_every_dashboard_panel_queries_the_provisioned_data_source():
    queries = render.dashboard_queries()
    assert len(queries) >= 20
    datasource = yaml.safe_load(render.render_files(settings(), FLEET, "node-1")[
        f"{render.GRAFANA_DIR}/provisioning/datasources/gpufleet.yml"])["datasources"][0]
    for name in render.DASHBOARDS:
        doc = json.loads((render.TEMPLATES / "grafana" / name).read_text())
        assert doc["uid"].startswith("gpufleet-")
        for panel in doc["panels"]:
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_the_gateways_exporter_answers_only_the_managers_and_allowed_sources():
    s = settings(stack_engine_allowed_sources=["10.9.0.0/16"])
    served = [spec for spec in s.models if spec.serve]
    config = gateway.render_gateway(served, FLEET, 8080, access=gateway.access_for(s))
    assert "frontend metrics\n    # HAProxy's own" in config
    assert "bind :8405" in config
    assert "tcp-request connection reject unless { src 127.0.0.1 10.0.0.11 10.9.0.0/16 }" in config
    assert "http-request use-service prometheus-exporter if { path /metrics }" in config
    off = settings(monitoring_enabled=False)
    assert "frontend metrics" not in gateway.render_gateway(served, FLEET, 8080,
                                                           access=gateway.access_for(off))


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"monitoring_prometheus_port": 8080}, "key 'monitoring_prometheus_port'"),
    ({"monitoring_node_exporter_port": 9400}, "9400 is also monitoring_node_exporter_port"),
    ({"monitoring_grafana_admin_password_file": None}, "Grafana's admin password"),
    ({"monitoring_alert_receiver": "slack"}, "holding the slack receiver's incoming webhook URL"),
    ({"monitoring_alert_receiver": "webhook", "monitoring_alert_receiver_file": "/r",
      "monitoring_alertmanager": False}, "key 'monitoring_alert_receiver'"),
    ({"monitoring_retention": "15 days"}, "key 'monitoring_retention'"),
    ({"monitoring_alert_receiver": "email"}, "key 'monitoring_alert_receiver'"),
])
def test_bad_monitoring_values_are_refused_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        settings(**overrides)
    assert expected in " ".join(error.value.lines)
