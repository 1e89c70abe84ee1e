"""Engine ports admit only the gateway: an iptables chain of the deploy's own on every GPU node.

Engines run on each node's own network (operations/stack.py says why) and listen on the node's
address at their model's port. Their internal key (operations/gateway_access.py) already keeps
a client from using vLLM or TGI directly; this chain keeps everyone else off the port entirely:
Ollama has no key of its own, and vLLM's /metrics, TGI's /info answer without one.

The chain, GPUFLEET-ENGINES, jumped to from the top of INPUT for TCP:
    RETURN from loopback (the engine's own health check), from each Swarm manager's address (the
    gateway runs there; its connections to engines leave from that address, also in ingress
    mode, where Docker masquerades them) and from stack_engine_allowed_sources; then a TCP reset
    for each engine port. RETURN, not ACCEPT: the host's own INPUT rules still apply after it.

Written to /etc/gpufleet/engine-ports.rules (iptables-restore input, only this chain) and loaded by
gpufleet-engine-ports.service at boot, before Docker starts a task: a rebooted node never serves
an engine port unguarded. A run compares the live chain with the file and reloads on any
difference (a hand-edited or flushed chain included). IPv4 only: engines are reached on the
Swarm's IPv4 addresses; say so in README.

    engine_ports(settings)   # in deploy.py, before the stack phase
"""

from __future__ import annotations

import ipaddress
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, FunctionCommand, StringCommand, deploy, operation
from pyinfra.operations import files

from operations.phase import PhaseResult, explain, fail_host, other_host_fact, unreachable
from operations.swarm import SwarmInfo, _inventory_hosts, advertise_address

CHAIN = "GPUFLEET-ENGINES"
RULES_PATH = "/etc/gpufleet/engine-ports.rules"
SCRIPT_PATH = "/usr/local/sbin/gpufleet-engine-ports"
UNIT = "gpufleet-engine-ports.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"

# Loads the chain atomically (iptables-restore --noflush touches only the chain it names), then
# makes sure INPUT jumps to it once, first. `stop` takes both away.
SCRIPT = f"""#!/bin/sh
# gpu-fleet (operations/engine_ports.py): engine ports admit only the gateway nodes.
set -eu
case "${{1:-start}}" in
start)
    iptables -w -N {CHAIN} 2>/dev/null || true
    iptables-restore -w --noflush < {RULES_PATH}
    iptables -w -C INPUT -p tcp -j {CHAIN} 2>/dev/null || iptables -w -I INPUT 1 -p tcp -j {CHAIN}
    ;;
stop)
    while iptables -w -D INPUT -p tcp -j {CHAIN} 2>/dev/null; do :; done
    iptables -w -F {CHAIN} 2>/dev/null || true
    iptables -w -X {CHAIN} 2>/dev/null || true
    ;;
esac
"""

UNIT_TEXT = f"""# gpu-fleet (operations/engine_ports.py): engine ports admit only the gateway nodes.
[Unit]
Description=gpu-fleet engine port firewall ({CHAIN})
Before=docker.service network-online.target
Wants=network-pre.target
After=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={SCRIPT_PATH} start
ExecReload={SCRIPT_PATH} start
ExecStop={SCRIPT_PATH} stop

[Install]
WantedBy=multi-user.target
"""


def chain_rules(ports: list[int], sources: list[str]) -> list[str]:
    """The chain's rules as `iptables -S` prints them (pure: what the file and the live chain
    are compared on)."""
    rules = [f"-A {CHAIN} -i lo -j RETURN"]
    rules += [f"-A {CHAIN} -s {network} -j RETURN" for network in normalised(sources)]
    rules += [f"-A {CHAIN} -p tcp -m tcp --dport {port} -j REJECT --reject-with tcp-reset"
              for port in sorted(set(ports))]
    return rules


def normalised(sources: list[str]) -> list[str]:
    """Sources as iptables prints them: a.b.c.d/32 for an address, sorted, each once."""
    networks = {ipaddress.ip_network(s, strict=False) for s in sources}
    return [str(n) for n in sorted(networks, key=lambda n: (int(n.network_address), n.prefixlen))]


