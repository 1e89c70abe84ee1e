"""The inference stack: one Swarm service per served model behind an HAProxy gateway, deployed
from the acting Swarm manager with `docker stack deploy`, waited on until it converges.

What a run does (on the acting manager; every other host says where it is done):
1. Plans from facts: the Swarm's nodes (GPU labels, memory), each model's weights manifest, the
   stack's services, secrets and configs. A model that cannot fit (tensor-parallel size above the
   GPUs of any node, weights above the GPU memory a replica gets, more replicas than nodes) fails
   the host with the numbers, before anything is deployed.
2. Secrets: the engines' internal key, the gateway's client map (one key per named client, the
   operator's among them), its copy of the internal key, its TLS bundle and the Hub token
   (operations/gateway_access.py) are Docker secrets named by a hash of their content
   (`<stack>_engine_key_<sha256[:12]>`): Swarm secrets are immutable, so a rotated key is a new
   secret, the services roll onto it, and the old one is removed once they have. Values are read
   on the control machine and handed to the engine API on the SSH channel's stdin
   (`docker system dial-stdio`): never on a command line, in a file or a log.
3. Files: the rendered stack file and HAProxy config in /etc/gpufleet/stack/ (no secret in
   either; `--dry --diff` shows their diff). The stack file is checked before it is deployed.
4. Deploy only when something differs: a service missing, its spec (a hash of what was rendered,
   kept as a service label), replicas, image or secrets changed by hand. Then wait, by polling
   the Engine API through the CLI (no reliance on a CLI version's --detach=false), until every
   service runs its wanted tasks, healthy, and no update is in progress; a rolled-back update
   fails the host naming the service and Swarm's reason.

Updates are rolling and health-gated: one task at a time, start-first where a spare node can
take the replacement, stop-first otherwise (operations/sizing.update_order), automatic rollback.

Networking: engines run on each node's own network (Swarm's `host` network) and listen on the
node's address at the model's port; the gateway lists the eligible nodes' addresses and its
health checks find the nodes that run a healthy task. No overlay network, on purpose: Swarm's
constraint enforcer rejects every task holding named generic resources (GPUs) on a node whose
node object is updated ("assigned node no longer meets constraints": it tests
genericresource.HasResource where it means the opposite), and the allocator updates a node when
it first gives it an address on an overlay network, so GPU tasks on overlay networks were killed
whenever they landed on a node new to that network (seen on the lab, Docker 20.10; any
`docker node update`, a label change included, does the same; moby/moby#44378, fixed in Docker
23.0 by moby/swarmkit#3082). With the host network no such
update happens during a deploy. The routing mesh (stack_publish_mode "ingress") still works for
the gateway, which holds no GPU.

The stack file is rendered and checked in operations/stack_render.py, the secrets are read and
created in operations/stack_secrets.py; this module reads the facts, deploys and waits.

    stack(settings)        # in deploy.py, after the swarm phase
"""

from __future__ import annotations

import json
import posixpath
import time
from io import StringIO
from typing import Any

import yaml
from pyinfra import host, logger
from pyinfra.api import FactBase, FunctionCommand, QuoteString, StringCommand, deploy, operation
from pyinfra.api.exceptions import OperationError
from pyinfra.operations import files

from operations import gateway, sizing
from operations.phase import (
    PhaseResult, disturbed_nodes, explain, fail_host, fails_only_this_host, host_sudo,
    read_fact,
)
from operations.node_wait import wait_for_nodes, why_node_down
from operations.stack_render import (
    LABEL_SPEC, STACK_DIR, content_hash, drain_for, render_stack, stack_problems,
)
from operations.stack_secrets import create_secret, wanted_secrets
from operations.swarm import SwarmNodes, _inventory_hosts
from operations.weights_plan import MANIFEST_NAME

# --- Pure logic (the rendering itself: operations/stack_render.py) ----------------------------


