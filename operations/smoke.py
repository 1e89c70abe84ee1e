"""Smoke tests: the served endpoints answer as the configuration promises, checked over HTTP(S)
from the control machine (the checks themselves: operations/smoke_checks.py).

What is checked, for the gateway and for every engine task (reached through the gateway, pinned
to that task by name with the operator's key: engine ports admit only the gateway nodes):
- health: `/health` (Ollama: `/api/version`) answers 200 within `smoke_deadline_s`, retried
  with a growing pause while a model loads;
- models: `/v1/models` lists exactly the served names the configuration promises there (every
  served model at the gateway, the task's own model at an engine);
- completion: one short chat completion per promised model returns at least one token;
- auth: without a key, refused: 401 at the gateway; at an engine task's own port, the connection
  refused (engine firewall) or 401 (its internal key), never an answer;
plus, per service, that Swarm placed its tasks ("tasks": a pending task names why).
Each check records its response time.

Where the endpoints are: `SmokeStack`, one fact read on a manager (services with labels, their
tasks that should run, every node's address). `stack_targets` turns it and the settings into
targets: the gateway at <node address>:<stack_gateway_port> on each node running a gateway task
(host mode) or on each manager (ingress mode); an engine task at the first gateway with the pin
header "<served name>@<node>", its own port at <node address>:<models[].port>.

The operator's key is read from `stack_api_key_file` on the control machine, kept in memory and
sent only as the Authorization header: never printed, logged, put on a command line or in a
report.

Two entry points: the deploy phase `smoke` (each host checks the endpoints located on it and
the gateway; a failure fails that host only; a pass changes nothing) and `scripts/smoke.py`
(the same checks without a deploy).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from typing import Any, Callable

from pyinfra import host, logger
from pyinfra.api import FactBase, FunctionCommand, deploy, operation

from operations import engines
from operations.gateway import pin_value
from operations.gateway_access import PIN_HEADER
from operations.phase import PhaseResult, fail_host, other_host_fact
from operations.smoke_checks import (  # noqa: F401  (the checks, used through this module too)
    FAIL, NA, PASS, SKIPPED, CheckResult, SmokeReport, Target, check_health, check_target,
    read_api_key, run_checks, tls_context,
)
from operations.stack_render import service_key  # the stack's own naming: <stack>_<key>

# Task states after which a task serves nothing until Swarm replaces it.
TASK_ENDED = {"rejected", "failed", "complete", "shutdown", "orphaned", "remove"}


# --- Fact -----------------------------------------------------------------------------------


def _json_lines(lines: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    objects, other = [], []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        try:
            value = json.loads(text)
        except ValueError:
            other.append(text)
            continue
        if isinstance(value, dict):
            objects.append(value)
        else:
            other.append(text)
    return objects, other


def _service(raw: dict[str, Any]) -> dict[str, Any]:
    spec = raw.get("Spec") or {}
    mode = spec.get("Mode") or {}
    replicated = mode.get("Replicated")
    ports = [
        {"published": p.get("PublishedPort"), "target": p.get("TargetPort"),
         "mode": p.get("PublishMode", "ingress")}
        for p in ((spec.get("EndpointSpec") or {}).get("Ports") or [])
    ]
    return {
        "id": raw.get("ID", ""),
        "name": spec.get("Name", ""),
        "labels": dict(spec.get("Labels") or {}),
        "mode": "replicated" if replicated is not None else "global",
        "replicas": (replicated or {}).get("Replicas"),
        "ports": ports,
    }


def _task(raw: dict[str, Any]) -> dict[str, Any]:
    name = raw.get("Name", "")
    current = raw.get("CurrentState", "")
    return {
        "id": raw.get("ID", ""),
        "name": name,
        # Service names hold no dots: <service>.<slot> or <service>.<node id>.
        "service": name.split(".", 1)[0],
        "node": raw.get("Node", ""),
        "desired": raw.get("DesiredState", "").lower(),
        "state": (current.split(" ", 1)[0] if current else "").lower(),
        "current": current,
        "error": raw.get("Error", "").strip("\""),  # docker quotes the daemon's message
    }


def _node(raw: dict[str, Any]) -> dict[str, Any]:
    spec = raw.get("Spec") or {}
    hostname = (raw.get("Description") or {}).get("Hostname", "")
    labels = spec.get("Labels") or {}
    return {
        "id": raw.get("ID", ""),
        "hostname": hostname,
        "host": labels.get("gpufleet.host") or hostname,
        "role": spec.get("Role", "worker"),
        "availability": spec.get("Availability", "active"),
        "state": (raw.get("Status") or {}).get("State", "unknown"),
        "addr": (raw.get("Status") or {}).get("Addr", ""),
    }


def parse_stack(lines: list[str]) -> dict[str, Any]:
    """Parse the SmokeStack fact output; never raises. `error` says why nothing was read."""
    stack: dict[str, Any] = {"error": None, "services": [], "tasks": [], "nodes": []}
    sections: dict[str, list[str]] = {"services": [], "tasks": [], "nodes": []}
    current = None
    for line in lines:
        if line.startswith("error="):
            stack["error"] = line.partition("=")[2].strip() or "docker gave no output"
        elif line.strip() in ("@services", "@tasks", "@nodes"):
            current = line.strip()[1:]
        elif current:
            sections[current].append(line)
    if stack["error"]:
        return stack
    for key, parse in (("services", _service), ("tasks", _task), ("nodes", _node)):
        objects, other = _json_lines(sections[key])
        stack[key] = [parse(item) for item in objects]
        if other and not stack["error"]:
            stack["error"] = f"docker {key}: {' '.join(other)[:300]}"
    stack["services"].sort(key=lambda s: s["name"])
    stack["tasks"].sort(key=lambda t: t["name"])
    stack["nodes"].sort(key=lambda n: n["hostname"])
    return stack


class SmokeStack(FactBase):
    """The stack as a manager sees it: its services (labels, mode, replicas, published ports),
    their tasks that should run (node, state), and every node's address; never fails (on a host
    that is not a manager, `error` says why).

    .. code:: python

        {"error": None,
         "services": [{"id": "s1", "name": "gpufleet_gateway", "labels": {"gpufleet.role":
           "gateway"}, "mode": "global", "replicas": None, "ports": [{"published": 8080,
           "target": 8080, "mode": "host"}]}],
         "tasks": [{"id": "t1", "name": "gpufleet_gateway.n1", "service": "gpufleet_gateway",
           "node": "node-1", "desired": "running", "state": "running",
           "current": "Running 2 minutes ago", "error": ""}],
         "nodes": [{"id": "n1", "hostname": "node-1", "host": "node-1", "role": "manager",
           "availability": "active", "state": "ready", "addr": "10.20.0.11"}]}
    """

    def command(self, stack_name: str) -> str:
        label = shlex.quote(f"label=com.docker.stack.namespace={stack_name}")
        return (
            f"ids=$(docker service ls -q --filter {label} 2>&1) || "
            "{ printf 'error=%s\\n' \"$(printf '%s' \"$ids\" | tr '\\n' ' ')\"; exit 0; }; "
            "echo @services; [ -z \"$ids\" ] || docker service inspect --format '{{json .}}' $ids 2>&1; "
            # Desired "ready": a task Swarm is restarting (its error says why it stopped).
            "echo @tasks; [ -z \"$ids\" ] || docker service ps --no-trunc "
            "--filter desired-state=running --filter desired-state=ready "
            "--format '{{json .}}' $ids 2>&1; "
            "echo @nodes; docker node inspect --format '{{json .}}' $(docker node ls -q) 2>&1; true"
        )

    def process(self, output):
        return parse_stack(output)


# --- Targets --------------------------------------------------------------------------------


def served_models(settings) -> list:
    return [spec for spec in settings.models if spec.serve]


def stack_targets(settings, stack: dict[str, Any]) -> tuple[list[Target], list[CheckResult]]:
    """The endpoints to check, and the problems found before any request ("tasks" checks:
    a missing service, a task Swarm could not place, a node without an address).

    Engines: one target per task of `<stack_name>_<key>`, reached through the first gateway
    pinned to it, its own port <node address>:<port> for the auth check. Gateway: one per node
    running a gateway task (host mode) or per ready manager (ingress mode)."""
    served = served_models(settings)
    services = {s["name"]: s for s in stack["services"]}
    nodes = {n["hostname"]: n for n in stack["nodes"]}
    targets: list[Target] = []
    problems: list[CheckResult] = []

    def tasks_of(name: str) -> list[dict[str, Any]]:
        return [t for t in stack["tasks"] if t["service"] == name]

    def placed(name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(task, node) of each task on a node with an address; problems for the others."""
        found = []
        for task in tasks_of(name):
            node = nodes.get(task["node"])
            if not task["node"]:
                why = task["error"] or task["current"] or "no node"
                problems.append(CheckResult(name, "", "tasks", FAIL, f"task {task['name']} "
                                            f"not placed: {why}"))
            elif task["state"] in TASK_ENDED:
                why = task["error"] or task["current"]
                problems.append(CheckResult(name, "", "tasks", FAIL, f"task {task['name']} on "
                                            f"{task['node']} {task['state']}: {why}"))
            elif node is None or not node["addr"]:
                problems.append(CheckResult(name, "", "tasks", FAIL,
                                            f"node {task['node']} of {task['name']} has no address"))
            else:
                found.append((task, node))
        return found

    if not served:
        return targets, problems
    gateways = gateway_targets(settings, stack, services, placed, problems)
    through = gateways[0].url if gateways else ""
    for spec in served:
        name = f"{settings.stack_name}_{service_key(spec.name)}"
        service = services.get(name)
        if service is None:
            problems.append(CheckResult(name, "", "tasks", FAIL,
                                        f"service missing (model {spec.name} is served)"))
            continue
        before = len(problems)
        on_nodes = placed(name)
        wanted = service["replicas"] or 0
        if len(problems) > before:
            pass  # each task's own reason says more than a count
        elif service["mode"] == "replicated" and len(tasks_of(name)) < wanted:
            problems.append(CheckResult(name, "", "tasks", FAIL,
                                        f"{len(tasks_of(name))} of {wanted} replicas scheduled"))
        elif not on_nodes and not tasks_of(name):
            problems.append(CheckResult(name, "", "tasks", FAIL, "no task runs"))
        if on_nodes and not through:
            problems.append(CheckResult(name, "", "tasks", FAIL,
                                        "no gateway answers: engine tasks are reached through it"))
            continue
        for task, node in on_nodes:
            targets.append(Target(
                name=f"engine {spec.name}@{node['hostname']}", url=through, kind="engine",
                node=node["hostname"], host=node["host"], service=name,
                models=(spec.served_name,), engine=spec.engine,
                listed=engines.listed_model_ids(spec),
                headers=((PIN_HEADER, pin_value(spec.served_name, node["hostname"])),),
                direct_url=f"http://{node['addr']}:{spec.port}",
                server_name=settings.stack_gateway_tls_server_name,
                task=task["name"], task_state=task["state"],
            ))
    return targets + gateways, problems


