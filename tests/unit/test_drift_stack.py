"""The stack's drift, as the drift check sees it: the real stack operation body planned against
recorded facts of a running stack (no Swarm). A stack running as rendered is no drift; a service
scaled to 0 or removed, an image or a secret changed by hand is a change that says which."""

import copy
from types import SimpleNamespace

import pytest
from pyinfra.context import ctx_host

from operations import gateway as gw, phase, sizing, stack, stack_render, stack_secrets
from operations.config import validate_host_data
from operations.inventory_data import load_group_data
from operations.swarm import SwarmNodes
from scripts.drift import report

NODES = {"error": None, "nodes": [{
    "id": "n1", "hostname": "gpu-01", "role": "manager", "availability": "active",
    "state": "ready", "addr": "10.0.0.1", "leader": True, "reachability": "reachable",
    "memory_bytes": 512 * 2**30,
    "labels": {"gpufleet.gpu.count": "2", "gpufleet.gpu.model": "NVIDIA H100 80GB HBM3",
               "gpufleet.gpu.memory-mib": "81559", "gpufleet.host": "gpu-01"},
}]}
MANIFESTS = {"tiny": {"files": [{"path": "model.safetensors", "size": 1024}]}}


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    key = tmp_path / "api-key"
    key.write_text("k" * 32 + "\n")
    key.chmod(0o600)
    engine_key = tmp_path / "engine-key"
    engine_key.write_text("e" * 32 + "\n")
    engine_key.chmod(0o600)
    return validate_host_data("gpu-01", {
        **load_group_data()["all"],
        "models": [{"name": "tiny", "repo_id": "org/tiny",
                    "revision": "4eab0cd005a1f7148f5d417d86428a174a186129"}],
        "stack_api_key_file": str(key),
        "stack_engine_key_file": str(engine_key),
        "monitoring_grafana": False,
    })


def running_as_rendered(settings):
    """StackState of a stack running exactly what this repository renders, converged."""
    secrets = {kind: name for kind, (name, _) in stack_secrets.wanted_secrets(settings).items()}
    served = [spec for spec in settings.models if spec.serve]
    nodes = [sizing.Node.from_swarm(node) for node in NODES["nodes"]]
    gateway = gw.render_gateway(served, nodes, gw.gateway_listen_port(settings),
                                settings.stack_gateway_max_body_kb * 1024, gw.access_for(settings))
    text = stack_render.render_stack(settings, nodes, secrets, gateway)
    services = []
    for name, want in stack.wanted_services(settings.stack_name, text).items():
        services.append({
            "name": name, "labels": {stack_render.LABEL_SPEC: want["spec"]},
            "replicas": want["replicas"], "image": want["image"] + "@sha256:" + "ab" * 32,
            "secrets": list(want["secrets"]), "running": 1, "desired": 1,
            "update_state": "completed", "update_message": None,
        })
    return {"error": None, "services": sorted(services, key=lambda s: s["name"]),
            "secrets": sorted(secrets.values()),
            "configs": [f"{settings.stack_name}_haproxy_{stack_render.content_hash(gateway)}"]}


class _State:
    is_executing = False


def plan(settings, state_fact, monkeypatch):
    """The drift check's view of the stack operation: its items, planned (not executed)."""
    # The rendered files are in place: this test is about the services.
    nothing = SimpleNamespace(_inner=lambda **kwargs: iter(()))
    monkeypatch.setattr(stack, "files", SimpleNamespace(put=nothing, directory=nothing))
    facts = {SwarmNodes: NODES, stack.ModelManifests: MANIFESTS, stack.StackState: state_fact}
    state = _State()
    fake = SimpleNamespace(name="gpu-01", state=state, current_op_hash="op", print_prefix="",
                           noop=lambda text: None, log_styled=lambda *a, **k: None,
                           get_fact=lambda cls, **kwargs: facts[cls])
    with ctx_host.use(fake):
        commands = list(stack.stack_deploy._inner(settings))
    explained = [(text, about) for _, _, kind, text, about in phase.notes_of(state)
                 if kind == phase.EXPLAIN]
    return report.classify("Inference stack | Deploy the inference stack", conditional=False,
                           commands=commands, explained=explained, findings=[])


def test_a_stack_running_as_rendered_is_no_drift(settings, monkeypatch):
    assert plan(settings, running_as_rendered(settings), monkeypatch) == []


@pytest.mark.parametrize("change, says", [
    (lambda s: s["services"][1].update(replicas=0), "gpufleet_tiny is scaled to 0 (wanted 1)"),
    (lambda s: s["services"].pop(1), "gpufleet_tiny is not running"),
    (lambda s: s["services"][1].update(image="vllm/vllm-openai:v0.10.0"),
     "gpufleet_tiny runs image vllm/vllm-openai:v0.10.0 (wanted vllm/vllm-openai:v0.11.0)"),
    (lambda s: s["services"][1].update(secrets=["gpufleet_api_key_000000000000"]),
     "gpufleet_tiny has secrets ['gpufleet_api_key_000000000000']"),
    (lambda s: s["services"][0].update(running=0), "stack: not converged: gpufleet_gateway 0/1"),
    (lambda s: s["secrets"].append("gpufleet_api_key_000000000000"),
     "stack: no longer used, to remove: gpufleet_api_key_000000000000"),
])
def test_a_stack_changed_by_hand_is_drift_that_says_what(settings, monkeypatch, change, says):
    drifted = copy.deepcopy(running_as_rendered(settings))
    assert [s["name"] for s in drifted["services"]] == ["gpufleet_gateway", "gpufleet_tiny"]
    change(drifted)
    items = plan(settings, drifted, monkeypatch)
    assert [(i.kind, i.counted) for i in items] == [("change", True)]
    assert says in items[0].detail
