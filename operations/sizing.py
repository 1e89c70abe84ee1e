"""Sizing rules of the inference stack, as plain functions: /dev/shm per replica, whether a
model fits the GPUs the Swarm has, and how a service may roll.

Every rule is here once, unit-tested (tests/unit/test_sizing.py) and documented in README.md
("Inference stack: sizing rules"). Nodes are described as the Swarm sees them: the gpufleet.gpu.*
labels the swarm phase sets from nvidia-smi, and the memory Docker reports.

    shm_bytes(tensor_parallel_size=2, host_memory_bytes=[2 * TIB])   # 4 GiB... see SHM_* below
    fit_problems(spec, nodes, weights_bytes=16 * GIB)                # [] or lines with the numbers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

GIB = 1024**3
MIB = 1024**2

# /dev/shm of one engine replica. Engines use shared memory for NCCL's intra-node transport
# between tensor-parallel ranks (one process per GPU) and for PyTorch's worker queues; Docker's
# default of 64 MiB makes NCCL fail ("unhandled system error") as soon as TP > 1. Sources:
# vLLM's Docker guide (share the host's IPC namespace or give --shm-size), TGI's README (--shm-size 1g),
# NCCL's troubleshooting guide (shared-memory segments are sized per peer).
SHM_FLOOR_BYTES = 1 * GIB  # one GPU: what TGI documents as enough for a single shard
SHM_PER_EXTRA_RANK_BYTES = 2 * GIB  # each further rank: NCCL buffers and queues per peer
# Never more than this share of the smallest eligible node's memory: tmpfs pages are host RAM,
# and the engine's own CPU memory (weights staging, swap space) needs the rest.
SHM_MAX_HOST_SHARE = 0.25

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# A node drained by scripts/rollout.py for maintenance carries this label until it is set active
# again: it serves again when it comes back, like a node that is down, so what is rendered for it
# (gateway servers, shm) does not change meanwhile and the stack is not rolled twice for it. Not
# under "gpufleet.": the deploy's node labels (operations/swarm.py) never touch it.
MAINTENANCE_LABEL = "gpufleet-maintenance"


@dataclass(frozen=True)
class Node:
    """A Swarm node as the stack's planning needs it."""

    hostname: str
    gpu_count: int
    gpu_model: str
    gpu_memory_mib: int
    memory_bytes: int
    available: bool = True  # availability active and state ready
    addr: str = ""  # the address the node advertises to the Swarm (where its engines listen)
    # availability active, whatever its state: a node the operator has not drained or paused.
    # A node that is down (its host unreachable, say) is still active: it serves again when it
    # comes back, so what is rendered for it (gateway servers, shm) does not change meanwhile.
    # So is a node drained for maintenance by the rollout (MAINTENANCE_LABEL).
    active: bool = True
    manager: bool = False  # a Swarm manager: runs a gateway task (and Prometheus, the first)
    # Labelled by a run that included a manager (gpufleet.host): a host of the inventory the
    # fleet has taken in, not a node only joined with --limit yet, nor one outside the inventory.
    labelled: bool = True

    @classmethod
    def from_swarm(cls, node: dict[str, Any]) -> "Node":
        """From operations.swarm.SwarmNodes' entries (labels are strings)."""
        labels = node.get("labels") or {}

        def number(key: str) -> int:
            try:
                return int(labels.get(key, "0"))
            except ValueError:
                return 0

        return cls(
            hostname=node.get("hostname", "?"),
            gpu_count=number("gpufleet.gpu.count"),
            gpu_model=labels.get("gpufleet.gpu.model", ""),
            gpu_memory_mib=number("gpufleet.gpu.memory-mib"),
            memory_bytes=int(node.get("memory_bytes") or 0),
            available=node.get("availability") == "active" and node.get("state") == "ready",
            addr=node.get("addr", ""),
            active=node.get("availability") == "active" or MAINTENANCE_LABEL in labels,
            manager=node.get("role") == "manager",
            labelled="gpufleet.host" in labels,
        )


def eligible_nodes(nodes: Iterable[Node], tensor_parallel_size: int, gpu_model: str | None,
                   include_down: bool = False) -> list[Node]:
    """Nodes a replica could be placed on now: active and ready, enough GPUs, the wanted GPU
    model. `include_down`: also the active nodes that are down now, the ones a replica may be
    placed on once they are back (what the stack file is rendered for: a node going down and
    coming back does not change it, and rolls no service)."""
    return [
        node for node in nodes
        if (node.active if include_down else node.available)
        and node.gpu_count >= tensor_parallel_size
        and (gpu_model is None or node.gpu_model == gpu_model)
    ]