def gateway_url(settings, addr: str) -> str:
    """The gateway's base URL on one node address: https:// when it has a certificate."""
    scheme = "https" if settings.stack_gateway_tls_cert_file else "http"
    host_part = f"[{addr}]" if ":" in addr else addr
    return f"{scheme}://{host_part}:{settings.stack_gateway_port}"


def gateway_targets(settings, stack, services, placed, problems) -> list[Target]:
    """One target per node running a gateway task (host mode) or per ready manager (ingress)."""
    served = served_models(settings)
    gateway = f"{settings.stack_name}_gateway"
    every_name = tuple(sorted(spec.served_name for spec in served))
    if gateway not in services:
        problems.append(CheckResult(gateway, "", "tasks", FAIL, "service missing"))
        return []
    before = len(problems)
    if settings.stack_publish_mode == "host":
        # A gateway task Swarm left on a node demoted in this run is stopped by the stack phase
        # (gateway.gateway_strays) and the engine ports no longer admit it: the managers' tasks
        # are the gateway.
        gateway_nodes = [node for _, node in placed(gateway) if node.get("role", "manager") == "manager"]
    else:
        gateway_nodes = [n for n in stack["nodes"] if n["role"] == "manager"
                         and n["state"] == "ready" and n["addr"]]
    if not gateway_nodes and len(problems) == before:
        problems.append(CheckResult(gateway, "", "tasks", FAIL, "no node answers for the gateway"))
    return [Target(name=f"gateway@{node['hostname']}", url=gateway_url(settings, node["addr"]),
                   kind="gateway", node=node["hostname"], host=node["host"], service=gateway,
                   models=every_name, engine="gateway",
                   server_name=settings.stack_gateway_tls_server_name)
            for node in gateway_nodes]


