"""The monitoring stack as files (pure): what operations/monitoring.py writes to the first
manager and deploys, rendered from the settings and the Swarm's nodes.

    /etc/gpufleet/monitoring/prometheus.yml           scrape jobs, rule files, Alertmanager
    /etc/gpufleet/monitoring/targets/<job>.json       file_sd targets: node, dcgm, engine, gateway
    /etc/gpufleet/monitoring/rules/gpufleet.yml       alert rules (thresholds from group data)
    /etc/gpufleet/monitoring/alertmanager.yml         route and receiver (its secret: a Docker secret)
    /etc/gpufleet/monitoring/grafana/...              data source, dashboards (templates/grafana/)
    /etc/gpufleet/stack/<stack>-monitoring.yml        the Swarm stack file

Targets are rendered from the fleet the deploy knows (the Swarm's nodes, the served models, their
ports) into files Prometheus reads again by itself: a node onboarded or retired changes the
targets files and nothing else, no service restarts. Every target carries the label `node` (the
Swarm hostname); engines also `model`, `served_model_name`, `inference_engine` and `replica` (the
node: a model runs at most one replica per node). Engine targets are every node that may run
the model, so a task Swarm moves is scraped where it lands without a deploy; a node without a
replica of it reads as down there (up 0), which the rules count with (ModelDegraded compares
the replicas answering with those configured).

    files = render_files(settings, nodes, monitoring_node="gpu-01")
    text = render_stack(settings, "gpu-01", {"grafana_admin": "gpufleet-monitoring_grafana_admin_0a1b"})
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from operations import gateway, sizing
from operations.stack_render import (
    LABEL_ROLE, LABEL_SPEC, STACK_DIR, TEMPLATES, _env, content_hash,
)

MONITORING_DIR = "/etc/gpufleet/monitoring"
GRAFANA_DIR = f"{MONITORING_DIR}/grafana"
DASHBOARDS = ("fleet-gpus.json", "models.json", "gateway.json")
# Engines whose own port answers /metrics in Prometheus' format: vLLM's and TGI's servers do;
# Ollama has no metrics endpoint (README.md, "Monitoring").
SCRAPED_ENGINES = ("vllm", "tgi")
# Where a service's Docker secret is mounted (Alertmanager reads the receiver's from there).
SECRETS_DIR = "/run/secrets"


def stack_name(settings) -> str:
    """The monitoring stack's name: services are <stack_name>-monitoring_prometheus, ..."""
    return f"{settings.stack_name}-monitoring"


def stack_path(settings) -> str:
    return posixpath.join(STACK_DIR, f"{stack_name(settings)}.yml")


def _group(targets: list[tuple[str, dict[str, str]]]) -> list[dict[str, Any]]:
    """file_sd's JSON: one entry per target (its labels differ), sorted: the same fleet renders
    the same bytes."""
    return [{"targets": [address], "labels": labels}
            for address, labels in sorted(targets, key=lambda t: (t[0], sorted(t[1].items())))]


def scrape_targets(settings, nodes: list[sizing.Node]) -> dict[str, list[dict[str, Any]]]:
    """job -> file_sd entries: node-exporter on every node, dcgm-exporter on the GPU nodes, each
    served model's engine on every node that may run it, the gateway's exporter on each
    manager. Only the fleet's nodes: labelled by a run that included a manager (a host joined
    with --limit is taken in with its labels, by the next such run: the same run adds its
    targets), with an address, not drained."""
    known = [node for node in nodes if node.addr and node.active and node.labelled]
    jobs: dict[str, list[tuple[str, dict[str, str]]]] = {}
    if settings.monitoring_node_exporter:
        jobs["node"] = [(f"{n.addr}:{settings.monitoring_node_exporter_port}", {"node": n.hostname})
                        for n in known]
    if settings.monitoring_dcgm_exporter:
        jobs["dcgm"] = [(f"{n.addr}:{settings.monitoring_dcgm_exporter_port}", {"node": n.hostname})
                        for n in known if n.gpu_count > 0]
    engines = []
    for spec in settings.models:
        if not spec.serve or spec.engine not in SCRAPED_ENGINES:
            continue
        for node in sizing.eligible_nodes(known, spec.tensor_parallel_size, spec.gpu_model,
                                          include_down=True):
            engines.append((f"{node.addr}:{spec.port}", {
                "node": node.hostname, "replica": node.hostname, "model": spec.name,
                # Not "engine": vLLM's own series carry engine="<core index>".
                "served_model_name": spec.served_name, "inference_engine": spec.engine}))
    jobs["engine"] = engines
    jobs["gateway"] = [(f"{n.addr}:{settings.monitoring_gateway_metrics_port}", {"node": n.hostname})
                       for n in known if n.manager]
    return {job: _group(targets) for job, targets in jobs.items()}


