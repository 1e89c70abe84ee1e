"""The faults a fleet meets, each done to the lab the way it happens to a real one: a process
killed or frozen, a daemon restarted, a host powered off, the Swarm's leader lost, the Hub
failing mid-download, a file damaged on disk, the operator's run cut short.

Each `act` breaks the lab (and, where the fault ends by itself in real life, ends it: a frozen
process thawed, a host powered on again) while the drill's load runs, and returns what it did:
`fault_at` (epoch seconds) and whatever the drill's own check needs. What the fault cost, how
long the fleet took to heal, and whether the next runs converge is measured by scripts/drills.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import yaml

from scripts.drill import verdict as v
from scripts.drill.lab import DrillLab, require


@dataclass(frozen=True)
class Drill:
    name: str
    fault: str                      # what is done, in words
    target: str                     # what it may cost, in words
    allowance: v.Allowance
    act: Callable[[DrillLab], dict]
    check: Callable[[DrillLab, list, dict], dict] | None = None  # a drill's own target
    managers: int = 1               # Swarm managers the drill needs (gateways to fail over to)
    cheap: bool = False             # run in CI (tests/lab/test_drills.py)
    # The fault is an operator's run that failed or was cut short: the files it may have been
    # writing are checked right after it, before any run repairs them.
    broken_run: bool = False


def engine_node(lab: DrillLab) -> tuple[str, str]:
    """(node, service) of an engine task on a node that runs no gateway when there is one: the
    fault then hits the engine alone."""
    _, stack = lab.stack()
    managers = set(lab.fleet.managers)
    services = lab.engine_services()
    tasks = [t for t in stack["tasks"] if t["service"] in services and t["state"] == "running"]
    if not tasks:
        raise RuntimeError("no engine task runs")
    tasks.sort(key=lambda t: (t["node"] in managers, t["node"]))
    return tasks[0]["node"], tasks[0]["service"]


# --- the serving path -------------------------------------------------------------------------


def engine_killed(lab: DrillLab) -> dict:
    node, service = engine_node(lab)
    container = lab.task_container(node, service)
    at = time.time()
    require(lab.ssh(node, f"docker kill {container}"), "docker kill")
    return {"fault_at": at, "struck_by": time.time(), "node": node,
            "detail": f"SIGKILL to {service}'s container on {node}"}


def engine_hung(lab: DrillLab) -> dict:
    """`docker pause`: the engine's port still accepts connections and nothing answers. Thawed
    once the gateway has marked it down and HUNG_END_WITHIN_S more have passed."""
    node, service = engine_node(lab)
    manager = lab.fleet.managers[0]
    container = lab.task_container(node, service)
    at = time.time()
    require(lab.ssh(node, f"docker pause {container}"), "docker pause")
    struck_by = time.time()
    down_at = None
    for _ in range(60):
        down_at = v.marked_down(lab.gateway_events(manager, at - 5), node, at)
        if down_at:
            break
        time.sleep(1)
    time.sleep(max(0.0, (down_at or time.time()) + v.HUNG_END_WITHIN_S + 2 - time.time()))
    thawed_at = time.time()
    require(lab.ssh(node, f"docker unpause {container}"), "docker unpause")
    # A frozen engine takes requests until the gateway marks it down: the fault strikes every
    # request in flight until then (hung_check holds the gateway to its side of the target).
    return {"fault_at": at, "struck_by": down_at or struck_by, "down_at": down_at, "node": node,
            "manager": manager, "thawed_at": thawed_at,
            "detail": f"docker pause of {service}'s container on {node} for "
                      f"{thawed_at - at:.0f} s"}


def hung_check(lab: DrillLab, requests: list, facts: dict) -> dict:
    # The log again, now that it holds every request accepted until the engine was thawed.
    down_at = facts["down_at"]
    sent = 0
    if down_at:
        events = lab.gateway_events(facts["manager"], facts["fault_at"] - 5)
        sent = v.requests_sent_to(events, facts["node"], down_at + 0.2, facts["thawed_at"])
    result = v.hung_verdict(requests, down_at, sent)
    if down_at:
        result["marked_down_after_s"] = round(down_at - facts["fault_at"], 2)
    return result


def docker_restarted(lab: DrillLab) -> dict:
    node, _ = engine_node(lab)
    at = time.time()
    require(lab.ssh(node, "systemctl restart docker", timeout=300), "systemctl restart docker")
    return {"fault_at": at, "struck_by": time.time(), "node": node,
            "detail": f"systemctl restart docker on {node}"}


def host_stopped(lab: DrillLab) -> dict:
    """The host shut down (systemd stops its services, Docker its containers), off for 20 s,
    then powered on."""
    node, _ = engine_node(lab)
    at = time.time()
    require(lab.docker("stop", "-t", "60", lab.container(node), timeout=120), "docker stop")
    struck_by = time.time()
    time.sleep(20)
    require(lab.docker("start", lab.container(node)), "docker start")
    return {"fault_at": at, "struck_by": struck_by, "node": node,
            "detail": f"{node} shut down, off 20 s, started"}


def task_gpu(lab: DrillLab, node: str, container: str) -> tuple[int, str]:
    """(index, UUID) of the GPU Swarm gave a task's container (its DOCKER_RESOURCE_NVIDIA-GPU)."""
    env = lab.ssh(node, f"docker inspect --format '{{{{json .Config.Env}}}}' {container}")
    require(env, "docker inspect")
    uuid = next(item.split("=", 1)[1] for item in json.loads(env.stdout)
                if item.startswith("DOCKER_RESOURCE_NVIDIA-GPU="))
    rows = lab.ssh(node, "nvidia-smi --query-gpu=index,uuid --format=csv,noheader")
    require(rows, "nvidia-smi")
    index = next(int(i) for i, u in (line.split(", ") for line in rows.stdout.splitlines())
                 if u == uuid)
    return index, uuid