def service_drift(name: str, service: dict[str, Any] | None, wanted: dict[str, Any]) -> str | None:
    """Why a running service differs from the rendered one, or None."""
    if service is None:
        return f"{name} is not running"
    if service["labels"].get(LABEL_SPEC) != wanted["spec"]:
        return f"{name} runs another spec ({service['labels'].get(LABEL_SPEC)} -> {wanted['spec']})"
    if wanted.get("replicas") is not None and service["replicas"] != wanted["replicas"]:
        return f"{name} is scaled to {service['replicas']} (wanted {wanted['replicas']})"
    # Swarm records the digest it resolved (`name:tag@sha256:...`): compare it only when the
    # wanted image pins one, or a digest-pinned image would differ on every run.
    image = service["image"] if "@" in wanted["image"] else service["image"].split("@", 1)[0]
    if image != wanted["image"]:
        return f"{name} runs image {image} (wanted {wanted['image']})"
    if sorted(service["secrets"]) != sorted(wanted["secrets"]):
        return f"{name} has secrets {sorted(service['secrets'])} (wanted {sorted(wanted['secrets'])})"
    return None


def wanted_services(stack: str, text: str) -> dict[str, dict[str, Any]]:
    """Full service name -> what the rendered stack file says it must be."""
    doc = yaml.safe_load(text)
    declared = {key: value["name"] for key, value in (doc.get("secrets") or {}).items()}
    out = {}
    for key, svc in doc["services"].items():
        deploy_ = svc["deploy"]
        out[f"{stack}_{key}"] = {
            "spec": deploy_["labels"][LABEL_SPEC],
            "replicas": deploy_.get("replicas") if deploy_.get("mode") == "replicated" else None,
            "image": svc["image"],
            "secrets": [declared[ref["source"]] for ref in svc.get("secrets") or []],
        }
    return out


PAUSED = ("paused", "rollback_paused")


def convergence(services: list[dict[str, Any]], watched: set[str] | None = None
                ) -> tuple[bool, list[str], list[str]]:
    """(done, progress lines, failures) from the StackState services.

    A rollback or pause counts as a failure only for `watched` services (those this run
    updated; None: all): a service an earlier run saw roll back runs its previous spec, which a
    later run only accepts when that spec is the rendered one."""
    done, progress, failures = True, [], []
    for svc in services:
        update = svc["update_state"]
        line = f"{svc['name']} {svc['running']}/{svc['desired']}" + (f" ({update})" if update else "")
        progress.append(line)
        if (watched is None or svc["name"] in watched) and update in (
                "rollback_started", "rollback_completed", *PAUSED):
            failures.append(f"{svc['name']}: update {update}: {svc['update_message'] or 'no reason given'}")
        # A service with no desired task at all (a global gateway with no eligible node, a
        # replicated one whose tasks were all rejected) is not converged, whatever 0/0 says.
        if (svc["desired"] == 0 or svc["running"] < svc["desired"]
                or update in ("updating", "rollback_started", *PAUSED)):
            done = False
    return done and not failures, progress, failures