def rules_file(ports: list[int], sources: list[str]) -> str:
    """iptables-restore input that replaces the chain's rules and nothing else."""
    return "\n".join([
        "# gpu-fleet (operations/engine_ports.py): engine ports admit only the gateway nodes.",
        "# Rendered from group data (stack_engine_allowed_sources, the Swarm managers); edits here",
        "# are overwritten.",
        "*filter",
        f"-F {CHAIN}",
        *chain_rules(ports, sources),
        "COMMIT",
        "",
    ])


def parse_live(lines: list[str]) -> dict:
    """EngineFirewall's output: the chain's rules, whether INPUT jumps to it, iptables present,
    whether the boot unit is enabled."""
    found = {"iptables": True, "rules": None, "jump": False, "enabled": False}
    section = None
    for line in lines:
        text = line.strip()
        if text.startswith("@@"):
            section = text[2:]
            continue
        if section == "missing":
            found["iptables"] = False
        elif section == "chain" and text.startswith(f"-A {CHAIN} "):
            found["rules"] = (found["rules"] or []) + [text]
        elif section == "chain" and text == f"-N {CHAIN}":
            found["rules"] = found["rules"] or []
        elif section == "input" and text == f"-A INPUT -p tcp -j {CHAIN}":
            found["jump"] = True
        elif section == "unit" and text == "enabled":
            found["enabled"] = True
    return found


class EngineFirewall(FactBase):
    """The live GPUFLEET-ENGINES chain, INPUT's jump to it, and whether its boot unit is
    enabled, in one round trip (needs root).

    .. code:: python

        {"iptables": True, "jump": True, "enabled": True,
         "rules": ["-A GPUFLEET-ENGINES -i lo -j RETURN", ...]}   # rules None: no chain
    """

    def command(self) -> str:
        return (f"echo @@unit; systemctl is-enabled {UNIT} 2>/dev/null || true; "
                "if ! command -v iptables >/dev/null 2>&1; then echo @@missing; echo none; exit 0; fi; "
                f"echo @@chain; iptables -w -S {CHAIN} 2>/dev/null || true; "
                "echo @@input; iptables -w -S INPUT 2>/dev/null || true")

    def process(self, output):
        return parse_live(list(output))


@operation()
def engine_firewall(ports: list[int], sources: list[str]):
    """
    Keep the engine ports of this node closed to all but `sources` (and loopback): the rules
    file, the boot unit, and the live chain, reloaded when any of them differs.

    + ports: the served models' ports
    + sources: IPv4 addresses or networks that may connect (the managers, allowed sources)

    **Example:**

    .. code:: python

        engine_firewall(name="Engine ports admit only the gateway", ports=[8000],
                        sources=["10.20.0.11", "10.20.0.12"])
    """
    live = host.get_fact(EngineFirewall)
    if not live["iptables"]:
        yield FunctionCommand(fail_host, ("engine firewall: iptables is not installed here "
                                          "(apt-get install iptables, or stack_engine_firewall = False "
                                          "with a site firewall that does the same)",), {})
        return
    changed = False
    for path, text, mode in ((SCRIPT_PATH, SCRIPT, "0755"), (UNIT_PATH, UNIT_TEXT, "0644"),
                             (RULES_PATH, rules_file(ports, sources), "0644")):
        said = False
        for command in files.put._inner(src=StringIO(text), dest=path, mode=mode):
            if not said:
                said = True
                explain(f"engine ports: {path} differs from the rendered file")
            changed = True
            yield command
    if changed:
        yield StringCommand("systemctl daemon-reload")
    enabled = live["enabled"]
    if not enabled:
        explain(f"engine ports: {UNIT} is not enabled (the chain would be gone after a reboot)")
        yield StringCommand("systemctl enable", UNIT)
    live_differs = live["rules"] != chain_rules(ports, sources) or not live["jump"]
    if live_differs:
        explain(f"engine ports: the live {CHAIN} chain is not the rendered one"
                + ("" if live["jump"] else " (INPUT does not jump to it)"))
    if changed or live_differs:
        yield StringCommand("systemctl restart", UNIT)
    elif enabled:
        host.noop(f"{CHAIN} admits {len(normalised(sources))} source(s) to port(s) "
                  f"{', '.join(map(str, sorted(set(ports))))}")


