"""Docker Swarm: one Swarm per fleet, initialised on the first manager, every other host joined
with a join token read from a manager at execution time, every node labelled from its facts.

Who is who:
- `swarm_managers` (inventory group, 1, 3 or 5 members of `gpu_nodes`) are the managers; the
  first of them in inventory order initialises the Swarm when no manager is in one yet.
- The fleet's Swarm is the one the first manager (inventory order) that *is* a Swarm manager
  belongs to. A host in any other Swarm is refused (the host fails with the reason) unless its
  data says `swarm_takeover: true` (it then leaves that Swarm with --force and joins ours).
- The acting manager is the first manager in inventory order that is in this run: cluster-level
  changes (roles, labels, drains, node removals) run there, and only for hosts in this run.

Join tokens never leave memory: the token is read from the manager (`docker swarm join-token
-q`, output not printed) inside the joining host's FunctionCommand, and handed to that host's
Docker Engine API on the SSH channel's stdin (`docker system dial-stdio` proxies stdin to the
engine socket). It is never on a command line (so never in `ps`), never in a file, never logged.

--limit: pyinfra 3.10 has no delegation (an operation belongs to the host it was planned for)
and `_run_once` only picks the first host of the run. So a host outside the run is never
changed: a new worker deployed with `--limit node-4` joins (the token is *read* from the manager,
which changes nothing there) and its labels wait for the next run that includes a manager; the
limited run says so with a noop. `--limit node-1,node-4` labels it at once.

Retiring (`swarm_retire: true`, not allowed for a member of `swarm_managers`): the acting manager
drains the node and waits for its running tasks to stop, the host leaves, the manager removes
the node. A node in the Swarm that no inventory host accounts for is reported, never removed.

Facts: `SwarmInfo` on every host (`docker info --format '{{json .Swarm}}'`), `SwarmNodes` on the
acting manager (`docker node ls -q` + `docker node inspect`), each once while planning and once
while executing per operation that reads it.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable

from pyinfra import host, logger
from pyinfra.api import FactBase, FunctionCommand, QuoteString, StringCommand, deploy, operation

from operations import gpu_health
from operations.gpu_health import GpuHealth
from operations.nvidia import NvidiaHost
from operations.phase import (
    PhaseResult, explain, fail_host, finding, host_sudo, on_other_host, other_host_fact, read_fact,
    unreachable,
)

LABEL_PREFIX = "gpufleet."
LABEL_HOST = "gpufleet.host"  # the inventory name: finds a node whose host has left
LABEL_INVENTORY_KEYS = "gpufleet.labels"  # the swarm_node_labels keys set, for later removal
LABEL_GPU_COUNT = "gpufleet.gpu.count"
LABEL_GPU_MODEL = "gpufleet.gpu.model"
LABEL_GPU_MEMORY = "gpufleet.gpu.memory-mib"
LABEL_GPU_DRIVER = "gpufleet.gpu.driver"

SWARM_PORT = 2377
MANAGER_COUNTS = (1, 3, 5)
NODE_DOWN_TIMEOUT_S = 60

DRAIN_TIMEOUT_S = 300

# The engine API's join, fed on stdin: the token is in the request body, never in argv.
JOIN_SCRIPT = (
    "resp=$(docker system dial-stdio) || exit 1; "
    "code=$(printf '%s\\n' \"$resp\" | head -n1 | cut -d' ' -f2); "
    "if [ \"$code\" = 200 ]; then echo 'joined the Swarm'; "
    "else echo \"Swarm join refused (HTTP $code): $(printf '%s\\n' \"$resp\" | tail -n1)\" >&2; "
    "exit 1; fi"
)


# --- Pure logic -----------------------------------------------------------------------------


def manager_group_problems(
    managers: list[str], gpu_nodes: list[str], retiring: set[str] | None = None
) -> list[str]:
    """What is wrong with the swarm_managers group (empty: nothing)."""
    problems = []
    if len(managers) not in MANAGER_COUNTS:
        problems.append(
            f"swarm_managers has {len(managers)} host(s): it needs 1, 3 or 5 (an odd number "
            "keeps a Raft majority when one manager is lost)"
        )
    if len(set(managers)) != len(managers):
        problems.append("swarm_managers names a host twice")
    outside = [name for name in managers if name not in gpu_nodes]
    if outside:
        problems.append(f"swarm_managers names hosts not in gpu_nodes: {', '.join(outside)}")
    leaving = [name for name in managers if name in (retiring or set())]
    if leaving:
        problems.append(
            f"{', '.join(leaving)}: swarm_retire is set on a member of swarm_managers; move it "
            "out of swarm_managers first (it is demoted), then retire it"
        )
    return problems


def advertise_address(explicit: str | None, ssh_hostname: str | None, primary: str | None):
    """The address a node advertises: the key, else the address pyinfra connects to when it
    is an IP address, else the host's primary address (source of its default route)."""
    if explicit:
        return explicit
    if ssh_hostname:
        try:
            return str(ipaddress.ip_address(ssh_hostname))
        except ValueError:
            pass
    return primary or None


