"""The configuration rules that need the hosts' facts, checked while the run is planned: after
pyinfra has connected and read each host's NVIDIA fact, before any operation runs on any host
(issue 19). A served model's tensor_parallel_size against the GPUs the hosts of its groups
have, and its replicas (one per node) against the hosts with enough GPUs of its gpu_model.

Only hosts whose driver answers (nvidia-smi lists their GPUs) are counted as known; a fresh host
(no driver yet) or one outside --limit might still fit, so a model is refused only when even
counting every unknown host it could not be placed. The stack phase checks the same again with
the Swarm's view and the weights' size (operations/sizing.fit_problems).

    fleet_fits(settings)   # in deploy.py, before the first phase; refuses (exit 2) or passes
"""

from __future__ import annotations

from typing import Any

from pyinfra import host

from operations.config import refusal
from operations.nvidia import NvidiaHost
from operations.phase import other_host_fact, read_fact


def known_gpus(nvidia: dict[str, Any]) -> tuple[int, list[str]] | None:
    """(GPU count, GPU models) from a host's NvidiaHost fact, or None while no driver answers."""
    if not (nvidia.get("driver") or {}).get("loaded") or not nvidia.get("gpus"):
        return None
    return nvidia.get("gpu_count", len(nvidia["gpus"])), list(nvidia.get("models") or [])


def gpu_fit_problems(models: list[Any], gpus: dict[str, tuple[int, list[str]] | None],
                     members: dict[str, list[str]]) -> list[str]:
    """Why served models cannot be placed on the hosts of their groups; [] when they may be.
    `gpus`: host -> known_gpus (None: unknown); `members`: model name -> its hosts."""
    problems = []
    for index, spec in enumerate(models):
        if not spec.serve:
            continue
        hosts = members.get(spec.name, [])
        known = {name: gpus[name] for name in hosts if gpus.get(name) is not None}
        unknown = [name for name in hosts if gpus.get(name) is None]
        matching = {name: count for name, (count, names) in known.items()
                    if spec.gpu_model is None or spec.gpu_model in names}
        eligible = [name for name, count in matching.items() if count >= spec.tensor_parallel_size]
        what = f"models[{index}].tensor_parallel_size = {spec.tensor_parallel_size}"
        if known and not eligible and not unknown:
            if not matching:
                problems.append(f"models[{index}].gpu_model = {spec.gpu_model!r}: expected a GPU "
                                f"model the hosts of its groups have ({_models(known)})")
                continue
            most = max(matching, key=matching.get)
            problems.append(f"{what}: expected at most the GPUs of one host of its groups "
                            f"({matching[most]} on {most}, the most any has): a replica cannot "
                            "span hosts")
        elif known and len(eligible) + len(unknown) < spec.replicas:
            problems.append(f"models[{index}].replicas = {spec.replicas}: expected at most the hosts "
                            f"with {spec.tensor_parallel_size}+ GPUs in its groups "
                            f"({len(eligible)}: {', '.join(eligible) or 'none'}; one replica per host)")
    return problems


def _models(known: dict[str, tuple[int, list[str]]]) -> str:
    return ", ".join(sorted({name for _, names in known.values() for name in names})) or "none"


def _gpus_of(other) -> tuple[int, list[str]] | None:
    try:
        # The same read (and cached answer) as the host's own NVIDIA phase.
        fact = read_fact(other, NvidiaHost) if other.name == host.name else other_host_fact(
            other, NvidiaHost)
    except Exception:  # a host that does not answer: unknown, as one outside the run
        return None
    return known_gpus(fact)


def fleet_fits(settings) -> None:
    """Refuse the run (every host, exit 2) when a served model cannot fit the GPUs its hosts
    report. Done once, by the first host of the run; the others go on planning."""
    served = [spec for spec in settings.models if spec.serve]
    state = host.state
    in_run = [h for h in host.inventory if h in state.active_hosts]
    if not served or not in_run or in_run[0].name != host.name:
        return
    members = {spec.name: [h.name for h in host.inventory if set(h.groups) & set(spec.groups)]
               for spec in served}
    gpus = {h.name: _gpus_of(h) for h in in_run if any(h.name in m for m in members.values())}
    problems = gpu_fit_problems(settings.models, gpus, members)
    if problems:
        raise refusal([f"{line} (read from the hosts' GPUs)" for line in problems])
