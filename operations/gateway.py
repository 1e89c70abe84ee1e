"""The gateway's HAProxy configuration, rendered from the served models, the Swarm's nodes and
the gateway's access settings (operations/gateway_access.py): routes by model, checks each
engine task's health, maps a client's key to its name, limits rates, speaks TLS, and lets the
operator's own tools reach one engine task by name (pinning). The rendering is pure: the stack
phase ships its result as a Swarm config named by its content hash. One operation lives here
too, the manager setting the gateway's roll relies on (gateway_handover, below), and the one
that stops a gateway task Swarm left on a node that is no longer a manager (gateway_strays).

What a request meets, in order (templates/haproxy.cfg.j2):
1. TLS (when configured); the gateway's own /health, open to anyone (a load balancer's probe);
2. the client: the key after "Bearer " looked up in the gateway_clients map; none or unknown on
   /v1/: 401. A rate-limited client over its requests per minute: 429;
3. X-Gpufleet-Pin "<served name>@<node>", the operator's alone (403 for any other client): that
   engine task, no retry elsewhere, its answer marked X-Gpufleet-Server;
4. /v1/models answered by the gateway; otherwise the model's backend (by "model" in the body when
   several are served), where the client's Authorization is replaced by the internal key.

    text = render_gateway(served, nodes, listen_port=8080, access=GatewayAccess(tls=True))

Rolling the gateway refuses no connection: on the host network a new gateway task starts beside
the old one (start-first) and binds the same port (HAProxy sets SO_REUSEPORT); the old one then
stops gracefully (SIGUSR1: it stops listening, finishes what it has). Connections the kernel had
queued on the old listener are moved to the new one by net.ipv4.tcp_migrate_req (Linux 5.14+),
which `gateway_handover` sets on every manager.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pyinfra import host
from pyinfra.api import FactBase, QuoteString, StringCommand, operation
from pyinfra.facts.server import Sysctl
from pyinfra.operations import server

from operations import engines, gateway_access, sizing
from operations.gateway_access import OPERATOR_CLIENT, PIN_HEADER, SERVER_HEADER
from operations.phase import explain, read_fact

HANDOVER_SYSCTL = "net.ipv4.tcp_migrate_req"
HANDOVER_FILE = "/etc/sysctl.d/60-gpufleet-gateway.conf"

# The gateway's ports inside its container when Swarm's routing mesh publishes them
# (unprivileged: HAProxy's image runs as a non-root user); on the host network it listens on
# stack_gateway_port (and stack_gateway_http_redirect_port) itself.
GATEWAY_CONTAINER_PORT = 8080
REDIRECT_CONTAINER_PORT = 8081
DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # group_data: stack_gateway_max_body_kb = 1024
# Room in HAProxy's request buffer beside the body: the request line and headers (16 KiB, as
# HAProxy's own default buffer) and tune.maxrewrite's reserve (1 KiB by default).
GATEWAY_HEADER_ROOM = 16384 + 1024


@dataclass(frozen=True)
class GatewayAccess:
    """What the gateway enforces beyond routing (from settings: access_for)."""

    tls: bool = False
    # Where plain HTTP is redirected from (the listening port) and to (the clients' HTTPS port).
    redirect_listen_port: int | None = None
    public_port: int = 8080
    rate_limits: dict[str, int] = field(default_factory=dict)
    # Every client's name (the operator's first): each gets its request counter on /metrics.
    clients: tuple[str, ...] = ()
    # HAProxy's Prometheus exporter on a listener of its own (None: none), answering only the
    # managers (Prometheus runs on the first), loopback and these sources.
    metrics_port: int | None = None
    metrics_sources: tuple[str, ...] = ()


def access_for(settings) -> GatewayAccess:
    host_mode = settings.stack_publish_mode == "host"
    redirect = settings.stack_gateway_http_redirect_port
    return GatewayAccess(
        tls=bool(settings.stack_gateway_tls_cert_file),
        redirect_listen_port=(redirect if host_mode else REDIRECT_CONTAINER_PORT) if redirect else None,
        public_port=settings.stack_gateway_port,
        rate_limits=dict(sorted(settings.stack_client_rate_limits.items())),
        clients=tuple(gateway_access.client_key_files(settings)),
        metrics_port=settings.monitoring_gateway_metrics_port if settings.monitoring_enabled else None,
        metrics_sources=tuple(settings.stack_engine_allowed_sources),
    )


def client_metrics_format(clients: tuple[str, ...]) -> str:
    """The body of the gateway's /metrics, in Prometheus' text format, as an HAProxy log-format
    string inside double quotes: one counter per client, read from the client_requests table
    (a name with no entry yet reads 0). Client names are [a-z][a-z0-9_-]*: nothing to escape."""
    metric = gateway_access.METRIC_CLIENT_REQUESTS
    lines = [f"# HELP {metric} Requests from each named client at this gateway task since it "
             "started (an entry idle for 24 h starts again at 0).",
             f"# TYPE {metric} counter"]
    lines += [f'{metric}{{client=\\"{name}\\"}} %[str({name}),table_http_req_cnt(client_requests)]'
              for name in clients]
    return "".join(line + "\\n" for line in lines)


def gateway_bufsize(max_body_bytes: int) -> int:
    """tune.bufsize that holds a whole body of max_body_bytes with its headers: HAProxy sees at
    most one buffer of a request (http-buffer-request waits for the body up to that size)."""
    return max_body_bytes + GATEWAY_HEADER_ROOM


def gateway_listen_port(settings) -> int:
    return settings.stack_gateway_port if settings.stack_publish_mode == "host" else GATEWAY_CONTAINER_PORT


def backend_id(model_name: str) -> str:
    """HAProxy's name of a model's backend (letters, digits, _)."""
    return "".join(c if c.isalnum() else "_" for c in model_name.lower()).strip("_") or "model"


def pin_value(served_name: str, hostname: str) -> str:
    """What the operator's tools send in X-Gpufleet-Pin to reach one engine task."""
    return f"{served_name}@{hostname}"