def parse_swarm_info(lines: list[str]) -> dict[str, Any]:
    """Parse the SwarmInfo fact output; never raises."""
    info: dict[str, Any] = {
        "available": False, "error": None, "state": None, "node_id": None, "node_addr": None,
        "is_manager": False, "cluster_id": None, "remote_managers": [],
        "primary_address": None,
    }
    for line in lines:
        if line.startswith("primary="):
            info["primary_address"] = line.partition("=")[2].strip() or None
        elif line.startswith("swarm="):
            text = line.partition("=")[2].strip()
            try:
                swarm = json.loads(text)
            except ValueError:
                info["error"] = text or "docker info gave no output"
                continue
            if not isinstance(swarm, dict):
                info["error"] = text
                continue
            info["available"] = True
            info["state"] = swarm.get("LocalNodeState") or "inactive"
            info["node_id"] = swarm.get("NodeID") or None
            info["node_addr"] = swarm.get("NodeAddr") or None
            info["is_manager"] = bool(swarm.get("ControlAvailable"))
            # Only managers see the cluster; a worker knows its managers' NodeIDs.
            info["cluster_id"] = (swarm.get("Cluster") or {}).get("ID") or None
            info["remote_managers"] = sorted(
                item.get("NodeID", "") for item in swarm.get("RemoteManagers") or []
            )
            if swarm.get("Error"):
                info["error"] = swarm["Error"]
        elif line.startswith("error="):
            info["error"] = line.partition("=")[2].strip()
    return info


def parse_swarm_nodes(lines: list[str]) -> dict[str, Any]:
    """Parse the SwarmNodes fact output (`docker node inspect` JSON); never raises."""
    text = "\n".join(lines).strip()
    try:
        raw = json.loads(text) if text else None
    except ValueError:
        raw = None
    if not isinstance(raw, list):
        return {"error": text or "no output from docker node inspect", "nodes": []}
    nodes = []
    for item in raw:
        spec = item.get("Spec") or {}
        status = item.get("Status") or {}
        manager = item.get("ManagerStatus")
        nodes.append({
            "id": item.get("ID", ""),
            "hostname": (item.get("Description") or {}).get("Hostname", ""),
            "role": spec.get("Role", "worker"),
            "availability": spec.get("Availability", "active"),
            "labels": dict(spec.get("Labels") or {}),
            "state": status.get("State", "unknown"),
            "addr": status.get("Addr", ""),
            "leader": bool((manager or {}).get("Leader")),
            "reachability": (manager or {}).get("Reachability"),
            "memory_bytes": int(((item.get("Description") or {}).get("Resources") or {})
                                .get("MemoryBytes") or 0),
        })
    return {"error": None, "nodes": sorted(nodes, key=lambda node: node["hostname"])}


def gpu_labels(nvidia: dict[str, Any]) -> dict[str, str]:
    """The project's labels from a host's NvidiaHost fact: GPU count, model(s), the smallest
    GPU's memory and the loaded driver. A label with nothing true to say is left out."""
    gpus = nvidia.get("gpus") or []
    labels = {LABEL_GPU_COUNT: str(len(gpus))}
    models = sorted({gpu["name"] for gpu in gpus if gpu.get("name")})
    if models:
        labels[LABEL_GPU_MODEL] = ",".join(models)
    memory = [gpu["memory_mib"] for gpu in gpus if gpu.get("memory_mib")]
    if memory:
        labels[LABEL_GPU_MEMORY] = str(min(memory))
    driver = (nvidia.get("driver") or {}).get("loaded_version")
    if driver and gpus:
        labels[LABEL_GPU_DRIVER] = driver
    return labels


def serving_view(other) -> dict[str, Any]:
    """Another host's NvidiaHost fact as Swarm should see it: only the GPUs it advertises (the
    unhealthy ones left out when that host's gpu_health_keep_out holds), so that the GPU count
    the stack is sized by is the count a task can be given."""
    keep_out = other.data.get("gpu_health_keep_out", True)
    return gpu_health.serving_view(other_host_fact(other, NvidiaHost),
                                   other_host_fact(other, GpuHealth) if keep_out else None)