def targets_for_host(targets: list[Target], name: str) -> list[Target]:
    """What one host checks in the deploy phase: the endpoints located on it, and the gateway
    (through the first gateway address when no gateway answers on this host)."""
    own = [t for t in targets if t.host == name]
    if not any(t.kind == "gateway" for t in own):
        own += [t for t in targets if t.kind == "gateway"][:1]
    return own


# --- Reports --------------------------------------------------------------------------------


def render_table(results: list[CheckResult]) -> str:
    """One block per endpoint: its URL, then check, result, latency and detail per line."""
    lines: list[str] = []
    by_endpoint: dict[tuple[str, str], list[CheckResult]] = {}
    for result in results:
        by_endpoint.setdefault((result.endpoint, result.url), []).append(result)
    width = max([len(r.check) for r in results] + [len("check")])
    for (endpoint, url), rows in by_endpoint.items():
        lines.append(f"{endpoint}  {url}".rstrip())
        lines.append(f"  {'check'.ljust(width)}  {'result':7} {'latency':>10}  detail")
        for row in rows:
            latency = f"{row.latency_ms:.1f} ms" if row.latency_ms is not None else "-"
            lines.append(f"  {row.check.ljust(width)}  {row.result:7} {latency:>10}  {row.detail}")
    return "\n".join(lines)