def docker_restart_window(lab: DrillLab, node: str) -> tuple[float, float]:
    """When Docker last began to stop on `node` and when it was running again (systemd's own
    timestamps, epoch seconds: the lab hosts share this machine's clock)."""
    shown = lab.ssh(node, "systemctl show docker -p ActiveExitTimestampMonotonic "
                          "-p ActiveEnterTimestampMonotonic; cat /proc/uptime")
    require(shown, "systemctl show docker")
    values = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    uptime = float(shown.stdout.splitlines()[-1].split()[0])
    now = time.time()
    return (now - uptime + int(values["ActiveExitTimestampMonotonic"]) / 1e6,
            now - uptime + int(values["ActiveEnterTimestampMonotonic"]) / 1e6)


def gpu_unhealthy(lab: DrillLab) -> dict:
    """Uncorrected ECC errors on the GPU an engine task holds (a LAB FAULT the simulated
    nvidia-smi reports), then the run that keeps it out: that node's Docker restarts with the
    GPU no longer advertised, and its task starts again on a healthy GPU. What may fail is what
    was in flight on that node while its Docker restarted."""
    node, service = engine_node(lab)
    index, uuid = task_gpu(lab, node, lab.task_container(node, service))
    require(lab.lab_cli("gpu-fault", node, str(index), "ecc=2"), "lab.py gpu-fault")
    run = lab.deploy()
    if not run.ok:
        raise RuntimeError(f"the run after the fault exited {run.exit_code}: "
                           + run.output.strip()[-500:])
    stopping, running = docker_restart_window(lab, node)
    return {"fault_at": stopping, "struck_by": running, "node": node, "gpu": [index, uuid],
            "run_changes": run.changed, "reported": f"unhealthy GPU {index} {uuid}" in run.output,
            "detail": f"2 uncorrected ECC errors on GPU {index} of {node} ({service}'s); the "
                      f"next run kept it out: {node}'s Docker restarted for "
                      f"{running - stopping:.1f} s"}