def wanted_labels(name: str, nvidia: dict[str, Any], inventory: dict[str, str]) -> dict[str, str]:
    """Every label the project wants on a node: GPU facts, the inventory's own labels, the
    host's inventory name, and which inventory keys were set (so a dropped one is removed)."""
    labels = {LABEL_HOST: name, **gpu_labels(nvidia), **inventory}
    if inventory:
        labels[LABEL_INVENTORY_KEYS] = ",".join(sorted(inventory))
    return labels


def label_changes(current: dict[str, str], wanted: dict[str, str]):
    """(labels to add or change, label keys to remove): the project's labels (gpufleet.*, and
    the inventory keys recorded in gpufleet.labels) that are no longer true go; any other
    label is never touched."""
    recorded = {key for key in current.get(LABEL_INVENTORY_KEYS, "").split(",") if key}
    managed = {key for key in current if key.startswith(LABEL_PREFIX) or key in recorded}
    add = {key: value for key, value in sorted(wanted.items()) if current.get(key) != value}
    remove = sorted(managed - set(wanted))
    return add, remove


def find_node(nodes: list[dict[str, Any]], name: str, node_id: str | None):
    """The node of an inventory host: by its own NodeID, else by the gpufleet.host label."""
    for node in nodes:
        if node_id and node["id"] == node_id:
            return node
    for node in nodes:
        if node["labels"].get(LABEL_HOST) == name:
            return node
    return None


def plan_roles(nodes: list[dict[str, Any]], hosts: dict[str, dict[str, Any]]):
    """(node IDs to promote, to demote, refusals) for the hosts in this run (`hosts`: name ->
    {"node_id", "manager": wanted}). Promotions first; a demotion that would leave no
    reachable manager is refused."""
    promote, demote, refusals = [], [], []
    reachable = {
        n["id"] for n in nodes if n["role"] == "manager" and n["reachability"] == "reachable"
    }
    for name, wanted in sorted(hosts.items()):
        node = find_node(nodes, name, wanted.get("node_id"))
        if node is None:
            continue
        if wanted["manager"] and node["role"] != "manager":
            promote.append((name, node["id"]))
            reachable.add(node["id"])
    for name, wanted in sorted(hosts.items()):
        node = find_node(nodes, name, wanted.get("node_id"))
        if node is None or wanted["manager"] or node["role"] != "manager":
            continue
        if reachable - {node["id"]}:
            demote.append((name, node["id"]))
            reachable.discard(node["id"])
        else:
            refusals.append(f"{name} is the last reachable manager: not demoted")
    return promote, demote, refusals


def unknown_nodes(nodes: list[dict[str, Any]], known_ids: set[str], names: set[str]):
    """Nodes no inventory host accounts for: not its NodeID, nor its gpufleet.host label, nor
    (a host that joined in a --limit run and is not labelled yet) its hostname."""
    return [
        node for node in nodes
        if node["id"] not in known_ids and node["labels"].get(LABEL_HOST) not in names
        and node.get("hostname") not in names
    ]


def join_request(token: str, advertise: str | None, remote: str, listen_port: int = SWARM_PORT):
    """The raw HTTP request of the engine API's POST /swarm/join (the body ends in a newline,
    counted in Content-Length: pyinfra's stdin writer ends every chunk with one)."""
    body = {
        "ListenAddr": f"0.0.0.0:{listen_port}",
        "RemoteAddrs": [remote],
        "JoinToken": token,
    }
    if advertise:
        body["AdvertiseAddr"] = advertise
    payload = json.dumps(body) + "\n"
    return (
        "POST /swarm/join HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload.encode())}\r\nConnection: close\r\n\r\n{payload}"
    )


def membership(info: dict[str, Any], fleet: dict[str, Any] | None) -> str:
    """"member" (of the fleet's Swarm), "absent" (in none), "other" (in another Swarm) or
    "unknown" (the engine does not answer yet). A manager is told by its cluster ID; a worker,
    which does not see the cluster, by its managers' NodeIDs."""
    if not info["available"]:
        return "unknown"
    if info["state"] == "inactive":
        return "absent"
    if fleet and info["state"] == "active":
        if info["cluster_id"] == fleet["cluster_id"]:
            return "member"
        if not info["cluster_id"] and fleet["node_id"] in info["remote_managers"]:
            return "member"
    return "other"