def report_json(results: list[CheckResult], targets: list[Target] | None = None) -> dict[str, Any]:
    """The same as the table, as data: {"ok", "failures": [line], "endpoints": [...]}."""
    kinds = {t.name: t for t in targets or []}
    endpoints: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        entry = endpoints.setdefault((result.endpoint, result.url), {
            "endpoint": result.endpoint, "url": result.url,
            "kind": kinds[result.endpoint].kind if result.endpoint in kinds else "service",
            "node": kinds[result.endpoint].node if result.endpoint in kinds else None,
            "checks": [],
        })
        entry["checks"].append({k: v for k, v in asdict(result).items()
                                if k not in ("endpoint", "url")})
    report = SmokeReport(results)
    return {"ok": report.ok, "failures": report.failures(), "endpoints": list(endpoints.values())}


def summary_line(results: list[CheckResult]) -> str:
    endpoints = {r.endpoint for r in results}
    counts = {kind: sum(1 for r in results if r.result == kind) for kind in (PASS, FAIL, NA)}
    return (f"{len(endpoints)} endpoint(s), {counts[PASS]} check(s) passed, {counts[FAIL]} "
            f"failed, {counts[NA]} not applicable")


# --- Operation and phase --------------------------------------------------------------------


def _value(value):
    return value() if callable(value) else value


