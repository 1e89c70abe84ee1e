"""Monitoring: Prometheus, Alertmanager and Grafana on the first Swarm manager, node-exporter on
every node, dcgm-exporter on every GPU node, as a Swarm stack of its own
(<stack_name>-monitoring); the engines' and the gateway's own exporters are scraped where they
run. Rendered in operations/monitoring_render.py; this module writes and deploys.

What a run does, on the first of swarm_managers (the others say where it is done):
1. Renders from facts: the Swarm's nodes (addresses, GPUs, roles) and this node's Swarm
   hostname, where Prometheus, Alertmanager and Grafana are pinned (their data volumes live
   there).
2. Files in /etc/gpufleet/monitoring/ (bind-mounted read-only into them): Prometheus'
   configuration, rules and targets, Alertmanager's configuration, Grafana's provisioning and
   dashboards. No secret in any of them: Grafana's admin password and the receiver's URL or key
   are Docker secrets, created as the stack's are (operations/stack_secrets.py). A target file
   that changed is read again by Prometheus by itself; a changed configuration or rule file is
   loaded with SIGHUP (Prometheus, Alertmanager), never with a restart.
3. Deploys the stack when a service differs (its spec hash, image, secrets), then waits until
   Prometheus, Alertmanager and Grafana run. The exporters are global services: a node whose
   exporter cannot start (a GPU the runtime cannot open) is reported, and its alert
   (GpuMetricsMissing, NodeDown) says so in Prometheus, but the run goes on.

With monitoring_enabled False (or no model served) a running monitoring stack is removed; its
volumes (Prometheus' samples) are kept.

    monitoring(settings)   # in deploy.py, after the smoke tests
"""

from __future__ import annotations

import hashlib
import time
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, deploy, operation
from pyinfra.api.exceptions import OperationError
from pyinfra.operations import files

from operations import monitoring_render as render
from operations import sizing
from operations.monitoring_facts import FilesState
from operations.phase import PhaseResult, explain, fail_host, fails_only_this_host, host_sudo, read_fact
from operations.stack import StackState, parse_stack_state, remove_stale, service_drift, wanted_services
from operations.stack_render import secret_name, stack_problems
from operations.stack_secrets import create_secret, read_control_secret
from operations.swarm import SwarmInfo, SwarmNodes, _inventory_hosts

# Which running service loads which file again on SIGHUP, when it was not redeployed.
# (Target files need none: Prometheus watches them itself.)
RELOADED_BY = {"prometheus": ("prometheus.yml", "/rules/"),
               "alertmanager": ("alertmanager.yml",)}


# --- Pure logic -----------------------------------------------------------------------------


def own_hostname(nodes: list[dict], node_id: str | None) -> str | None:
    """This node's Swarm hostname (what the placement constraint names), from its node id."""
    return next((node["hostname"] for node in nodes if node.get("id") == node_id), None)


def reloads(changed_paths: list[str], redeployed: set[str]) -> list[str]:
    """The services to send SIGHUP: those whose files changed and that were not redeployed
    (a new task reads its files when it starts). Target files need none: Prometheus watches
    them, so only prometheus.yml and the rules count for it."""
    wanted = []
    for service, markers in RELOADED_BY.items():
        if service not in redeployed and any(m in path for path in changed_paths for m in markers):
            wanted.append(service)
    return wanted


def monitoring_progress(services: list[dict], pinned: set[str]) -> tuple[bool, list[str]]:
    """(the pinned services run, one line per service): global exporters are reported, not
    waited for (one node's exporter that cannot start does not hold the fleet's run)."""
    done, lines = True, []
    for svc in services:
        short = svc["name"].split("_", 1)[-1]
        lines.append(f"{short} {svc['running']}/{svc['desired']}")
        if short in pinned and (svc["desired"] == 0 or svc["running"] < svc["desired"]):
            done = False
    return done, lines


def stale_paths(rendered: dict[str, str]) -> list[str]:
    """Files a piece switched off leaves behind (its targets, its configuration): removed, so
    that what the directory holds is what runs."""
    possible = [f"{render.MONITORING_DIR}/targets/{job}.json" for job in render.JOB_COMMENTS]
    possible.append(f"{render.MONITORING_DIR}/alertmanager.yml")
    possible += [f"{render.GRAFANA_DIR}/dashboards/{name}" for name in render.DASHBOARDS]
    possible += [f"{render.GRAFANA_DIR}/provisioning/{kind}/gpufleet.yml"
                 for kind in ("datasources", "dashboards")]
    return [path for path in possible if path not in rendered]