def _value(value):
    return value() if callable(value) else value


# --- Facts ----------------------------------------------------------------------------------


class SwarmInfo(FactBase):
    """This host's view of Swarm (`docker info`'s .Swarm) and its primary address; never fails.

    .. code:: python

        {"available": True, "state": "active", "node_id": "x1...", "node_addr": "10.20.0.11",
         "is_manager": True, "cluster_id": "k9...", "error": None,
         "primary_address": "10.20.0.11"}
    """

    def command(self) -> str:
        return (
            "echo \"primary=$(ip -o -4 route get 1.1.1.1 2>/dev/null | "
            "sed -n 's/.* src \\([0-9.]*\\).*/\\1/p')\"; "
            "out=$(docker info --format '{{json .Swarm}}' 2>&1) && printf 'swarm=%s\\n' \"$out\" "
            "|| printf 'error=%s\\n' \"$(printf '%s' \"$out\" | tr '\\n' ' ')\"; true"
        )

    def process(self, output):
        return parse_swarm_info(output)


class SwarmNodes(FactBase):
    """The Swarm's nodes as a manager sees them (`docker node inspect` of `docker node ls -q`);
    never fails: on a host that is not a manager, `error` says why.

    .. code:: python

        {"error": None, "nodes": [{"id": "x1...", "hostname": "gpu-01", "role": "manager",
          "availability": "active", "labels": {"gpufleet.gpu.count": "8"}, "state": "ready",
          "addr": "10.20.0.11", "leader": True, "reachability": "reachable"}]}
    """

    def command(self) -> str:
        return (
            "ids=$(docker node ls -q 2>&1) || { echo \"$ids\"; exit 0; }; "
            "docker node inspect $ids 2>&1; true"
        )

    def process(self, output):
        return parse_swarm_nodes(output)


# --- Operations -----------------------------------------------------------------------------


# Swarm writes a node object with optimistic concurrency: an update made against a version that
# another update has just replaced fails with "update out of sequence" (seen on the lab: demoting
# a manager whose node had just rejoined and updated its own object). Such a write is retried, up
# to five times a second apart; any other error fails at once.
_NODE_WRITE_SCRIPT = (
    'for try in 1 2 3 4 5; do out=$("$@" 2>&1) && exit 0; '
    'case "$out" in *"update out of sequence"*) sleep 1 ;; *) break ;; esac; done; '
    'printf "%s\\n" "$out" >&2; exit 1'
)


def node_write(*args) -> StringCommand:
    """`docker node promote|demote|update ...` (each word its own argument), retried while
    Swarm answers "update out of sequence"."""
    return StringCommand("sh -c", QuoteString(_NODE_WRITE_SCRIPT), "node-write", "docker",
                         "node", *args)


def _fail(reason: str) -> FunctionCommand:
    return FunctionCommand(fail_host, (reason,), {})


def _other_swarm_reason(info: dict[str, Any]) -> str:
    role = "manager" if info["is_manager"] else "worker"
    return (
        f"this host is a {role} of another Swarm (state {info['state']}, managers "
        f"{', '.join(m[:12] for m in info['remote_managers']) or '?'}): left alone. "
        "Make it leave by hand, or set swarm_takeover: true"
    )


@operation()
def swarm_init(advertise: str | None, fleet: dict | Callable | None = None, takeover: bool = False):
    """
    Initialise the Swarm on this host (the first manager) when no manager of the fleet is in
    one. A host already managing the fleet's Swarm gets no command.

    + advertise: the address this node advertises (None: Docker's choice)
    + fleet: the fleet's Swarm ({"cluster_id", "manager", "node_id", "addr"}) or None, or a function
      returning it at execution time
    + takeover: a host in another Swarm leaves it (--force) instead of failing

    **Example:**

    .. code:: python

        swarm_init(name="Initialise the Swarm", advertise="10.20.0.11", fleet=None)
    """
    info = read_fact(host, SwarmInfo)
    fleet = _value(fleet)
    if fleet is not None:
        if membership(info, fleet) == "member":
            host.noop(f"manages Swarm {fleet['cluster_id'][:12]}")
        else:
            host.noop(f"Swarm {fleet['cluster_id'][:12]} exists (manager {fleet['manager']})")
        return
    state = membership(info, None)
    if state == "other":
        if not takeover:
            yield _fail(_other_swarm_reason(info))
            return
        yield "docker swarm leave --force"
    args = ["docker swarm init"]
    if advertise:
        args += ["--advertise-addr", QuoteString(advertise)]
    yield StringCommand(*args)