def parse_stack_state(lines: list[str]) -> dict[str, Any]:
    """Parse StackState's sections; never raises."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith("@@"):
            current = line[2:].strip()
            sections[current] = []
        elif current:
            sections[current].append(line)
    if "error" in sections:
        return {"error": " ".join(sections["error"]).strip() or "docker failed",
                "services": [], "secrets": [], "configs": []}
    try:
        inspected = json.loads("\n".join(sections.get("inspect", [])) or "[]")
    except ValueError:
        inspected = []
    counts = {}
    for line in sections.get("ls", []):
        try:
            item = json.loads(line)
        except ValueError:
            continue
        running, _, desired = str(item.get("Replicas", "0/0")).partition("/")
        counts[item.get("Name")] = (int(running or 0), int(desired.split(" ")[0] or 0))
    services = []
    for item in inspected:
        spec = item.get("Spec") or {}
        task = spec.get("TaskTemplate") or {}
        container = task.get("ContainerSpec") or {}
        mode = spec.get("Mode") or {}
        update = item.get("UpdateStatus") or {}
        name = spec.get("Name", "")
        running, desired = counts.get(name, (0, 0))
        services.append({
            "name": name,
            "labels": dict(spec.get("Labels") or {}),
            "replicas": (mode.get("Replicated") or {}).get("Replicas"),
            "image": container.get("Image", ""),
            "secrets": [s.get("SecretName") for s in container.get("Secrets") or []],
            "running": running,
            "desired": desired,
            "update_state": update.get("State"),
            "update_message": update.get("Message"),
        })
    return {
        "error": None,
        "services": sorted(services, key=lambda s: s["name"]),
        "secrets": sorted(line.strip() for line in sections.get("secrets", []) if line.strip()),
        "configs": sorted(line.strip() for line in sections.get("configs", []) if line.strip()),
    }


# --- Facts ----------------------------------------------------------------------------------


class StackState(FactBase):
    """The stack as the Swarm runs it, from a manager: its services (spec labels, replicas,
    image, secrets, running/desired tasks, update state), the project's secrets and the
    stack's configs. Never fails: off a manager, `error` says why.

    .. code:: python

        {"error": None, "secrets": ["gpufleet_api_key_0a1b2c3d4e5f"], "configs": [...],
         "services": [{"name": "gpufleet_tiny-llama", "labels": {"gpufleet.spec": "..."},
                       "replicas": 3, "image": "reg/vllm:1@sha256:...", "secrets": [...],
                       "running": 3, "desired": 3, "update_state": "completed",
                       "update_message": "update completed"}]}
    """

    def command(self, stack: str) -> StringCommand:
        script = (
            'ids=$(docker service ls -q --filter "label=com.docker.stack.namespace=$1" 2>&1) '
            '|| { echo @@error; echo "$ids"; exit 0; }; '
            'echo @@ls; docker service ls --filter "label=com.docker.stack.namespace=$1" '
            "--format '{{json .}}'; "
            'echo @@inspect; if [ -n "$ids" ]; then docker service inspect $ids; else echo "[]"; fi; '
            "echo @@secrets; docker secret ls --filter \"label=gpufleet.stack=$1\" --format '{{.Name}}'; "
            "echo @@configs; docker config ls --filter \"label=com.docker.stack.namespace=$1\" "
            "--format '{{.Name}}'; true"
        )
        return StringCommand("sh", "-c", QuoteString(script), "stack", QuoteString(stack))

    def process(self, output):
        return parse_stack_state(output)


class ModelManifests(FactBase):
    """Each model's weights manifest on this host (written by the weights phase), or None.

    .. code:: python

        {"tiny-llama": {"repo_id": "...", "files": [{"path": "model.safetensors", "size": 1}]}}
    """

    def command(self, models_dir: str, names: list[str]) -> StringCommand:
        script = ('d="$1"; shift; for n in "$@"; do echo "@@$n"; '
                  f'cat "$d/$n/{MANIFEST_NAME}" 2>/dev/null || true; echo; done')
        return StringCommand("sh", "-c", QuoteString(script), "manifests", QuoteString(models_dir),
                             *[QuoteString(n) for n in names])

    def process(self, output):
        found: dict[str, Any] = {}
        current = None
        buffers: dict[str, list[str]] = {}
        for line in output:
            if line.startswith("@@"):
                current = line[2:]
                buffers[current] = []
            elif current is not None:
                buffers[current].append(line)
        for name, lines in buffers.items():
            try:
                found[name] = json.loads("\n".join(lines)) if "".join(lines).strip() else None
            except ValueError:
                found[name] = None
        return found


# --- Execution helpers (FunctionCommand bodies) -------------------------------------------------

def wait_converged(state, host, stack: str, timeout_s: int, watched: list[str] | None = None,
                   poll_s: float = 3.0) -> bool:
    """Poll the stack until every service runs its wanted tasks and no update is in progress;
    print progress now and then; fail the host on a rollback or the timeout."""
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    started = time.monotonic()
    while True:
        ok, output = host.run_shell_command(StackState().command(stack), print_output=False,
                                            print_input=False, _sudo=host_sudo(host))
        current = parse_stack_state(output.stdout_lines if ok else [])
        done, progress, failures = convergence(current["services"],
                                               set(watched) if watched is not None else None)
        elapsed = time.monotonic() - started
        if failures:
            for failure in failures:
                host.log_styled(failure, fg="red", log_func=logger.error)
            for line in failed_tasks(host, [svc["name"] for svc in current["services"]]):
                host.log_styled(f"  {line}", fg="red", log_func=logger.error)
            return fail_host(state, host, f"stack {stack}: an update failed and was rolled back; "
                                          "the services run their previous version")
        if done:
            host.log_styled(f"stack {stack} converged in {elapsed:.0f}s: {'; '.join(progress)}")
            return True
        if time.monotonic() > deadline:
            return fail_host(state, host, f"stack {stack} did not converge in {timeout_s}s: "
                                          f"{'; '.join(progress)}")
        if time.monotonic() - last_print > 15:
            host.log_styled(f"waiting for stack {stack} ({elapsed:.0f}s): {'; '.join(progress)}")
            last_print = time.monotonic()
        time.sleep(poll_s)


def failed_tasks(host, services: list[str], limit: int = 6) -> list[str]:
    """The most recent tasks that failed or were rejected, with Swarm's reason: what an operator
    needs to see next to "rolled back"."""
    ok, output = host.run_shell_command(
        StringCommand("docker service ps --no-trunc --format",
                      QuoteString("{{.Name}} on {{.Node}}: {{.CurrentState}}: {{.Error}}"),
                      *[QuoteString(name) for name in services]),
        print_output=False, print_input=False, _sudo=host_sudo(host))
    if not ok:
        return []
    return [line for line in output.stdout_lines if line.rstrip().endswith(":") is False
            and ("Rejected" in line or "Failed" in line)][:limit]


def remove_stale(state, host, kind: str, names: list[str]) -> bool:
    """Remove secrets/configs no service uses any more (after the services rolled off them)."""
    for name in names:
        ok, output = host.run_shell_command(StringCommand("docker", kind, "rm", QuoteString(name)),
                                            print_output=False, _sudo=host_sudo(host))
        if ok:
            host.log_styled(f"removed {kind} {name} (no longer used)")
        else:
            logger.warning(f"{host.print_prefix}{kind} {name} still in use, kept: "
                           + " ".join(output.stderr.split()))
    return True


# --- Operations -----------------------------------------------------------------------------


@operation()
@fails_only_this_host
def stack_deploy(settings, manager: str | None = None):
    """
    Render, check and deploy the inference stack from the acting manager when it differs from
    what runs; wait until it converges; remove secrets and configs it no longer uses.

    + settings: the host's operations.config.Settings
    + manager: the acting manager when it is another host (this host then has nothing to do)

    **Example:**

    .. code:: python

        stack_deploy(name="Deploy the inference stack", settings=settings)
    """
    if manager:
        host.noop(f"done from the acting manager {manager}")
        return
    stack = settings.stack_name
    served = [spec for spec in settings.models if spec.serve]
    listed = read_fact(host, SwarmNodes)
    if listed["error"]:
        if not host.state.is_executing:
            host.noop("the Swarm is formed earlier in this run: the stack is planned when it exists")
            return
        raise OperationError(f"cannot list the Swarm's nodes here: {listed['error']}")
    if host.state.is_executing:
        state = host.state
        managers = {h.name for h in _inventory_hosts(host.inventory)[1]}
        listed = wait_for_nodes(listed, disturbed_nodes(state, managers),
                                lambda name: why_node_down(state, name))
    nodes = [sizing.Node.from_swarm(node) for node in listed["nodes"]]
    manifests = read_fact(host, ModelManifests, models_dir=settings.models_dir,
                              names=[spec.name for spec in served]) if served else {}
    problems = []
    for spec in served:
        problems += sizing.fit_problems(
            spec.name, spec.replicas, spec.tensor_parallel_size, spec.gpu_memory_utilization,
            spec.gpu_model, nodes, sizing.weights_bytes(manifests.get(spec.name)))
        if manifests.get(spec.name) is None:
            problems.append(f"model {spec.name}: no weights in {settings.models_dir}/{spec.name} "
                            "on the acting manager (the weights phase did not complete)")
    if not served:
        host.noop("no model is served (models[].serve): no stack to deploy")
        return
    if problems:
        raise OperationError("the stack cannot be placed: " + "; ".join(problems))

    secrets = wanted_secrets(settings)
    names = {kind: name for kind, (name, _) in secrets.items()}
    gateway_config = gateway.render_gateway(served, nodes, gateway.gateway_listen_port(settings),
                                            settings.stack_gateway_max_body_kb * 1024,
                                            gateway.access_for(settings))
    text = render_stack(settings, nodes, names, gateway_config)
    problems = stack_problems(text)
    if problems:
        raise OperationError("the rendered stack file is invalid: " + "; ".join(problems))

    current = host.get_fact(StackState, stack=stack)
    if current["error"]:
        raise OperationError(f"cannot read the stack here: {current['error']}")

    changed = False
    for kind, (name, value) in sorted(secrets.items()):
        if name not in current["secrets"]:
            changed = True
            explain(f"stack: secret {name} ({kind}) does not exist yet")
            yield FunctionCommand(create_secret, (stack, kind, name, lambda v=value: v), {})
    del secrets

    config_path = posixpath.join(STACK_DIR, f"{stack}.haproxy.cfg")
    stack_path = posixpath.join(STACK_DIR, f"{stack}.yml")
    drain = drain_for(settings)
    uploads = [(config_path, gateway_config), (stack_path, text)]
    if drain:  # before the stack file that names it
        uploads.insert(0, (drain["file"], drain["text"]))
    for command in files.directory._inner(path=STACK_DIR, mode="0755"):
        changed = True
        yield command
    for path, content in uploads:
        said = False
        for command in files.put._inner(src=StringIO(content), dest=path, mode="0644"):
            changed = True
            if not said:
                said = True
                explain(f"stack: {path} differs from the rendered file")
            yield command

    running = {svc["name"]: svc for svc in current["services"]}
    wanted = wanted_services(stack, text)
    differs = {name: why for name, want in sorted(wanted.items())
               if (why := service_drift(name, running.get(name), want))}
    drift = list(differs.values())
    extra = sorted(set(running) - set(wanted))
    if drift or extra:
        for why in drift + [f"{name} is not in the stack file (removed by --prune)" for name in extra]:
            host.log_styled(f"stack: {why}")
            explain(f"stack: {why}")
        yield StringCommand("docker stack deploy --prune --with-registry-auth -c",
                            QuoteString(stack_path), QuoteString(stack))
        yield FunctionCommand(wait_converged, (stack, settings.stack_converge_timeout_s, sorted(differs)), {})
        changed = True
    elif not (steady := convergence(current["services"], watched=set()))[0]:
        # Running the rendered spec but not converged: an update still in progress, or one Swarm
        # paused (a rollback that itself failed): a forced update restarts its tasks.
        explain("stack: not converged: " + "; ".join(steady[1]))
        paused = [svc["name"] for svc in current["services"] if svc["update_state"] in PAUSED]
        for name in paused:
            yield StringCommand("docker service update --detach --force", QuoteString(name))
        yield FunctionCommand(wait_converged, (stack, settings.stack_converge_timeout_s, paused), {})
        changed = True

    stale_secrets = sorted(set(current["secrets"]) - set(names.values()))
    config_names = {f"{stack}_haproxy_{content_hash(gateway_config)}"} | (
        {drain["name"]} if drain else set())
    stale_configs = sorted(set(current["configs"]) - config_names)
    if stale_secrets or stale_configs:
        explain("stack: no longer used, to remove: " + ", ".join(stale_secrets + stale_configs))
    if stale_secrets:
        yield FunctionCommand(remove_stale, ("secret", stale_secrets), {})
        changed = True
    if stale_configs:
        yield FunctionCommand(remove_stale, ("config", stale_configs), {})
        changed = True
    if not changed:
        host.noop(f"stack {stack} runs as rendered: {len(wanted)} service(s) converged")


# --- Phase ----------------------------------------------------------------------------------


@deploy("Inference stack")
def stack(settings) -> PhaseResult:
    """Deploy the stack from the acting manager (the first of swarm_managers in this run)."""
    state = host.state
    _, managers = _inventory_hosts(host.inventory)
    acting = next((h for h in managers if h in state.active_hosts), None)
    if acting is None:
        op = stack_deferred(name="Deploy the inference stack",
                            manager=managers[0].name if managers else "a swarm_managers host")
        return PhaseResult([op])
    via = None if host.name == acting.name else acting.name
    ops = []
    if host in managers:  # the gateway runs on every manager
        ops.append(gateway.gateway_handover(name="Gateway hand-over between tasks "
                                                 f"({gateway.HANDOVER_SYSCTL})"))
    ops.append(stack_deploy(name="Deploy the inference stack", settings=settings, manager=via))
    if via is None:
        ops.append(gateway.gateway_strays(name="Gateway tasks only on managers",
                                          service=f"{settings.stack_name}_gateway"))
    return PhaseResult(ops)


@operation()
def stack_deferred(manager: str):
    """
    Nothing to change: the stack is deployed from a Swarm manager, which is not in this run
    (--limit); the next run that includes one deploys it.

    + manager: the first of swarm_managers

    **Example:**

    .. code:: python

        stack_deferred(name="Deploy the inference stack", manager="gpu-01")
    """
    host.noop(f"the stack is deployed from a Swarm manager ({manager}), not in this run (--limit)")
    return
    yield  # pragma: no cover - a generator that yields nothing