# --- Execution helpers (FunctionCommand bodies) ---------------------------------------------


def wait_monitoring(state, host, stack: str, pinned: list[str], timeout_s: int,
                    poll_s: float = 3.0) -> bool:
    """Poll until the pinned services run; then report the global exporters' tasks."""
    started = time.monotonic()
    last_print = 0.0
    while True:
        ok, output = host.run_shell_command(StackState().command(stack), print_output=False,
                                            print_input=False, _sudo=host_sudo(host))
        services = parse_stack_state(output.stdout_lines if ok else [])["services"]
        done, lines = monitoring_progress(services, set(pinned))
        elapsed = time.monotonic() - started
        if done:
            host.log_styled(f"monitoring stack {stack} runs ({elapsed:.0f}s): {'; '.join(lines)}")
            for svc in services:
                if svc["running"] < svc["desired"]:
                    logger.warning(f"{host.print_prefix}monitoring: {svc['name']} runs "
                                   f"{svc['running']} of {svc['desired']} tasks (see `docker "
                                   f"service ps {svc['name']}`); its targets show as down")
            return True
        if elapsed > timeout_s:
            return fail_host(state, host, f"monitoring stack {stack} did not start in "
                                          f"{timeout_s}s: {'; '.join(lines)}")
        if time.monotonic() - last_print > 15:
            host.log_styled(f"waiting for monitoring stack {stack} ({elapsed:.0f}s): {'; '.join(lines)}")
            last_print = time.monotonic()
        time.sleep(poll_s)


def _signal_command(service: str) -> StringCommand:
    """SIGHUP to this node's task of `service` (Prometheus and Alertmanager reload on it)."""
    script = ('ids=$(docker ps -q --filter "label=com.docker.swarm.service.name=$1"); '
              '[ -z "$ids" ] || docker kill --signal HUP $ids >/dev/null')
    return StringCommand("sh", "-c", QuoteString(script), "reload", QuoteString(service))


# --- Operations -----------------------------------------------------------------------------