@operation()
def engine_firewall_off():
    """
    Take the chain away (stack_engine_firewall = False): stop and disable the unit, remove its
    files and the chain. Nothing to do when none of them is there.

    **Example:**

    .. code:: python

        engine_firewall_off(name="No engine firewall of the deploy's own")
    """
    from pyinfra.facts.files import File

    live = host.get_fact(EngineFirewall)
    present = [path for path in (UNIT_PATH, RULES_PATH, SCRIPT_PATH) if host.get_fact(File, path=path)]
    if not present and live["rules"] is None and not live["jump"]:
        host.noop(f"no {CHAIN} chain (stack_engine_firewall is False or nothing is served)")
        return
    if UNIT_PATH in present:
        yield StringCommand("systemctl disable", UNIT)
    if live["rules"] is not None or live["jump"]:
        yield StringCommand(f"while iptables -w -D INPUT -p tcp -j {CHAIN} 2>/dev/null; do :; done; "
                            f"iptables -w -F {CHAIN}; iptables -w -X {CHAIN}")
    for path in present:
        yield from files.file._inner(path=path, present=False)
    if UNIT_PATH in present:
        yield StringCommand("systemctl daemon-reload")


def gateway_sources(settings, managers) -> list[str]:
    """The addresses engine ports admit: each manager's Swarm address (the gateway runs there),
    then stack_engine_allowed_sources. A manager's address: docker info's NodeAddr once it is in
    the Swarm, else the one it will advertise (operations/swarm.advertise_address). The
    inventory's managers only: a role change or a host joining changes nothing elsewhere."""
    sources = []
    for other in managers:
        if other.data.get("swarm_retire"):
            continue
        info = {}
        if not unreachable(other):  # pyinfra could not connect: not tried again per host
            try:
                info = other_host_fact(other, SwarmInfo)
            except Exception:  # unreachable now: what its inventory data says it advertises
                info = {}
        address = info.get("node_addr") or advertise_address(
            other.data.get("swarm_advertise_address"), other.data.get("ssh_hostname"),
            info.get("primary_address"))
        address = _ip_only(address)
        if address is None:
            raise ValueError(f"the Swarm address of manager {other.name} is unknown (no IPv4 "
                             "address from swarm_advertise_address, ssh_hostname or its default route)")
        sources.append(address)
    return sources + list(settings.stack_engine_allowed_sources)


def _ip_only(address: str | None) -> str | None:
    """An IPv4 address from an advertise value ("10.0.0.5", "10.0.0.5:2377"), else None."""
    if not address:
        return None
    candidate = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    try:
        parsed = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    return str(parsed) if parsed.version == 4 else None


@operation()
def engine_firewall_refuse(reason: str):
    """
    Fail this host with `reason`: its engine ports cannot be guarded as configured.

    **Example:**

    .. code:: python

        engine_firewall_refuse(name="Engine ports", reason="the address of gpu-01 is unknown")
    """
    yield FunctionCommand(fail_host, (reason,), {})


def guarded_ports(settings) -> list[int]:
    """The served models' ports, and each vLLM replica's drain agent port
    (operations/drain_agent.py): only the gateway asks it. With monitoring, the listeners
    without a login of their own (Prometheus, Alertmanager, the exporters, the gateway's
    exporter): Prometheus scrapes from the first manager. Grafana has its own login."""
    ports = [port for spec in settings.models if spec.serve
             for port in (spec.port, spec.agent_port) if port]
    if ports:
        ports += [port for key, port in settings.monitoring_ports().items()
                  if key != "monitoring_grafana_port"]
    return ports


@deploy("Engine ports")
def engine_ports(settings) -> PhaseResult:
    """On every node that may run an engine: its ports admit only the gateway nodes."""
    ports = guarded_ports(settings)
    if not settings.stack_engine_firewall or not ports:
        return PhaseResult([engine_firewall_off(name="No engine port firewall (nothing to guard)"
                                                if not ports else
                                                "No engine port firewall (stack_engine_firewall)")])
    _, managers = _inventory_hosts(host.inventory)
    try:
        sources = gateway_sources(settings, managers)
    except ValueError as error:
        return PhaseResult([engine_firewall_refuse(name="Engine ports admit only the gateway nodes",
                                                   reason=f"engine firewall: {error}")])
    return PhaseResult([engine_firewall(
        name=f"Engine ports admit only the gateway nodes ({CHAIN})", ports=ports, sources=sources)])