def _error_json(message: str, kind: str, code: int) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}},
                      separators=(",", ":"))


def render_gateway(served: list, nodes: list[sizing.Node], listen_port: int,
                   max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                   access: GatewayAccess = GatewayAccess()) -> str:
    """The HAProxy configuration: routes by model to every node that may run it, down ones too
    (a node without a healthy task fails the health check), maps keys to clients, lists the
    models. With more than one model, requests are routed on the "model" of their JSON body,
    read whole (up to max_body_bytes; a larger one is refused with 413, never misrouted)."""
    from operations.stack_render import TEMPLATES, _env

    backends = []
    for spec in served:
        eligible = sizing.eligible_nodes(nodes, spec.tensor_parallel_size, spec.gpu_model,
                                         include_down=True)
        bid = backend_id(spec.name)
        servers = [{"name": node.hostname, "addr": node.addr,
                    "pin": pin_value(spec.served_name, node.hostname), "pin_backend": f"pin_{bid}_{i}"}
                   for i, node in enumerate(sorted(eligible, key=lambda n: n.hostname)) if node.addr]
        backends.append({
            "id": bid, "port": spec.port, "servers": servers,
            "names": engines.request_names(spec),
            "check": engines.gateway_check(spec),
            "agent_port": spec.agent_port,
        })
    # The exporter answers the managers (by their Swarm addresses), loopback and the allowed sources.
    metrics_sources = ["127.0.0.1", *sorted(n.addr for n in nodes if n.manager and n.addr),
                       *access.metrics_sources]
    models = {"object": "list", "data": [
        {"id": spec.served_name, "object": "model", "owned_by": spec.engine} for spec in served]}
    return _env(TEMPLATES).get_template("haproxy.cfg.j2").render(
        backends=backends, listen_port=listen_port, max_body_bytes=max_body_bytes,
        agent_inter_s=engines.DRAIN_AGENT_INTER_S,
        bufsize=gateway_bufsize(max_body_bytes), access=access, operator=OPERATOR_CLIENT,
        metrics_sources=metrics_sources,
        pin_header=PIN_HEADER.lower(), server_header=SERVER_HEADER,
        client_metrics=client_metrics_format(access.clients),
        too_large_json=_error_json(
            f"request body over {max_body_bytes} bytes, the most this gateway reads to route on "
            "\"model\" (stack_gateway_max_body_kb)", "BadRequestError", 413),
        too_many_json=_error_json("too many requests from this client (stack_client_rate_limits)",
                                  "RateLimitError", 429),
        models_json=json.dumps(models, separators=(",", ":")))