@operation()
@fails_only_this_host
def monitoring_deploy(settings, elsewhere: str | None = None):
    """
    Render and write the monitoring files on this node (the first manager), deploy the
    monitoring stack when it differs, reload what changed, wait until it runs.

    + settings: the host's operations.config.Settings
    + elsewhere: where it is done when not on this host (this host then has nothing to do)

    **Example:**

    .. code:: python

        monitoring_deploy(name="Deploy the monitoring stack", settings=settings)
    """
    if elsewhere:
        host.noop(f"monitoring is deployed {elsewhere}")
        return
    stack = render.stack_name(settings)
    listed = read_fact(host, SwarmNodes)
    if listed["error"]:
        if not host.state.is_executing:
            host.noop("the Swarm is formed earlier in this run: monitoring is planned when it exists")
            return
        raise OperationError(f"cannot list the Swarm's nodes here: {listed['error']}")
    me = own_hostname(listed["nodes"], read_fact(host, SwarmInfo).get("node_id"))
    if me is None:
        raise OperationError("this manager is not among the Swarm's nodes")
    nodes = [sizing.Node.from_swarm(node) for node in listed["nodes"]]
    rendered = render.render_files(settings, nodes, me)

    secrets = {kind: read_control_secret(path, key)
               for kind, (key, path) in render.secret_files(settings).items()}
    names = {kind: secret_name(stack, kind, value) for kind, value in secrets.items()}
    text = render.render_stack(settings, me, names)
    problems = stack_problems(text)
    if problems:
        raise OperationError("the rendered monitoring stack file is invalid: " + "; ".join(problems))
    current = host.get_fact(StackState, stack=stack)
    if current["error"]:
        raise OperationError(f"cannot read the stack here: {current['error']}")

    changed = False
    for kind, value in sorted(secrets.items()):
        if names[kind] not in current["secrets"]:
            changed = True
            explain(f"monitoring: secret {names[kind]} ({kind}) does not exist yet")
            yield FunctionCommand(create_secret, (stack, kind, names[kind], lambda v=value: v), {})
    del secrets

    changed_paths = []
    wanted_files = {**rendered, render.stack_path(settings): text}
    directories = sorted({path.rsplit("/", 1)[0] for path in wanted_files})
    stale = stale_paths(rendered)
    on_host = read_fact(host, FilesState, paths=[*directories, *wanted_files, *stale])
    for directory in directories:
        if on_host.get(directory) == "dir":
            continue
        for command in files.directory._inner(path=directory, mode="0755"):
            changed = True
            yield command
    for path in stale:
        if on_host.get(path) is None:
            continue
        for command in files.file._inner(path=path, present=False):
            changed = True
            changed_paths.append(path)
            yield command
    for path, content in sorted(wanted_files.items()):
        if on_host.get(path) == {"mode": "644", "sha256": hashlib.sha256(content.encode()).hexdigest()}:
            continue  # as rendered: pyinfra's own checks of it would cost a round trip each
        for command in files.put._inner(src=StringIO(content), dest=path, mode="0644"):
            if path not in changed_paths:
                changed = True
                changed_paths.append(path)
                explain(f"monitoring: {path} differs from the rendered file")
            yield command

    running = {svc["name"]: svc for svc in current["services"]}
    wanted = wanted_services(stack, text)
    differs = {name: why for name, want in sorted(wanted.items())
               if (why := service_drift(name, running.get(name), want))}
    extra = sorted(set(running) - set(wanted))
    # Replicated (pinned to this node), as the stack file says; the global exporters are not.
    pinned = [name.split("_", 1)[-1] for name, want in wanted.items() if want["replicas"] is not None]
    if differs or extra:
        for why in [*differs.values(), *(f"{name} is not in the stack file (removed by --prune)"
                                         for name in extra)]:
            host.log_styled(f"monitoring: {why}")
            explain(f"monitoring: {why}")
        yield StringCommand("docker stack deploy --prune --with-registry-auth -c",
                            QuoteString(render.stack_path(settings)), QuoteString(stack))
        changed = True
    redeployed = {name.split("_", 1)[-1] for name in differs}
    for service in reloads(changed_paths, redeployed):
        if f"{stack}_{service}" in running:
            explain(f"monitoring: {service} loads its changed files again (SIGHUP)")
            yield _signal_command(f"{stack}_{service}")
    if differs or extra or any(svc["running"] < svc["desired"] or svc["desired"] == 0
                               for svc in current["services"]
                               if svc["name"].split("_", 1)[-1] in pinned):
        yield FunctionCommand(wait_monitoring, (stack, pinned, settings.monitoring_converge_timeout_s), {})
        changed = True

    stale_secrets = sorted(set(current["secrets"]) - set(names.values()))
    if stale_secrets:
        explain("monitoring: no longer used, to remove: " + ", ".join(stale_secrets))
        yield FunctionCommand(remove_stale, ("secret", stale_secrets), {})
        changed = True
    if not changed:
        host.noop(f"monitoring stack {stack} runs as rendered: {len(wanted)} service(s), "
                  f"{sum(len(v) for k, v in render.scrape_targets(settings, nodes).items())} "
                  "scrape target(s)")


@operation()
def monitoring_removed(stack: str, why: str):
    """
    No monitoring wanted: remove the monitoring stack if it runs (its volumes, Prometheus'
    samples among them, are kept).

    + stack: the monitoring stack's name
    + why: what switched it off, for the messages

    **Example:**

    .. code:: python

        monitoring_removed(name="No monitoring stack", stack="gpufleet-monitoring",
                           why="monitoring_enabled is False")
    """
    current = host.get_fact(StackState, stack=stack)
    if current["error"] or not current["services"]:
        host.noop(f"no monitoring stack runs ({why})")
        return
    explain(f"monitoring: {stack} runs, but {why}")
    yield StringCommand("docker stack rm", QuoteString(stack))


# --- Phase ----------------------------------------------------------------------------------


@deploy("Monitoring")
def monitoring(settings) -> PhaseResult:
    """On the first of swarm_managers: the monitoring stack, its files and secrets. (One call
    site per operation: pyinfra lists an operation once when every host reaches it there.)"""
    _, managers = _inventory_hosts(host.inventory)
    first = managers[0] if managers else None
    elsewhere = None
    if first is None or host.name != first.name:
        elsewhere = (f"from {first.name}" + ("" if first in host.state.active_hosts
                                              else ", not in this run (--limit)")) if first else "nowhere"
    served = any(spec.serve for spec in settings.models)
    if elsewhere is None and (not settings.monitoring_enabled or not served):
        why = "monitoring_enabled is False" if served else "no model is served"
        return PhaseResult([monitoring_removed(name="No monitoring stack",
                                               stack=render.stack_name(settings), why=why)])
    return PhaseResult([monitoring_deploy(name="Deploy the monitoring stack", settings=settings,
                                          elsewhere=elsewhere)])
