"""The inference stack as files: the Swarm stack file (one service per served model and the
gateway) rendered from the settings and the Swarm's nodes, and the structural checks it must pass
before it is deployed. Pure: operations/stack.py reads the facts, renders here, then deploys.

Each service carries a hash of everything rendered for it (label gpufleet.spec) and of the
versions of the secrets it mounts, so a run tells a service that runs something else, whatever
was changed by hand, and a client's key rotated rolls the gateway alone.

    text = render_stack(settings, nodes, {"engine_key": "gpufleet_engine_key_0a1b2c3d4e5f"},
                        gateway_config)
    assert stack_problems(text) == []
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from operations import engines, gateway, ollama_store, sizing

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STACK_DIR = "/etc/gpufleet/stack"

LABEL_ROLE = "gpufleet.role"
LABEL_MODEL = "gpufleet.model"
LABEL_SERVED = "gpufleet.served-name"
LABEL_PORT = "gpufleet.port"
LABEL_ENGINE = "gpufleet.engine"
LABEL_SPEC = "gpufleet.spec"
LABEL_STACK = "gpufleet.stack"
LABEL_SECRET = "gpufleet.secret"
STACK_NAMESPACE = "com.docker.stack.namespace"

# --- Pure logic -----------------------------------------------------------------------------


def service_key(model_name: str) -> str:
    """The stack's service key of a model: DNS-safe (tasks.<stack>_<key> is a DNS name)."""
    return re.sub(r"[^a-z0-9-]", "-", model_name.lower()).strip("-") or "model"


def content_hash(value: str, length: int = 12) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:length]


def secret_name(stack: str, kind: str, value: str) -> str:
    """Versioned by content: a changed value is a new secret (Swarm secrets are immutable).
    12 hex digits of SHA-256 name a version without revealing anything usable of a random key."""
    return f"{stack}_{kind}_{content_hash(kind + ':' + value)}"


def _env(path: Path) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(path)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def drain_config(stack: str) -> dict[str, str]:
    """The drain agent as a Swarm config of the stack: named by content (configs are
    immutable), from the file on the manager that the stack phase writes; `text` is that file."""
    text = (Path(__file__).resolve().parent / "drain_agent.py").read_text()
    return {"name": f"{stack}_drain_agent_{content_hash(text)}", "text": text,
            "file": posixpath.join(STACK_DIR, f"{stack}.drain_agent.py")}


def drain_for(settings) -> dict[str, str] | None:
    """The drain config when a served model runs under the agent (engines.drains), else None."""
    if any(engines.drains(spec) for spec in settings.models if spec.serve):
        return drain_config(settings.stack_name)
    return None


def served_dir(settings, spec) -> str:
    """What a model's service mounts at engines.model_path: its weights, or its Ollama store."""
    if spec.engine == "ollama":
        return ollama_store.store_dir(settings.models_dir, spec.name)
    return posixpath.join(settings.models_dir, spec.name)


def plan_engines(settings, nodes: list[sizing.Node], secrets: dict[str, str]) -> list[dict[str, Any]]:
    """Everything the stack template needs for each served model (pure)."""
    planned = []
    for spec in settings.models:
        if not spec.serve:
            continue
        eligible = sizing.eligible_nodes(nodes, spec.tensor_parallel_size, spec.gpu_model,
                                         include_down=True)
        constraints = ["node.labels.gpufleet.gpu.count != 0"]
        if spec.gpu_model:
            constraints.append(f"node.labels.gpufleet.gpu.model == {spec.gpu_model}")
        uid = str(settings.stack_secret_uids.get(spec.engine, 0))
        engine_secrets = [{"source": "engine_key", "target": "engine_key", "uid": uid}]
        if "hf_token" in secrets:
            engine_secrets.append({"source": "hf_token", "target": "hf_token", "uid": uid})
        labels = {LABEL_ROLE: "engine", LABEL_MODEL: spec.name, LABEL_SERVED: spec.served_name,
                  LABEL_PORT: str(spec.port), LABEL_ENGINE: spec.engine}
        planned.append({
            "key": service_key(spec.name),
            "image": spec.image or settings.stack_engine_images[spec.engine],
            "entrypoint": engines.entrypoint(spec),
            "drain_agent": engines.drains(spec),
            "command": engines.command(spec),
            "environment": engines.environment(spec),
            "port": spec.port,
            "weights_dir": served_dir(settings, spec),
            "model_path": engines.model_path(spec),
            "shm_bytes": sizing.shm_bytes(spec.tensor_parallel_size,
                                          [n.memory_bytes for n in eligible], spec.shm_size_gb),
            "secrets": engine_secrets,
            "healthcheck": engines.container_healthcheck(spec),
            "start_period_s": spec.health_start_period_s,
            "stop_grace_period_s": spec.stop_grace_period_s,
            "replicas": spec.replicas,
            "gpus": spec.tensor_parallel_size,
            "constraints": constraints,
            "update_order": sizing.update_order(spec.replicas, spec.tensor_parallel_size, eligible),
            "service_labels": labels,
        })
    return planned