@operation()
def gateway_handover():
    """
    Let a new gateway task take over the old one's queued connections (a manager setting):
    net.ipv4.tcp_migrate_req = 1, now and at boot. A kernel without it (before 5.14) is said
    and left alone: a roll may then reset a connection caught in the old task's accept queue.

    **Example:**

    .. code:: python

        gateway_handover(name="Gateway hand-over between tasks")
    """
    if host.get_fact(Sysctl, keys=[HANDOVER_SYSCTL]).get(HANDOVER_SYSCTL) is None:
        host.noop(f"this kernel has no {HANDOVER_SYSCTL} (Linux 5.14+): a gateway roll may reset "
                  "connections queued on the old task")
        return
    yield from server.sysctl._inner(key=HANDOVER_SYSCTL, value=1, persist=True,
                                    persist_file=HANDOVER_FILE)


class GatewayStrays(FactBase):
    """The nodes, by hostname, where the gateway service has a task that should run although the
    node is no longer a manager (its placement is node.role == manager); from a manager, in one
    round trip. Empty off a manager or without the service.

    .. code:: python

        ["gpu-02"]
    """

    def command(self, service: str) -> StringCommand:
        script = ('echo @@tasks; docker service ps "$1" --filter desired-state=running '
                  "--format '{{.Node}}' 2>/dev/null; "
                  "echo @@workers; docker node ls --filter role=worker --format '{{.Hostname}}' "
                  "2>/dev/null; true")
        return StringCommand("sh", "-c", QuoteString(script), "strays", QuoteString(service))

    def process(self, output):
        return parse_gateway_strays(output)


def parse_gateway_strays(lines: list[str]) -> list[str]:
    """Nodes in both sections of GatewayStrays' output: a gateway task on a worker."""
    sections: dict[str, set[str]] = {"tasks": set(), "workers": set()}
    current = None
    for line in lines:
        text = line.strip()
        if text.startswith("@@"):
            current = sections.get(text[2:])
        elif text and current is not None:
            current.add(text)
    return sorted(sections["tasks"] & sections["workers"])


@operation()
def gateway_strays(service: str):
    """
    Stop the gateway's tasks on nodes that are no longer managers. Docker 20.10 can leave a
    global service's task running on a node demoted from manager although its placement
    (node.role == manager) no longer holds: in the lab one of two demoted nodes kept its task
    for good, and it answers 503 (the engine ports admit only managers). Updating the service
    with its spec unchanged makes Swarm's global orchestrator reconcile it: the stray task is
    shut down and the managers' tasks keep running, not restarted.

    + service: the gateway service, "<stack_name>_gateway"

    **Example:**

    .. code:: python

        gateway_strays(name="Gateway tasks only on managers", service="gpufleet_gateway")
    """
    strays = read_fact(host, GatewayStrays, service=service)
    if not strays:
        host.noop(f"{service} runs on managers only")
        return
    explain(f"gateway: {service} still has a task on {', '.join(strays)}, no longer a manager")
    yield StringCommand("docker service update --detach", QuoteString(service))