def _run_on(other, command: StringCommand):
    with on_other_host(other):
        return other.run_shell_command(
            command, print_output=False, print_input=False, _sudo=host_sudo(other)
        )


def join_with_token(state, host, role: str, manager: str, advertise: str | None) -> bool:
    """FunctionCommand body: read the join token from `manager`, join through the engine API
    with the request on stdin. The token lives only in this function's memory."""
    other = state.inventory.get_host(manager)
    if other is None:
        return fail_host(state, host, f"Swarm join: no inventory host {manager}")
    try:
        info = _info(other)
        if not info["is_manager"] or not info["node_addr"]:
            return fail_host(state, host, f"Swarm join: {manager} manages no Swarm")
        ok, output = _run_on(other, StringCommand("docker swarm join-token -q", role))
    except Exception as error:  # a connection failure: one clean line, no traceback
        return fail_host(state, host, f"Swarm join: cannot reach {manager}: {type(error).__name__}")
    token = output.stdout.strip() if ok else ""
    if not token:
        return fail_host(state, host, f"Swarm join: {manager} gave no {role} join token")
    request = join_request(token, advertise, f"{info['node_addr']}:{SWARM_PORT}")
    del token
    ok, output = host.run_shell_command(
        StringCommand("sh -c", QuoteString(JOIN_SCRIPT)),
        print_output=False, print_input=False, _stdin=[request],
        _sudo=host_sudo(host),
    )
    del request
    if not ok:
        return fail_host(state, host, " ".join(output.stderr.split()) or "Swarm join failed")
    return True


@operation()
def swarm_join(
    role: str,
    manager: str,
    advertise: str | None = None,
    fleet: dict | Callable | None = None,
    takeover: bool = False,
):
    """
    Join the fleet's Swarm as ``role`` through ``manager``; the join token is read from the
    manager when the command runs and handed to this host's engine on stdin (never on a
    command line, in a file or in a log). A member of the fleet's Swarm gets no command; a
    host in another Swarm fails with the reason unless ``takeover``.

    + role: "manager" or "worker"
    + manager: inventory name of the manager to read the token from
    + advertise: the address this node advertises (None: Docker's choice)
    + fleet: the fleet's Swarm ({"cluster_id", "manager", "node_id", "addr"}) or None (not
      initialised yet), or a function returning it at execution time
    + takeover: leave another Swarm (--force) instead of failing

    **Example:**

    .. code:: python

        swarm_join(name="Join the Swarm", role="worker", manager="gpu-01", advertise="10.20.0.14")
    """
    info = read_fact(host, SwarmInfo)
    fleet = _value(fleet)
    state = membership(info, fleet)
    if state == "member":
        current = "manager" if info["is_manager"] else "worker"
        host.noop(f"in Swarm {fleet['cluster_id'][:12]} as a {current}")
        return
    if state == "other":
        if not takeover:
            yield _fail(_other_swarm_reason(info))
            return
        yield "docker swarm leave --force"
    yield FunctionCommand(join_with_token, (role, manager, advertise), {})


@operation()
def swarm_roles(hosts: dict | Callable, manager: str | None = None):
    """
    Promote the hosts of swarm_managers that are workers, demote the other hosts that are
    managers, never the last reachable manager. Runs on the acting manager, for hosts in
    this run only.

    + hosts: name -> {"node_id", "manager": wanted}, or a function returning it
    + manager: the acting manager when it is another host (this host then has nothing to do)

    **Example:**

    .. code:: python

        swarm_roles(name="Swarm roles", hosts={"gpu-02": {"node_id": "x2", "manager": True}})
    """
    if manager:
        host.noop(f"done from the acting manager {manager}")
        return
    nodes = read_fact(host, SwarmNodes)
    if nodes["error"]:
        yield _fail(f"cannot list the Swarm's nodes here: {nodes['error']}")
        return
    promote, demote, refusals = plan_roles(nodes["nodes"], _value(hosts))
    for _, node_id in promote:
        yield node_write("promote", node_id)
    for _, node_id in demote:
        yield node_write("demote", node_id)
    if refusals:
        logger.warning(f"{host.print_prefix}{'; '.join(refusals)}")
    if not promote and not demote:
        host.noop("every node has its role" + (f" ({'; '.join(refusals)})" if refusals else ""))