def render_stack(settings, nodes: list[sizing.Node], secrets: dict[str, str],
                 gateway_config: str) -> str:
    """The stack file: services for the served models and the gateway. Each service carries a
    hash of everything rendered for it (label gpufleet.spec), so a run can tell a service that
    runs something else, whatever was changed by hand."""
    host_mode = settings.stack_publish_mode == "host"
    access = gateway.access_for(settings)
    front = {
        "image": settings.stack_gateway_image,
        "listen_port": gateway.gateway_listen_port(settings),
        "port": settings.stack_gateway_port,
        "redirect_port": settings.stack_gateway_http_redirect_port,
        "redirect_listen_port": access.redirect_listen_port,
        "metrics_port": access.metrics_port,
        "secrets": sorted(kind for kind in secrets if kind.startswith("gateway_")),
        "publish_mode": settings.stack_publish_mode,
        "endpoint_mode": "dnsrr" if host_mode else "vip",
        "uid": str(settings.stack_secret_uids.get("gateway", 99)),
        # Start-first in both modes: on the host network the new task binds the same port beside
        # the old one (SO_REUSEPORT), which then stops gracefully (operations/gateway.py).
        "update_order": "start-first",
        "config_name": f"{settings.stack_name}_haproxy_{content_hash(gateway_config)}",
        "config_file": posixpath.join(STACK_DIR, f"{settings.stack_name}.haproxy.cfg"),
        "service_labels": {LABEL_ROLE: "gateway"},
    }
    planned = plan_engines(settings, nodes, secrets)
    drain = drain_for(settings)
    for service in planned:  # the agent's version is part of what a draining engine runs
        service["drain_agent"] = drain["name"] if service["drain_agent"] else None
    for service in [*planned, front]:
        # The versions of the secrets this service mounts, not all of them: a client's key
        # rotated rolls the gateway alone, never the engines.
        used = {kind: secrets[kind] for kind in secret_kinds(service)}
        shared = {"secrets": used, "monitor_s": settings.stack_update_monitor_s}
        service["service_labels"][LABEL_SPEC] = content_hash(
            json.dumps({**service, **shared}, sort_keys=True))
    return _env(TEMPLATES).get_template("stack.yml.j2").render(
        engines=planned, gateway=front, monitor_s=settings.stack_update_monitor_s,
        drain=drain and {"name": drain["name"], "file": drain["file"]},
        drain_path=engines.DRAIN_AGENT_PATH,
        secrets=[{"source": kind, "name": name} for kind, name in sorted(secrets.items())],
    )


def secret_kinds(service: dict[str, Any]) -> list[str]:
    """The secrets (by kind) a planned service mounts: an engine's are dicts, the gateway's names."""
    return sorted(ref["source"] if isinstance(ref, dict) else ref for ref in service["secrets"])


_VALID_SERVICE_KEYS = {
    "image", "entrypoint", "command", "environment", "hostname", "networks", "ports", "volumes",
    "secrets", "configs", "healthcheck", "stop_grace_period", "labels", "deploy",
}
_VALID_DEPLOY_KEYS = {
    "mode", "replicas", "endpoint_mode", "labels", "placement", "resources", "restart_policy",
    "update_config", "rollback_config",
}


def stack_problems(text: str) -> list[str]:
    """Structural checks of a rendered stack file, the ones a deploy would otherwise trip over
    on the manager (or, worse, accept): every reference declared, sizes and counts sane, keys
    the Swarm honours (shm_size, for one, it silently ignores)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as error:
        return [f"stack file is not YAML: {error}"]
    problems = []
    if str(doc.get("version", "")) < "3.8":
        problems.append("stack file version must be 3.8 or later (max_replicas_per_node)")
    services = doc.get("services") or {}
    if not services:
        problems.append("stack file has no services")
    declared_secrets = set(doc.get("secrets") or {})
    declared_configs = set(doc.get("configs") or {})
    declared_networks = set(doc.get("networks") or {})
    published = {}
    for key, svc in services.items():
        unknown = set(svc) - _VALID_SERVICE_KEYS
        if unknown:
            problems.append(f"service {key}: keys Swarm would ignore or refuse: {sorted(unknown)}")
        if not svc.get("image"):
            problems.append(f"service {key}: no image")
        deploy_ = svc.get("deploy") or {}
        if set(deploy_) - _VALID_DEPLOY_KEYS:
            problems.append(f"service {key}: unknown deploy keys {sorted(set(deploy_) - _VALID_DEPLOY_KEYS)}")
        for ref in svc.get("secrets") or []:
            if ref["source"] not in declared_secrets:
                problems.append(f"service {key}: secret {ref['source']} is not declared")
        for ref in svc.get("configs") or []:
            if ref["source"] not in declared_configs:
                problems.append(f"service {key}: config {ref['source']} is not declared")
        for net in svc.get("networks") or []:
            if net not in declared_networks:
                problems.append(f"service {key}: network {net} is not declared")
        for port in svc.get("ports") or []:
            if port["published"] in published:
                problems.append(f"service {key}: port {port['published']} also published by "
                                f"{published[port['published']]}")
            published[port["published"]] = key
            if port.get("mode") == "ingress" and deploy_.get("endpoint_mode") == "dnsrr":
                problems.append(f"service {key}: an ingress port needs endpoint_mode vip")
        for volume in svc.get("volumes") or []:
            if volume.get("type") == "tmpfs" and int((volume.get("tmpfs") or {}).get("size", 0)) <= 0:
                problems.append(f"service {key}: tmpfs {volume.get('target')} has no size")
        for resource in ((deploy_.get("resources") or {}).get("reservations") or {}).get("generic_resources") or []:
            spec = resource.get("discrete_resource_spec") or {}
            if spec.get("kind") != "NVIDIA-GPU" or int(spec.get("value", 0)) < 1:
                problems.append(f"service {key}: generic resource {spec} is not NVIDIA-GPU >= 1")
    return problems