@operation()
def smoke_endpoints(stack: dict | Callable, settings, deadline_s: float | None = None):
    """
    Check, from the control machine, the endpoints located on this host and the gateway:
    health, the model list, one completion per model, 401 without the key. Runs its checks
    when the run executes (the stack is deployed by then); planning and ``--dry`` only say so.
    A pass changes nothing (noop with a summary); a failure fails this host alone with one line
    per failing check.

    + stack: the SmokeStack fact of a manager, or a function returning it at execution time
    + settings: the host's Settings (stack keys, models, API key file)
    + deadline_s: how long health may take to turn 200 (default: settings.smoke_deadline_s)

    **Example:**

    .. code:: python

        smoke_endpoints(name="Smoke tests", stack=lambda: read_stack(managers), settings=settings)
    """
    served = served_models(settings)
    if not served:
        host.noop("no model is served: nothing to check")
        return
    if not host.state.is_executing:
        host.noop(f"checks the endpoints of {len(served)} served model(s) when the run executes")
        return
    stack = _value(stack)
    if stack.get("error"):
        yield FunctionCommand(fail_host, (f"smoke: cannot read the stack: {stack['error']}",), {})
        return
    targets, problems = stack_targets(settings, stack)
    mine = targets_for_host(targets, host.name)
    try:
        key = read_api_key(settings.stack_api_key_file)
    except OSError as error:
        reason = f"smoke: cannot read stack_api_key_file {settings.stack_api_key_file}: {error.strerror}"
        yield FunctionCommand(fail_host, (reason,), {})
        return
    deadline = settings.smoke_deadline_s if deadline_s is None else deadline_s
    # Service problems (a task Swarm cannot place) are reported once, by the manager that read
    # the stack; by every host when that manager is not in this run (--limit).
    reporter = stack.get("reporter")
    in_run = {h.name for h in host.state.active_hosts}
    results = problems if host.name == reporter or reporter not in in_run else []
    results = results + run_checks(mine, key, deadline, ca_file=settings.stack_gateway_ca_file)
    for line in render_table(results).splitlines():
        logger.info(f"{host.print_prefix}{line}")
    failures = SmokeReport(results).failures()
    if not failures:
        # Said at info level too: pyinfra shows noop descriptions only with -v.
        logger.info(f"{host.print_prefix}smoke passed: {summary_line(results)}")
        host.noop(f"smoke passed: {summary_line(results)}")
        return
    for line in failures:
        host.log_styled(f"smoke failed: {line}", fg="red", log_func=logger.error)
    reason = f"smoke failed: {len(failures)} check(s), named above ({summary_line(results)})"
    yield FunctionCommand(fail_host, (reason,), {})


def read_stack(managers: list, stack_name: str) -> dict[str, Any]:
    """The SmokeStack fact of the first manager that answers (inventory order), tagged with
    the manager's name as `reporter`."""
    last = "no manager in the inventory"
    for other in managers:
        try:
            # Every host reads this manager: one session at a time, one read while nothing changes.
            stack = other_host_fact(other, SmokeStack, stack_name=stack_name)
        except Exception as error:  # an unreachable manager: the next may answer
            last = f"{other.name}: {error!r}"
            continue
        if not stack["error"]:
            return {**stack, "reporter": other.name}
        last = f"{other.name}: {stack['error']}"
    return {"error": last, "services": [], "tasks": [], "nodes": [], "reporter": None}


@deploy("Smoke tests")
def smoke(settings) -> PhaseResult:
    """Every host checks its endpoints and the gateway, once the stack is deployed."""
    inventory = host.inventory
    order = {h.name: i for i, h in enumerate(inventory)}
    managers = sorted(inventory.get_group("swarm_managers", []) or [], key=lambda h: order[h.name])

    def stack():
        # Managers still in the run first: a host that failed earlier may not answer.
        active = [m for m in managers if m in host.state.active_hosts]
        return read_stack(active + [m for m in managers if m not in active], settings.stack_name)

    checked = smoke_endpoints(name="Smoke tests (endpoints on this host and the gateway)",
                              stack=stack, settings=settings)
    return PhaseResult([checked])
