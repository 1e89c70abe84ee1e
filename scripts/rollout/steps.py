"""The rollout's steps on a real fleet, each one command (or a bounded wait) through a manager or
on the host being maintained: drain, wait for the fleet to serve without it, deploy it alone with
reboots allowed, verify it, bring it back. Reads go through the production facts (SwarmNodes,
NvidiaHost, EngineState, ToolkitHost), writes are plain `docker node update`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from operations import gpu_health
from operations import swarm as swarm_ops
from operations.apt_pins import upstream_version
from operations.docker_packages import EngineState
from operations.gpu_health import GpuHealth
from operations.nvidia import NvidiaHost
from operations.sizing import MAINTENANCE_LABEL
from operations.toolkit import ToolkitHost
from scripts.rollout.plan import Model, Node

REPO = Path(__file__).resolve().parents[2]
POLL_S = 2.0
# After the Swarm reports every replica running, the gateways' health checks must see the new
# tasks before the next host goes: HAProxy checks every 2 s and needs 1 success (rise 1).
GATEWAY_SETTLE_S = 5.0


class StepFailed(Exception):
    """A step that did not reach its goal: the rollout stops there, with this reason."""


def reconnect(fleet, name: str) -> None:
    """Drop a host's SSH connection (it rebooted, or may have): the next read connects again."""
    host = fleet.pyinfra_host(name)
    try:
        host.disconnect()
    except Exception:  # a connection the reboot already broke
        host.connected = False


def run_ok(fleet, name: str, command: str, timeout: int = 120) -> list[str]:
    try:
        ok, out, err = fleet.run(name, command, timeout=timeout)
    except Exception as error:  # unreachable: pyinfra's connect error
        raise StepFailed(f"{name}: cannot run `{command}`: {error}") from None
    if not ok:
        raise StepFailed(f"{name}: `{command}` failed: {' '.join(err or out)[-300:]}")
    return out


def swarm_nodes(fleet, manager: str) -> list[dict[str, Any]]:
    parsed = read_fact(fleet, manager, swarm_ops.SwarmNodes)
    if parsed["error"]:
        raise StepFailed(f"{manager}: cannot list the Swarm's nodes: {parsed['error']}")
    return parsed["nodes"]