@operation()
def swarm_labels(nodes: dict | Callable, manager: str | None = None):
    """
    Set the project's node labels (gpufleet.*, and the inventory's swarm_node_labels) where
    they differ, and remove the project's labels that are no longer true; other labels are
    never touched. Runs on the acting manager (``docker node update``).

    + nodes: name -> {"node_id", "labels": wanted}, or a function returning it
    + manager: the acting manager when it is another host (this host then has nothing to do)

    **Example:**

    .. code:: python

        swarm_labels(name="Swarm node labels",
                     nodes={"gpu-01": {"node_id": "x1", "labels": {"gpufleet.gpu.count": "8"}}})
    """
    if manager:
        host.noop(f"done from the acting manager {manager}")
        return
    listed = read_fact(host, SwarmNodes)
    if listed["error"]:
        yield _fail(f"cannot list the Swarm's nodes here: {listed['error']}")
        return
    nodes = _value(nodes)
    unchanged, absent = [], []
    for name, wanted in sorted(nodes.items()):
        node = find_node(listed["nodes"], name, wanted.get("node_id"))
        if node is None:
            absent.append(name)
            continue
        add, remove = label_changes(node["labels"], wanted["labels"])
        if not add and not remove:
            unchanged.append(name)
            continue
        changes = [f"set {key}={value}" for key, value in add.items()]
        explain(f"node {name}: " + ", ".join(changes + [f"remove {key}" for key in remove]),
                about=name)
        args: list[Any] = ["update"]
        for key, value in add.items():
            args += ["--label-add", QuoteString(f"{key}={value}")]
        for key in remove:
            args += ["--label-rm", QuoteString(key)]
        yield node_write(*args, node["id"])
    if len(unchanged) + len(absent) == len(nodes):
        note = f"labels as wanted on {', '.join(unchanged) or 'no node'}"
        if absent:
            note += f"; not in the Swarm: {', '.join(absent)}"
        host.noop(note)


@operation(is_idempotent=False)
def swarm_drain(
    nodes: dict | Callable,
    timeout: int = DRAIN_TIMEOUT_S,
    manager: str | None = None,
):
    """
    Drain the nodes of retiring hosts and wait (bounded) until no task runs on them. A node no
    longer in the Swarm gets no command.

    + nodes: name -> {"node_id"} of the retiring hosts, or a function returning it
    + timeout: seconds to wait for a node's tasks to stop
    + manager: the acting manager when it is another host (this host then has nothing to do)

    **Example:**

    .. code:: python

        swarm_drain(name="Drain retiring nodes", nodes={"gpu-04": {"node_id": "x4"}})
    """
    if manager:
        host.noop(f"done from the acting manager {manager}")
        return
    listed = read_fact(host, SwarmNodes)
    found = []
    for name, wanted in sorted(_value(nodes).items()):
        node = None if listed["error"] else find_node(listed["nodes"], name, wanted.get("node_id"))
        if node is None:
            continue
        found.append(name)
        if node["availability"] != "drain":
            yield node_write("update", "--availability", "drain", node["id"])
        wait = (
            f"until [ -z \"$(docker node ps {node['id']} --format '{{{{.CurrentState}}}}' "
            "| grep '^Running')\" ]; do sleep 2; done"
        )
        yield StringCommand(
            "timeout", str(int(timeout)), "sh -c", QuoteString(wait),
            "|| { echo", QuoteString(f"tasks still running on {name} after {timeout}s"),
            ">&2; exit 1; }",
        )
    if not found:
        host.noop("no retiring node is in the Swarm")


@operation()
def swarm_leave(manager_in_run: bool = True):
    """
    Leave the Swarm (a retiring host, already drained by the acting manager). A host not in a
    Swarm gets no command; a manager is refused (move it out of swarm_managers first).

    + manager_in_run: whether a manager is in this run to drain and remove the node

    **Example:**

    .. code:: python

        swarm_leave(name="Leave the Swarm (retiring)")
    """
    info = read_fact(host, SwarmInfo)
    if info["available"] and info["state"] == "inactive":
        host.noop("retired: not in a Swarm")
        return
    if not manager_in_run:
        yield _fail(
            "swarm_retire needs a manager in this run to drain and remove the node: "
            "include a member of swarm_managers in --limit"
        )
        return
    if info["is_manager"]:
        yield _fail("still a Swarm manager: not leaving (it must be demoted first)")
        return
    yield "docker swarm leave"