def gpu_kept_out(lab: DrillLab, requests: list, facts: dict) -> dict:
    """The run named the GPU, no longer advertised it, no task holds it; then the GPU is reset
    (as an operator does), so the next run lets it back in."""
    node, (index, uuid) = facts["node"], facts["gpu"]
    config = json.loads(lab.ssh(node, "cat /etc/docker/daemon.json").stdout or "{}")
    advertised = f"NVIDIA-GPU={uuid}" in config.get("node-generic-resources", [])
    held = [service for service in lab.engine_services()
            if (container := lab.task_container(node, service))
            and task_gpu(lab, node, container)[1] == uuid]
    reset = lab.ssh(node, f"nvidia-smi -r -i {index}")
    return {"ok": facts["reported"] and not advertised and not held and reset.returncode == 0,
            "reported": facts["reported"], "still_advertised": advertised, "held_by": held,
            "reset": reset.returncode == 0}


def leader(lab: DrillLab) -> str:
    for manager in lab.fleet.managers:
        done = lab.ssh(manager, "docker node ls --format '{{.Hostname}} {{.ManagerStatus}}'", 30)
        for line in done.stdout.splitlines():
            name, _, status = line.partition(" ")
            if status.strip() == "Leader":
                return name
    raise RuntimeError("no manager names a leader")


def leader_lost(lab: DrillLab) -> dict:
    """The leader's host loses power (SIGKILL to the whole container: no shutdown). Powered on
    again once another manager has been elected leader."""
    old = leader(lab)
    at = time.time()
    require(lab.docker("kill", lab.container(old)), "docker kill")
    struck_by = time.time()
    others = [m for m in lab.fleet.managers if m != old]
    elected_at, new = None, None
    for _ in range(90):
        try:
            done = lab.ssh(others[0],
                           "docker node ls --format '{{.Hostname}} {{.ManagerStatus}}'", 10)
            new = next((line.split()[0] for line in done.stdout.splitlines()
                        if line.endswith(" Leader") and not line.startswith(old + " ")), None)
        except Exception:  # a manager busy electing may not answer in time
            new = None
        if new:
            elected_at = time.time()
            break
        time.sleep(1)
    require(lab.docker("start", lab.container(old)), "docker start")
    return {"fault_at": at, "struck_by": struck_by, "node": old, "new_leader": new,
            "elected_after_s": round(elected_at - at, 1) if elected_at else None,
            "detail": f"leader {old} powered off; {new or 'no manager'} elected"
                      + (f" in {elected_at - at:.1f} s" if elected_at else "")}


def gateway_killed(lab: DrillLab) -> dict:
    node = lab.fleet.managers[-1]
    container = lab.task_container(node, f"{lab.settings.stack_name}_gateway")
    at = time.time()
    require(lab.ssh(node, f"docker kill {container}"), "docker kill")
    return {"fault_at": at, "struck_by": time.time(), "node": node,
            "detail": f"SIGKILL to the gateway's container on {node}"}


# --- weights and the operator's runs ------------------------------------------------------------


def _worker_without_weights(lab: DrillLab) -> str:
    """An engine node whose model directories are removed (a replaced disk): the next run must
    send it the weights again."""
    node, _ = engine_node(lab)
    models = lab.fleet.settings(node).models_dir
    names = " ".join(f"{models}/{m.name}" for m in lab.fleet.settings(node).models)
    require(lab.ssh(node, f"rm -rf -- {names}"), "rm -rf model directories")
    return node


def hub_failing(lab: DrillLab) -> dict:
    """A run that must read the Hub (the control cache emptied, one host's weights gone) while
    the Hub cuts the weights file mid-transfer, then answers 500 to every GET of it."""
    node = _worker_without_weights(lab)
    cache = Path(lab.settings.weights_cache_dir).expanduser()
    shutil.rmtree(cache, ignore_errors=True)
    hub = str(lab.settings.hf_endpoint).rstrip("/")
    # The first GET of the weights is cut halfway; every later one (the client's retry) is a 500.
    faults = [{"mode": "drop", "file": "model.safetensors", "times": 1},
              {"mode": "500", "file": "model.safetensors", "method": "GET", "times": 1000}]
    with httpx.Client(timeout=10) as client:
        for fault in faults:
            client.post(f"{hub}/_lab/faults", json=fault).raise_for_status()
        at = time.time()
        try:
            run = lab.deploy()
        finally:
            client.delete(f"{hub}/_lab/faults").raise_for_status()
    return {"fault_at": at, "node": node, "emptied": node, "broken_run_exit": run.exit_code,
            "broken_run_s": round(run.seconds, 1),
            "broken_run_says": _failure_lines(run.output),
            "detail": f"control cache emptied, {node}'s weights removed; the Hub cut the weights "
                      "mid-file, then answered 500"}