def node_of(nodes: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return swarm_ops.find_node(nodes, name, None)


def plan_nodes(fleet, nodes: list[dict[str, Any]]) -> list[Node]:
    """The inventory's hosts as the planner sees them (those in the Swarm)."""
    result = []
    for name in fleet.hosts:
        node = node_of(nodes, name)
        if node is None:
            continue
        labels = node["labels"]
        result.append(Node(
            name=name, gpus=int(labels.get(swarm_ops.LABEL_GPU_COUNT, "0") or 0),
            gpu_model=labels.get(swarm_ops.LABEL_GPU_MODEL, ""), manager=node["role"] == "manager",
            active=node["availability"] == "active" and node["state"] == "ready"))
    return result


def served_models(settings) -> list[Model]:
    return [Model(m.name, m.replicas, m.tensor_parallel_size, m.gpu_model)
            for m in settings.models if m.serve]


def set_availability(fleet, manager: str, name: str, availability: str) -> dict[str, Any]:
    """Drain a host's node for maintenance (labelled so, operations.sizing.MAINTENANCE_LABEL:
    the stack is still rendered for it) or set it active again (the label goes). Returns the
    node as it was before."""
    node = node_of(swarm_nodes(fleet, manager), name)
    if node is None:
        raise StepFailed(f"{name} is not a node of the Swarm")
    if availability == "drain":
        label = f"--label-add {MAINTENANCE_LABEL}=rollout"
    else:
        label = f"--label-rm {MAINTENANCE_LABEL}" if MAINTENANCE_LABEL in node["labels"] else ""
    run_ok(fleet, manager, f"docker node update {label} --availability {availability} {node['id']}")
    return node


def stack_replicas(fleet, manager: str, stack: str) -> dict[str, tuple[int, int]]:
    """service -> (running, wanted) for the stack's services."""
    out = run_ok(fleet, manager, "docker service ls --filter label=com.docker.stack.namespace="
                 f"{stack} --format '{{{{.Name}}}} {{{{.Replicas}}}}'")
    result = {}
    for line in out:
        parts = line.split()
        if len(parts) >= 2 and "/" in parts[1]:
            running, wanted = parts[1].split("/", 1)
            result[parts[0]] = (int(running), int(wanted))
    return result


def tasks_running_on(fleet, manager: str, node: dict[str, Any]) -> list[str]:
    """Tasks whose container still runs on the node, those told to stop included: a drained
    vLLM task finishes its requests in flight (the drain agent) before it exits, and the host's
    deploy (Docker restarted, a reboot) must not cut them."""
    out = run_ok(fleet, manager, f"docker node ps {node['id']} "
                 "--format '{{.Name}} {{.DesiredState}} {{.CurrentState}}'")
    return [line for line in out if line.split()[2:3] == ["Running"]]


def wait_until(check: Callable[[], str | None], timeout_s: float, what: str,
               progress: Callable[[str], None]) -> float:
    """Poll check() (None: reached; else what is still missing) until reached; seconds taken.
    StepFailed with the last answer when timeout_s runs out."""
    started = time.monotonic()
    last = None
    while True:
        missing = check()
        if missing is None:
            return time.monotonic() - started
        if missing != last:
            progress(f"waiting for {what}: {missing}")
            last = missing
        if time.monotonic() - started > timeout_s:
            raise StepFailed(f"{what} not reached within {timeout_s:.0f}s: {missing}")
        time.sleep(POLL_S)


def serving_without(fleet, manager: str, stack: str, nodes: list[dict[str, Any]]) -> Callable:
    """A check: no task still running on `nodes`, and every service of the stack at its count."""
    def check() -> str | None:
        for node in nodes:
            left = tasks_running_on(fleet, manager, node)
            if left:
                return f"{len(left)} task(s) still running on {node['hostname']}"
        short = {name: counts for name, counts in stack_replicas(fleet, manager, stack).items()
                 if counts[0] < counts[1]}
        if short:
            return ", ".join(f"{name} {r}/{w}" for name, (r, w) in sorted(short.items()))
        return None
    return check


def boot_marker(fleet, name: str) -> str:
    """Changes at every boot: the kernel's boot id and PID 1's start (a lab host's reboot is a
    container restart under the same kernel)."""
    out = run_ok(fleet, name, "cat /proc/sys/kernel/random/boot_id; cut -d' ' -f22 /proc/1/stat")
    return ":".join(line.strip() for line in out)


def deploy_host(inventory: str, name: str, data: list[str], log_path: Path) -> int:
    """The deploy of one host, reboots allowed, its output kept in log_path: pyinfra's own
    exit code."""
    command = [sys.executable, "-m", "pyinfra", "-y", inventory, "deploy.py", "--limit", name,
               "--data", "nvidia_allow_reboot=true"]
    for item in data:
        command += ["--data", item]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return done.returncode


def read_fact(fleet, name: str, fact) -> Any:
    try:
        return fleet.read_fact(name, fact)
    except Exception as error:  # unreachable, or the fact's command failed
        raise StepFailed(f"{name}: cannot read {fact.__name__}: {error}") from None


def reboots_in_log(log_path: Path, name: str) -> int:
    """How many times the host's deploy rebooted it: the driver phase's reboot operation
    reporting a change for it (the only operation of the deploy that reboots)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    count, operation = 0, ""
    for line in lines:
        if line.startswith("--> Starting operation: "):
            operation = line.removeprefix("--> Starting operation: ").strip()
        elif line.strip() == f"[{name}] Success" and operation.startswith("NVIDIA driver | Reboot"):
            count += 1
    return count


def deploy_failure(log_path: Path, name: str) -> str:
    """The reason a host's deploy gave, from its log: the operation that failed on it and what
    that operation said about it (pyinfra's own "Error: executed N commands" says nothing),
    else the log's last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no deploy log"
    prefix = f"[{name}] "
    operation, said, reason = "", [], None
    for line in lines:
        text = line.strip()
        if text.startswith("--> Starting operation: "):
            operation, said = text.removeprefix("--> Starting operation: ").strip(), []
        elif text.startswith(prefix):
            words = text[len(prefix):].strip()
            if words.startswith("Error"):
                told = [w for w in said if w not in ("Connected", "Success", "No changes")]
                reason = f"{operation}: {' '.join(told) or words}" if operation else words
            elif words:
                said.append(words)
    if reason is None:
        reason = next((line.strip() for line in reversed(lines) if line.strip()), "empty deploy log")
    return reason[:400]


def host_versions(fleet, name: str) -> dict[str, Any]:
    """What runs on a host now: loaded driver and GPUs, Docker Engine, the toolkit."""
    nvidia = read_fact(fleet, name, NvidiaHost)
    engine = read_fact(fleet, name, EngineState)["packages"]
    toolkit = read_fact(fleet, name, ToolkitHost)["packages"]
    docker = engine.get("docker-ce") or engine.get("docker.io") or {}
    return {
        "driver": (nvidia.get("driver") or {}).get("loaded_version"),
        "gpus": len(nvidia.get("gpus") or []),
        "docker": upstream_version(docker.get("version")),
        "toolkit": (toolkit.get("nvidia-container-toolkit") or {}).get("version"),
        "nvidia": nvidia,
    }


def version_problems(versions: dict[str, Any], settings) -> list[str]:
    """What on a maintained host is not what the data asks for."""
    problems = []
    if versions["driver"] != settings.nvidia_driver_version:
        loaded = f"driver {versions['driver']} loaded" if versions["driver"] else "driver not loaded"
        problems.append(f"{loaded}, {settings.nvidia_driver_version} wanted")
    if versions["gpus"] == 0:
        problems.append("no GPU visible to nvidia-smi")
    if settings.docker_engine_source == "docker" and \
            (versions["docker"] or "").split("-")[0] != settings.docker_version:
        problems.append(f"Docker Engine {versions['docker'] or 'missing'}, "
                        f"{settings.docker_version} wanted")
    wanted_toolkit = settings.nvidia_container_toolkit_version
    if (versions["toolkit"] or "") != wanted_toolkit and \
            upstream_version(versions["toolkit"]) != wanted_toolkit:
        problems.append(f"Container Toolkit {versions['toolkit'] or 'missing'}, {wanted_toolkit} wanted")
    return problems


def serving_view(fleet, name: str, nvidia: dict[str, Any], keep_out: bool) -> dict[str, Any]:
    """The host's NvidiaHost fact with only the GPUs it advertises to Swarm (unhealthy ones left
    out when `keep_out`): what the deploy labels a node by (operations.gpu_health)."""
    return gpu_health.serving_view(nvidia, read_fact(fleet, name, GpuHealth) if keep_out else None)


def refresh_gpu_labels(fleet, manager: str, node: dict[str, Any], nvidia: dict[str, Any]) -> dict[str, str]:
    """Set the node's GPU labels from what the host reports now (the deploy's own rule,
    operations.swarm.gpu_labels, over the GPUs it advertises: serving_view), through a manager:
    a deploy limited to this host cannot (labels are written by a manager). Returns the labels
    changed."""
    wanted = swarm_ops.gpu_labels(nvidia)
    changed = {k: v for k, v in wanted.items() if node["labels"].get(k) != v}
    if changed:
        adds = " ".join(f"--label-add {shlex.quote(f'{k}={v}')}" for k, v in sorted(changed.items()))
        run_ok(fleet, manager, f"docker node update {adds} {node['id']}")
    return changed