def models_mounts(models_dir: str) -> str:
    """A regular expression matching the mount points that may hold models_dir: itself and each
    directory above it (node-exporter reports the mount point, not the directory)."""
    parts = [p for p in models_dir.split("/") if p]
    prefixes = ["/"] + ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return "|".join(prefix.replace(".", "\\\\.") for prefix in prefixes)


def _receiver_secret(settings) -> str | None:
    return "alert_receiver" if settings.monitoring_alertmanager and settings.monitoring_alert_receiver else None


def render_files(settings, nodes: list[sizing.Node], monitoring_node: str) -> dict[str, str]:
    """Path on the first manager -> content: Prometheus' configuration, its targets and rules,
    Alertmanager's configuration, Grafana's provisioning and dashboards (pieces switched off
    render nothing)."""
    env = _env(TEMPLATES)
    scrape_s = settings.monitoring_scrape_interval_s
    alertmanager_port = settings.monitoring_alertmanager_port if settings.monitoring_alertmanager else None
    targets = scrape_targets(settings, nodes)
    jobs = [{"name": job, "path": "/metrics", "comment": JOB_COMMENTS[job]} for job in targets]
    files = {
        f"{MONITORING_DIR}/prometheus.yml": env.get_template("monitoring/prometheus.yml.j2").render(
            scrape_s=scrape_s, timeout_s=max(1, min(10, scrape_s - 1)), fleet=settings.stack_name,
            dir=MONITORING_DIR, alertmanager_port=alertmanager_port,
            prometheus_port=settings.monitoring_prometheus_port, monitoring_node=monitoring_node,
            jobs=jobs),
        f"{MONITORING_DIR}/rules/gpufleet.yml": render_rules(settings),
    }
    for job, entries in targets.items():
        files[f"{MONITORING_DIR}/targets/{job}.json"] = json.dumps(entries, indent=2) + "\n"
    if alertmanager_port:
        secret = _receiver_secret(settings)
        files[f"{MONITORING_DIR}/alertmanager.yml"] = env.get_template(
            "monitoring/alertmanager.yml.j2").render(
            receiver=settings.monitoring_alert_receiver,
            receiver_name=settings.monitoring_alert_receiver or "none",
            secret_path=posixpath.join(SECRETS_DIR, secret) if secret else None)
    if settings.monitoring_grafana:
        files[f"{GRAFANA_DIR}/provisioning/datasources/gpufleet.yml"] = env.get_template(
            "grafana/provisioning/datasources.yml.j2").render(
            prometheus_port=settings.monitoring_prometheus_port, scrape_s=scrape_s)
        files[f"{GRAFANA_DIR}/provisioning/dashboards/gpufleet.yml"] = env.get_template(
            "grafana/provisioning/dashboards.yml.j2").render(dashboards_dir=f"{GRAFANA_DIR}/dashboards")
        for name in DASHBOARDS:
            files[f"{GRAFANA_DIR}/dashboards/{name}"] = (TEMPLATES / "grafana" / name).read_text()
    return files


JOB_COMMENTS = {
    "node": "node-exporter on every node",
    "dcgm": "dcgm-exporter on every node with GPUs",
    "engine": "each served model's engine on every node that may run it (its own port)",
    "gateway": "the gateway's own exporter on each manager (HAProxy's prometheus-exporter)",
}