def shm_bytes(tensor_parallel_size: int, host_memory_bytes: Iterable[int],
              override_gb: float | None = None) -> int:
    """The size of one replica's /dev/shm tmpfs, in bytes.

    An override (models[].shm_size_gb) wins. Otherwise: SHM_FLOOR_BYTES for one GPU, plus
    SHM_PER_EXTRA_RANK_BYTES per further tensor-parallel rank, capped at SHM_MAX_HOST_SHARE of
    the smallest eligible node's memory (never below 64 MiB, Docker's own default)."""
    if override_gb is not None:
        return int(override_gb * GIB)
    wanted = SHM_FLOOR_BYTES + SHM_PER_EXTRA_RANK_BYTES * (tensor_parallel_size - 1)
    memories = [m for m in host_memory_bytes if m > 0]
    if memories:
        wanted = min(wanted, int(min(memories) * SHM_MAX_HOST_SHARE))
    return max(wanted, 64 * MIB)


def weights_bytes(manifest: dict[str, Any] | None) -> int:
    """Bytes of a model's weight files, from the manifest the weights phase keeps beside them."""
    if not manifest:
        return 0
    return sum(
        int(entry.get("size", 0)) for entry in manifest.get("files", [])
        if str(entry.get("path", "")).endswith(WEIGHT_SUFFIXES)
    )


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def fit_problems(name: str, replicas: int, tensor_parallel_size: int, gpu_memory_utilization: float,
                 gpu_model: str | None, nodes: list[Node], weights: int,
                 placement_per_node: int = 1) -> list[str]:
    """Why a model cannot be placed as configured, with the numbers; [] when it fits.

    - tensor_parallel_size above the GPUs any node has (a replica cannot span nodes);
    - more replicas than eligible nodes (host-mode ports place one replica per node);
    - weights larger than the GPU memory a replica gets: weights / TP per GPU must fit in
      memory x gpu_memory_utilization (a lower bound: the KV cache needs room too)."""
    problems = []
    usable = [n for n in nodes if n.available]
    if not usable:
        return [f"model {name}: the Swarm has no active node to place it on"]
    candidates = [n for n in usable if gpu_model is None or n.gpu_model == gpu_model]
    if not candidates:
        models = sorted({n.gpu_model or "unknown" for n in usable})
        return [f"model {name}: gpu_model {gpu_model!r} is on no active node (nodes have: {', '.join(models)})"]
    most = max(candidates, key=lambda n: n.gpu_count)
    if tensor_parallel_size > most.gpu_count:
        problems.append(
            f"model {name}: tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} "
            f"GPUs on one node; the most any node has is {most.gpu_count} ({most.hostname})")
        return problems
    eligible = eligible_nodes(candidates, tensor_parallel_size, None)
    if replicas > len(eligible) * placement_per_node:
        problems.append(
            f"model {name}: replicas {replicas} need {replicas} nodes with {tensor_parallel_size}+ GPUs "
            f"(one replica per node, its port published on the node); {len(eligible)} such node(s): "
            f"{', '.join(n.hostname for n in eligible)}")
    if weights:
        per_gpu = weights / tensor_parallel_size
        smallest = min(eligible, key=lambda n: n.gpu_memory_mib)
        budget = smallest.gpu_memory_mib * MIB * gpu_memory_utilization
        if per_gpu > budget:
            problems.append(
                f"model {name}: weights of {_gib(weights)} over tensor_parallel_size "
                f"{tensor_parallel_size} need {_gib(per_gpu)} per GPU; {smallest.hostname}'s GPUs "
                f"have {smallest.gpu_memory_mib} MiB x gpu_memory_utilization {gpu_memory_utilization} "
                f"= {_gib(budget)}")
    return problems


def update_order(replicas: int, tensor_parallel_size: int, eligible: list[Node]) -> str:
    """"stop-first" for engines: one task at a time is replaced while the others serve (the
    gateway retries a request whose task went away).

    start-first would need the replacement to start beside the task it replaces. An engine task
    holds its port on the node's own network, so the replacement has to go to another node, and
    Swarm's scheduler counts the old and the new task of a slot together against
    max_replicas_per_node: on the lab (3 nodes, 2 replicas, a spare node) a start-first update
    left the second slot's replacement pending ("no suitable node (max replicas per node)")
    until the update timed out. So start-first is kept for services without GPUs or host
    ports (the gateway behind the routing mesh), and engines roll stop-first."""
    del replicas, tensor_parallel_size, eligible
    return "stop-first"