def weights_corrupted(lab: DrillLab) -> dict:
    """Eight bytes overwritten in the middle of a weights file on one host (a bad disk block)."""
    node, _ = engine_node(lab)
    settings = lab.fleet.settings(node)
    path = f"{settings.models_dir}/{settings.models[0].name}/model.safetensors"
    at = time.time()
    require(lab.ssh(node, f"size=$(stat -c %s {path}) && printf DRILLBAD | dd of={path} bs=1 "
                      "seek=$((size / 2)) conv=notrunc status=none"), "overwrite")
    drift = lab.drift_check()
    return {"fault_at": at, "node": node, "drift_check_exit": drift.returncode,
            "drift_check_names_it": node in drift.stdout and "model.safetensors" in drift.stdout,
            "detail": f"8 bytes overwritten in {path} on {node}"}


def drift_named_it(lab: DrillLab, requests: list, facts: dict) -> dict:
    """The drift check saw the damage: exit 2, naming the host and the file."""
    return {"ok": facts["drift_check_exit"] == 2 and facts["drift_check_names_it"]}


def run_said_why(lab: DrillLab, requests: list, facts: dict) -> dict:
    """The broken run failed (never a silent success) and said why."""
    return {"ok": facts["broken_run_exit"] not in (0, None) and bool(facts["broken_run_says"])}


def interrupted(phase: str, at_operation: str, signum: int) -> Callable[[DrillLab], dict]:
    """The operator's run stopped by `signum` once it starts `at_operation`, with work to do
    there (prepare_work)."""
    def act(lab: DrillLab) -> dict:
        node = prepare_work(lab, phase)
        at = time.time()
        facts: dict = {"fault_at": at, "node": node,
                       "detail": f"{signal.Signals(signum).name} to the run at '{at_operation}'"}
        if phase == "weights":
            facts["emptied"] = node
            # The lab's model is 0.5 MiB: over a slowed link its transfer lasts seconds.
            with lab.slow_link(node):
                run = lab.interrupted_deploy(at_operation, signum)
            # What the cut transfer left: in staging, never in the model's own directory.
            models = lab.fleet.settings(node).models_dir
            staged = lab.ssh(node, f"du -sb {models}/.staging 2>/dev/null | cut -f1")
            facts["staged_bytes_left"] = int(staged.stdout.strip() or 0)
        else:
            run = lab.interrupted_deploy(at_operation, signum)
        facts.update({
            "interrupted_run_exit": run.exit_code,
            "interrupted_run_s": round(run.seconds, 1),
            "interrupted_during": _last_operation(run.output),
            # pyinfra 3.10 answers SIGINT with this line and exit 0 (pyinfra_cli/main.py).
            "run_said_interrupted": "Exiting upon user request!" in run.output,
        })
        return facts
    return act


def prepare_work(lab: DrillLab, phase: str) -> str:
    """Give the phase something to do: a host's weights to send again, or a changed engine
    setting for the stack phase to roll out (toggled, so two drills in a row leave the lab's
    own models in place)."""
    if phase == "weights":
        return _worker_without_weights(lab)
    models = lab.state["settings"]["models"]
    data = lab.state["hosts"][0].get("data", {})
    if "models" in data:
        done = lab.lab_cli("unset", "all", "models")
    else:
        changed = [{**models[0], "gpu_memory_utilization": 0.85}, *models[1:]]
        done = lab.lab_cli("set", "all", f"models={json.dumps(changed)}")
    require(done, "lab.py set models")
    return lab.fleet.managers[0]