def render_rules(settings) -> str:
    """The alert rules, one ModelNoHealthyReplica (and ModelDegraded, for scraped engines) per
    served model."""
    models = [{"name": spec.name, "backend": f"be_{gateway.backend_id(spec.name)}",
               "replicas": spec.replicas, "scraped": spec.engine in SCRAPED_ENGINES}
              for spec in settings.models if spec.serve]
    return _env(TEMPLATES).get_template("monitoring/alerts.yml.j2").render(
        models=models, for_s=settings.monitoring_alert_for_s,
        # A restart counts for ten scrapes (at least two minutes): long enough to be seen.
        restart_window_s=max(120, 10 * settings.monitoring_scrape_interval_s),
        p95_latency_s=settings.monitoring_alert_p95_latency_s,
        p95_ttft_s=settings.monitoring_alert_p95_ttft_s,
        gpu_temperature_c=settings.monitoring_alert_gpu_temperature_c,
        disk_free_percent=settings.monitoring_alert_disk_free_percent,
        models_dir=settings.models_dir, models_mounts=models_mounts(settings.models_dir))


def plan_services(settings, monitoring_node: str, secrets: dict[str, str]) -> list[dict[str, Any]]:
    """Everything the stack template needs for each monitoring service (pure)."""
    pinned = [f"node.hostname == {monitoring_node}"]
    uids = settings.monitoring_secret_uids
    services = [{
        "key": "prometheus", "image": settings.monitoring_prometheus_image, "global": False,
        "command": [f"--config.file={MONITORING_DIR}/prometheus.yml",
                    "--storage.tsdb.path=/prometheus",
                    f"--storage.tsdb.retention.time={settings.monitoring_retention}",
                    f"--web.listen-address=:{settings.monitoring_prometheus_port}"],
        "volumes": [_config_mount(), {"type": "volume", "source": "prometheus-data",
                                      "target": "/prometheus"}],
        "constraints": pinned, "secrets": [],
    }]
    if settings.monitoring_alertmanager:
        secret = _receiver_secret(settings)
        services.append({
            "key": "alertmanager", "image": settings.monitoring_alertmanager_image, "global": False,
            "command": [f"--config.file={MONITORING_DIR}/alertmanager.yml",
                        "--storage.path=/alertmanager",
                        f"--web.listen-address=:{settings.monitoring_alertmanager_port}",
                        # One Alertmanager: no gossip port to open between nodes.
                        "--cluster.listen-address="],
            "volumes": [_config_mount(), {"type": "volume", "source": "alertmanager-data",
                                          "target": "/alertmanager"}],
            "constraints": pinned,
            "secrets": [{"source": secret, "uid": str(uids.get("alertmanager", 65534))}] if secret else [],
        })
    if settings.monitoring_grafana:
        services.append({
            "key": "grafana", "image": settings.monitoring_grafana_image, "global": False,
            "environment": {
                "GF_SERVER_HTTP_PORT": str(settings.monitoring_grafana_port),
                "GF_PATHS_PROVISIONING": f"{GRAFANA_DIR}/provisioning",
                # The password from its Docker secret: never in this file or the environment.
                "GF_SECURITY_ADMIN_PASSWORD__FILE": posixpath.join(SECRETS_DIR, "grafana_admin"),
                "GF_USERS_ALLOW_SIGN_UP": "false",
                "GF_AUTH_ANONYMOUS_ENABLED": "false",
                "GF_ANALYTICS_REPORTING_ENABLED": "false",
                "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
            },
            "volumes": [_config_mount(), {"type": "volume", "source": "grafana-data",
                                          "target": "/var/lib/grafana"}],
            "constraints": pinned,
            "secrets": [{"source": "grafana_admin", "uid": str(uids.get("grafana", 472))}],
        })
    if settings.monitoring_node_exporter:
        services.append({
            "key": "node-exporter", "image": settings.monitoring_node_exporter_image, "global": True,
            "command": ["--path.rootfs=/host",
                        f"--web.listen-address=:{settings.monitoring_node_exporter_port}",
                        # No D-Bus in a container: the systemd collector could only fail.
                        "--no-collector.systemd",
                        # node-exporter's own exclusions, plus /etc (Docker's bind mounts of
                        # hosts and resolv.conf) and tmpfs; overlay is kept: a root filesystem
                        # may be one (image-based servers, the lab's hosts).
                        "--collector.filesystem.mount-points-exclude="
                        "^/(dev|proc|run|sys|etc|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)",
                        "--collector.filesystem.fs-types-exclude="
                        "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|"
                        "hugetlbfs|iso9660|mqueue|nsfs|proc|procfs|pstore|rpc_pipefs|securityfs|"
                        "selinuxfs|squashfs|sysfs|tracefs|tmpfs)$"],
            # The host's filesystems, read-only, as node-exporter's own docs run it.
            "volumes": [{"type": "bind", "source": "/", "target": "/host", "read_only": True,
                         "bind": {"propagation": "rslave"}}],
            "constraints": [], "secrets": [],
        })
    if settings.monitoring_dcgm_exporter:
        services.append({
            "key": "dcgm-exporter", "image": settings.monitoring_dcgm_exporter_image, "global": True,
            # Every GPU of the node, without reserving any: the NVIDIA runtime (the default
            # runtime) hands them over; Swarm's generic resources stay the engines'.
            "environment": {"NVIDIA_VISIBLE_DEVICES": "all",
                            "DCGM_EXPORTER_LISTEN": f":{settings.monitoring_dcgm_exporter_port}",
                            "DCGM_EXPORTER_KUBERNETES": "false"},
            "volumes": [], "constraints": ["node.labels.gpufleet.gpu.count != 0"], "secrets": [],
        })
    for service in services:
        # `docker stack deploy` interpolates $VARIABLES in the file: a literal $ is written $$.
        service["command"] = [arg.replace("$", "$$") for arg in service.get("command") or []] or None
        service.setdefault("environment", None)
        used = {ref["source"]: secrets[ref["source"]] for ref in service["secrets"]}
        service["labels"] = {LABEL_ROLE: "monitoring"}
        service["labels"][LABEL_SPEC] = content_hash(json.dumps({**service, "used": used},
                                                                 sort_keys=True))
    return services


