"""What a rolling maintenance run will do, worked out before it touches anything: which hosts the
change touches, and in which batches they can be taken out of serving without losing a model or
the Swarm's managers. Pure functions: the drift check's plan and the Swarm's nodes in, batches or
refusals out.

A host is touched when the deploy, planned with the new data, would change it in a phase that
stops its containers or its GPUs: the NVIDIA driver (a reboot), the Container Toolkit and Docker
Engine (the engine restarts). Everything else a deploy changes is applied in place, fleet-wide,
by an ordinary run.

A batch may take out at most `max_unavailable` hosts, and only when what is left can still serve:
- every model keeps all its replicas: enough active nodes with the GPUs one replica needs (one
  replica per node: engines publish their port on the node), and enough GPUs in all;
- the Swarm keeps a majority of its managers, and at least one manager (a gateway) serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Phases of the deploy whose changes stop a host's serving (operation names start so).
DISRUPTIVE_PHASES = ("NVIDIA driver", "NVIDIA Container Toolkit", "Docker Engine")


@dataclass(frozen=True)
class Node:
    name: str                  # inventory host name
    gpus: int                  # gpufleet.gpu.count
    gpu_model: str = ""        # gpufleet.gpu.model
    manager: bool = False
    active: bool = True        # availability active (not drained or paused) and Ready


@dataclass(frozen=True)
class Model:
    name: str
    replicas: int
    gpus_per_replica: int = 1
    gpu_model: str | None = None


@dataclass
class Plan:
    touched: dict[str, list[dict[str, str]]]     # host -> what would change there
    batches: list[list[str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def disruptive_changes(items) -> list[dict[str, str]]:
    """The changes of one host's drift plan (drift Items) that stop its serving: each
    {"operation", "detail"} (what it would do: its words, or its commands)."""
    return [{"operation": item.operation, "detail": item.detail}
            for item in items
            if item.counted and item.operation.startswith(DISRUPTIVE_PHASES)]


def serving_problem(nodes: list[Node], models: list[Model], out: set[str]) -> str | None:
    """Why the fleet could not serve every replica with the hosts in `out` taken out (and those
    not active already out), or None."""
    left = [n for n in nodes if n.active and n.name not in out]
    for model in models:
        eligible = [n for n in left if n.gpus >= model.gpus_per_replica
                    and (model.gpu_model is None or n.gpu_model == model.gpu_model)]
        if len(eligible) < model.replicas:
            return (f"model {model.name} needs {model.replicas} node(s) with "
                    f"{model.gpus_per_replica} GPU(s){' ' + model.gpu_model if model.gpu_model else ''}"
                    f"; {len(eligible)} would be left")
    needed = sum(m.replicas * m.gpus_per_replica for m in models)
    have = sum(n.gpus for n in left)
    if have < needed:
        return f"the models need {needed} GPU(s); {have} would be left"
    return None


def manager_problem(nodes: list[Node], out: set[str]) -> str | None:
    """Why taking `out` would put the Swarm's managers at risk, or None: a majority of all
    managers must stay, and at least one serving manager (the gateways run on managers)."""
    managers = [n for n in nodes if n.manager]
    if not managers:
        return None
    staying = [n for n in managers if n.active and n.name not in out]
    majority = len(managers) // 2 + 1
    if len(staying) < majority:
        return (f"{len(staying)} of {len(managers)} manager(s) would be left, the Swarm needs "
                f"{majority}")
    return None


def plan_batches(touched: dict[str, list[str]], nodes: list[Node], models: list[Model],
                 max_unavailable: int, order: list[str] | None = None) -> Plan:
    """Batches of touched hosts, in `order` (default: the order of `touched`), each as large as
    max_unavailable and the rules allow. A host that cannot be taken out even alone is refused,
    with the reason, and everything after it waits (the rollout stops there)."""
    plan = Plan(touched=dict(touched))
    by_name = {n.name: n for n in nodes}
    queue = [h for h in (order or list(touched)) if h in touched]
    for name in queue:
        if name not in by_name:
            plan.refused.append(f"{name}: not a node of the Swarm (deploy it first)")
            return plan
    while queue:
        batch: list[str] = []
        for name in queue:
            if len(batch) >= max_unavailable:
                break
            out = set(batch) | {name}
            if serving_problem(nodes, models, out) or manager_problem(nodes, out):
                if not batch:
                    why = serving_problem(nodes, models, out) or manager_problem(nodes, out)
                    plan.refused.append(f"{name}: cannot be taken out of serving: {why}")
                    return plan
                break
            batch.append(name)
        plan.batches.append(batch)
        queue = queue[len(batch):]
    return plan