def files_in_use_problems(lab: DrillLab, emptied: str | None = None) -> dict[str, list[str]]:
    """What is damaged where it would be used: a model directory that exists but is not the
    verified copy, a daemon.json that is not JSON, a stack file that is not YAML. A model
    directory the drill itself removed may still be missing: never half there."""
    found = lab.weights_problems()
    if emptied in found:
        found[emptied] = [p for p in found[emptied] if not p.endswith(": not installed")]
        if not found[emptied]:
            del found[emptied]
    for node in lab.nodes:
        done = lab.ssh(node, "cat /etc/docker/daemon.json; echo '#@stack'; "
                             f"cat /etc/gpufleet/stack/{lab.settings.stack_name}.yml 2>/dev/null")
        daemon, _, stack = done.stdout.partition("#@stack\n")
        for what, parse, text in (("daemon.json", json.loads, daemon),
                                  ("stack file", yaml.safe_load, stack)):
            if not text.strip():
                continue
            try:
                parse(text)
            except ValueError as error:
                found.setdefault(node, []).append(f"{what} does not parse: {error}"[:200])
    return found


def _last_operation(output: str) -> str:
    """The operation the run had started last when it stopped."""
    started = [line.split("--> Starting operation: ", 1)[1].strip()
               for line in output.splitlines() if "--> Starting operation: " in line]
    return started[-1] if started else ""


def _failure_lines(output: str) -> list[str]:
    return [line.strip()[:300] for line in output.splitlines()
            if "Error" in line and " pass " not in line][-5:]


DRILLS = [
    Drill("engine-killed", "an engine's container killed (SIGKILL) under load",
          "only the streams in flight on it fail; no non-streamed request fails (the gateway "
          "retries it on another engine)", v.Allowance(streams_only=True), engine_killed,
          cheap=True),
    Drill("engine-hung", "an engine frozen (docker pause): its port accepts and nothing answers",
          "its requests in flight end within 10 s of the gateway marking it down; no new "
          "request reaches it", v.Allowance(), engine_hung, check=hung_check, cheap=True),
    Drill("docker-restarted", "Docker restarted on a node serving an engine",
          "only requests in flight on that node may fail", v.Allowance(), docker_restarted),
    Drill("gpu-unhealthy", "uncorrected ECC errors on the GPU an engine holds, then the run",
          "the run names the GPU and keeps it out; only requests in flight on that node while "
          "its Docker restarts may fail", v.Allowance(), gpu_unhealthy, check=gpu_kept_out),
    Drill("host-stopped", "a node's host shut down, then started 20 s later",
          "only requests in flight on that node may fail", v.Allowance(), host_stopped),
    Drill("gateway-killed", "a gateway's container killed (SIGKILL), 3 managers",
          "only requests in flight on that gateway may fail; new ones go to another gateway",
          v.Allowance(), gateway_killed, managers=3),
    Drill("leader-lost", "the Swarm leader's host powered off, 3 managers",
          "only requests in flight on that host may fail; another manager leads",
          v.Allowance(), leader_lost, managers=3),
    Drill("hub-failing", "the Hub cuts the weights mid-download, then answers 500",
          "no request fails; the run fails on the hosts that need the Hub and says so",
          v.NONE, hub_failing, check=run_said_why, broken_run=True),
    Drill("weights-corrupted", "a weights file corrupted on one host",
          "no request fails; the drift check names it; the next run repairs it",
          v.NONE, weights_corrupted, check=drift_named_it),
    Drill("run-sigint-weights", "the operator's run interrupted (SIGINT) in the weights phase",
          "no request fails; no half-written file where it would be used",
          v.NONE, interrupted("weights", "Model weights | Model", signal.SIGINT),
          broken_run=True),
    Drill("run-sigterm-weights", "the operator's run terminated (SIGTERM) in the weights phase",
          "no request fails; no half-written file where it would be used",
          v.NONE, interrupted("weights", "Model weights | Model", signal.SIGTERM),
          broken_run=True),
    Drill("run-sigint-stack", "the operator's run interrupted (SIGINT) while rolling the stack",
          "no request fails; no half-written file where it would be used",
          v.NONE, interrupted("stack", "Inference stack | Deploy the inference stack",
                              signal.SIGINT), broken_run=True),
    Drill("run-sigterm-stack", "the operator's run terminated (SIGTERM) while rolling the stack",
          "no request fails; no half-written file where it would be used",
          v.NONE, interrupted("stack", "Inference stack | Deploy the inference stack",
                              signal.SIGTERM), broken_run=True),
]