def _config_mount() -> dict[str, Any]:
    return {"type": "bind", "source": MONITORING_DIR, "target": MONITORING_DIR, "read_only": True}


def render_stack(settings, monitoring_node: str, secrets: dict[str, str]) -> str:
    """The monitoring stack file; `secrets` maps kind -> versioned Docker secret name."""
    services = plan_services(settings, monitoring_node, secrets)
    volumes = sorted({v["source"] for s in services for v in s["volumes"] if v["type"] == "volume"})
    return _env(TEMPLATES).get_template("monitoring/stack.yml.j2").render(
        services=services, volumes=volumes,
        secrets=[{"source": kind, "name": name} for kind, name in sorted(secrets.items())])


def wanted_secret_kinds(settings) -> list[str]:
    """The Docker secrets the monitoring stack mounts: Grafana's admin password, the receiver's."""
    return list(secret_files(settings))


def secret_files(settings) -> dict[str, tuple[str, str]]:
    """kind -> (key, path on the control machine) of each secret the stack mounts."""
    files = {}
    if settings.monitoring_grafana:
        files["grafana_admin"] = ("monitoring_grafana_admin_password_file",
                                  settings.monitoring_grafana_admin_password_file)
    if _receiver_secret(settings):
        files["alert_receiver"] = ("monitoring_alert_receiver_file",
                                   settings.monitoring_alert_receiver_file)
    return files


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) of every panel of every dashboard: what the lab runs
    against its Prometheus (Grafana itself does not run in the lab)."""
    found = []
    for name in DASHBOARDS:
        doc = json.loads((TEMPLATES / "grafana" / name).read_text())
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                found.append((doc["title"], panel["title"], target["expr"]))
    return found


def rule_expressions(text: str) -> list[tuple[str, str]]:
    """(alert or record name, expression) of a rendered rules file."""
    import yaml

    doc = yaml.safe_load(text)
    return [(rule.get("alert") or rule.get("record"), rule["expr"])
            for group in doc["groups"] for rule in group["rules"]]