@operation()
def swarm_remove(nodes: dict | Callable, manager: str | None = None):
    """
    Remove retired nodes from the managers' list once they are down (bounded wait). Never a
    manager.

    + nodes: name -> {"node_id"} of the retiring hosts, or a function returning it
    + manager: the acting manager when it is another host (this host then has nothing to do)

    **Example:**

    .. code:: python

        swarm_remove(name="Remove retired nodes", nodes={"gpu-04": {"node_id": "x4"}})
    """
    if manager:
        host.noop(f"done from the acting manager {manager}")
        return
    listed = read_fact(host, SwarmNodes)
    removed = False
    for name, wanted in sorted(_value(nodes).items()):
        node = None if listed["error"] else find_node(listed["nodes"], name, wanted.get("node_id"))
        if node is None or node["role"] == "manager":
            continue
        removed = True
        wait = (
            f"until [ \"$(docker node inspect -f '{{{{.Status.State}}}}' {node['id']})\" = down ]; "
            "do sleep 1; done"
        )
        yield StringCommand(
            "timeout", str(NODE_DOWN_TIMEOUT_S), "sh -c", QuoteString(wait),
            "&& docker node rm", node["id"],
        )
    if not removed:
        host.noop("no retired node left in the Swarm")


@operation()
def swarm_report(known_ids: list | Callable, names: list, manager: str | None = None):
    """
    Report (warning) nodes of the Swarm that no inventory host accounts for; never changes or
    removes them.

    + known_ids: NodeIDs of the inventory's hosts, or a function returning them
    + names: every inventory host name
    + manager: the acting manager when it is another host (this host then has nothing to do)

    **Example:**

    .. code:: python

        swarm_report(name="Swarm nodes outside the inventory", known_ids=["x1"], names=["gpu-01"])
    """
    if manager:
        host.noop(f"done from the acting manager {manager}")
        return
    listed = read_fact(host, SwarmNodes)
    strangers = unknown_nodes(listed["nodes"], set(_value(known_ids)), set(names))
    if not strangers:
        host.noop(f"{len(listed['nodes'])} node(s), all from the inventory")
        return
    text = ", ".join(
        f"{n['hostname']} ({n['id'][:12]}, {n['role']}, {n['state']})" for n in strangers
    )
    # Said once per run, in the stage whose output the operator reads: while planning when
    # pyinfra shows changes before asking, while executing under -y (pyinfra then runs the
    # operation only once, at execution, and prints no noop reasons).
    # (pyinfra-testing's FakeState has neither: it plans, as pyinfra does before asking.)
    executing = getattr(host.state, "is_executing", False)
    checking = getattr(host.state, "should_check_for_changes", lambda: True)()
    if executing != checking:
        logger.warning(f"{host.print_prefix}Swarm nodes not in the inventory (left alone): {text}")
    finding(f"nodes not in the inventory, left alone: {text}")
    return
    yield  # pragma: no cover - a generator that yields nothing


@operation()
def swarm_deferred(manager: str):
    """
    Nothing to change: roles, labels and retirement of this node are done from a manager, which
    is not in this run (--limit); the next run that includes one does them.

    + manager: the acting manager of a full run

    **Example:**

    .. code:: python

        swarm_deferred(name="Swarm node labels", manager="gpu-01")
    """
    host.noop(
        f"node labels and roles are applied from a Swarm manager ({manager}), which is not in "
        "this run (--limit): the next run that includes it applies them"
    )
    return
    yield  # pragma: no cover - a generator that yields nothing


# --- Phase ----------------------------------------------------------------------------------


def _inventory_hosts(inventory) -> tuple[list, list]:
    gpu_nodes = list(inventory.get_group("gpu_nodes", []) or [])
    managers = list(inventory.get_group("swarm_managers", []) or [])
    order = {h.name: i for i, h in enumerate(inventory)}
    return (sorted(gpu_nodes, key=lambda h: order[h.name]),
            sorted(managers, key=lambda h: order[h.name]))


def _info(other) -> dict[str, Any]:
    return other_host_fact(other, SwarmInfo)


def fleet_swarm(managers) -> dict[str, Any] | None:
    """The fleet's Swarm: that of the first manager (inventory order) that is a Swarm manager."""
    for other in managers:
        if unreachable(other):  # pyinfra said so when it could not connect: not again per read
            continue
        try:
            info = _info(other)
        except Exception as error:  # unreachable: the next manager may answer
            logger.warning(f"Swarm: cannot read {other.name}: {error!r}")
            continue
        if info["is_manager"] and info["state"] == "active" and info["cluster_id"]:
            return {"cluster_id": info["cluster_id"], "manager": other.name,
                    "node_id": info["node_id"], "addr": info["node_addr"]}
    return None


@deploy("Docker Swarm")
def swarm(settings) -> PhaseResult:
    """Init, join, roles, labels, retirement and the report of strangers. Returns whether
    anything changed."""
    state = host.state
    inventory = host.inventory
    gpu_nodes, managers = _inventory_hosts(inventory)
    retiring = {h.name for h in gpu_nodes if h.data.get("swarm_retire", False)}
    problems = manager_group_problems(
        [h.name for h in managers], [h.name for h in gpu_nodes], retiring
    )
    if problems:
        refused = swarm_refuse(name="Swarm managers are valid", reason="; ".join(problems))
        return PhaseResult([refused])

    def in_run():
        # Asked when the operations run: a host that failed earlier in this run (preflight, a
        # forbidden reboot) is no longer active, and its facts (which need sudo) are not read.
        return [h for h in gpu_nodes if h in state.active_hosts]

    acting = next((h for h in managers if h in state.active_hosts), None)
    first = managers[0]
    retire = settings.swarm_retire
    takeover = settings.swarm_takeover
    info = read_fact(host, SwarmInfo)
    address = advertise_address(
        settings.swarm_advertise_address, host.data.get("ssh_hostname"),
        info["primary_address"],
    )

    def fleet():
        return fleet_swarm(managers)

    ops = []
    if not retire:
        if host.name == first.name:
            ops.append(swarm_init(name="Initialise the Swarm (first manager)", advertise=address,
                                  fleet=fleet, takeover=takeover))
        elif host in managers:
            ops.append(swarm_join(name="Join the Swarm as a manager", role="manager",
                                  manager=first.name, advertise=address, fleet=fleet,
                                  takeover=takeover, _serial=True))
        else:
            ops.append(swarm_join(name="Join the Swarm as a worker", role="worker",
                                  manager=first.name, advertise=address, fleet=fleet,
                                  takeover=takeover))

    def run_hosts(select):
        wanted = {}
        for other in in_run():
            if not select(other):
                continue
            try:
                node_id = _info(other)["node_id"]
            except Exception:
                node_id = None
            wanted[other.name] = {"node_id": node_id}
        return wanted

    def roles():
        wanted = run_hosts(lambda h: h.name not in retiring)
        for name in wanted:
            wanted[name]["manager"] = any(m.name == name for m in managers)
        return wanted

    def labels():
        wanted = run_hosts(lambda h: h.name not in retiring)
        for other in in_run():
            if other.name in wanted:
                wanted[other.name]["labels"] = wanted_labels(
                    other.name, serving_view(other),
                    dict(other.data.get("swarm_node_labels", {}) or {}),
                )
        return wanted

    def leaving():
        return run_hosts(lambda h: h.name in retiring)

    def known():
        return [v["node_id"] for v in run_hosts(lambda h: True).values() if v["node_id"]]

    # Every host plans the same operations in the same order (those of the acting manager do
    # the work, the others say where it is done): pyinfra orders operations of different hosts
    # by their place in each host's own sequence first, so a retiring host's leave can only
    # follow the drain if both hosts share it.
    if acting is None:
        ops.append(swarm_deferred(name="Swarm node labels", manager=first.name))
    else:
        via = None if host.name == acting.name else acting.name
        ops.append(swarm_roles(name="Swarm roles (swarm_managers)", hosts=roles, manager=via))
        ops.append(swarm_labels(name="Swarm node labels", nodes=labels, manager=via))
        if any(h.name in retiring for h in in_run()):
            ops.append(swarm_drain(name="Drain retiring nodes", nodes=leaving, manager=via,
                                   timeout=settings.swarm_drain_timeout_s))
    if retire:
        ops.append(swarm_leave(name="Leave the Swarm (swarm_retire)",
                               manager_in_run=acting is not None))
    if acting is not None:
        if any(h.name in retiring for h in in_run()):
            ops.append(swarm_remove(name="Remove retired nodes", nodes=leaving, manager=via))
        ops.append(swarm_report(name="Swarm nodes outside the inventory", known_ids=known,
                                names=[h.name for h in inventory], manager=via))
    return PhaseResult(ops)


@operation()
def swarm_refuse(reason: str):
    """
    Fail this host with ``reason`` (an invalid swarm_managers group): nothing is changed.

    + reason: why

    **Example:**

    .. code:: python

        swarm_refuse(name="Swarm managers are valid", reason="swarm_managers has 2 host(s)")
    """
    yield _fail(reason)
