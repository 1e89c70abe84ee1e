"""A run with a host down does not wait for it (issue 20): only the Swarm nodes whose Docker this
run restarted are waited for, a host this run could not reach is never dialled again, and what
the stack renders does not change while a node is down."""

from __future__ import annotations

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.operation import OperationMeta

from operations import gateway as gw, node_wait, phase, sizing, stack_render
from tests.unit.test_stack import NODES, SECRETS, model, settings as stack_settings


@pytest.fixture
def fleet():
    inventory = Inventory((["node-1", "node-2", "node-3"], {}))
    state = State(inventory, Config())
    return state, {h.name: h for h in inventory}


def ran(changed: bool) -> OperationMeta:
    meta = OperationMeta("op", None)
    meta.set_complete(True, ["cmd"] if changed else [], None)
    return meta


def test_only_hosts_whose_engine_phases_changed_count_as_restarted(fleet):
    state, hosts = fleet
    phase.note_node_changes(hosts["node-1"], phase.DOCKER, phase.PhaseResult([ran(False), ran(True)]))
    phase.note_node_changes(hosts["node-2"], phase.DOCKER, phase.PhaseResult([ran(False)]))
    # node-3 failed before its Docker operations ran: they never completed.
    phase.note_node_changes(hosts["node-3"], phase.DOCKER, phase.PhaseResult([OperationMeta("op", None)]))
    for name in hosts:
        phase.note_node_changes(hosts[name], phase.SWARM, phase.PhaseResult([ran(False)]))
    assert phase.disturbed_nodes(state) == {"node-1"}


def test_a_managers_docker_restart_disturbs_every_node_still_in_the_run(fleet):
    """A manager whose Docker restarted lists the others down until their next heartbeat (lab:
    a changed daemon.json on the only manager)."""
    state, hosts = fleet
    for name in ("node-1", "node-2"):
        state.activate_host(hosts[name])
    phase.note_node_changes(hosts["node-1"], phase.DOCKER, phase.PhaseResult([ran(True)]))
    assert phase.disturbed_nodes(state, managers={"node-2"}) == {"node-1"}
    assert phase.disturbed_nodes(state, managers={"node-1"}) == {"node-1", "node-2"}


def test_a_changed_membership_disturbs_every_node_still_in_the_run(fleet):
    """After a demotion the demoting manager lists every node down for a few seconds (lab)."""
    state, hosts = fleet
    for name in ("node-1", "node-2"):
        state.activate_host(hosts[name])
    state.failed_hosts.add(hosts["node-3"])  # unreachable: never waited for
    phase.note_node_changes(hosts["node-1"], phase.SWARM, phase.PhaseResult([ran(True)]))
    phase.note_node_changes(hosts["node-2"], phase.SWARM, phase.PhaseResult([ran(False)]))
    assert phase.disturbed_nodes(state) == {"node-1", "node-2"}


def test_a_host_pyinfra_could_not_connect_to_is_unreachable_without_a_new_attempt(fleet, monkeypatch):
    state, hosts = fleet
    down = hosts["node-3"]
    state.failed_hosts.add(down)
    dialled = []
    monkeypatch.setattr(down, "connect", lambda **kw: dialled.append(kw))
    assert phase.unreachable(down) is True
    with pytest.raises(phase.HostUnreachable, match="node-3 could not be reached in this run"):
        with phase.on_other_host(down):
            pass
    assert dialled == [], "a host known to be unreachable was dialled again"


def test_a_failed_connection_is_remembered_for_the_rest_of_the_run(fleet, monkeypatch):
    state, hosts = fleet
    outside = hosts["node-2"]  # outside --limit: read, never activated
    attempts = []

    def connect(**kwargs):
        attempts.append(kwargs)
        raise OSError("timed out")

    monkeypatch.setattr(outside, "connect", connect)
    with pytest.raises(OSError):
        with phase.on_other_host(outside):
            pass
    with pytest.raises(phase.HostUnreachable):
        with phase.on_other_host(outside):
            pass
    assert len(attempts) == 1


def test_a_host_that_failed_later_in_the_run_stays_readable(fleet):
    state, hosts = fleet
    failed = hosts["node-2"]
    state.failed_hosts.add(failed)
    failed.connected = True  # it connected, then failed (preflight, a forbidden reboot)
    assert phase.unreachable(failed) is False


def test_why_a_down_node_is_not_waited_for(fleet):
    state, hosts = fleet
    state.failed_hosts.add(hosts["node-3"])  # never connected
    hosts["node-2"].connected = True
    state.failed_hosts.add(hosts["node-2"])
    assert node_wait.why_node_down(state, "node-3") == "its host could not be reached in this run"
    assert node_wait.why_node_down(state, "node-2") == "its host failed earlier in this run"
    assert node_wait.why_node_down(state, "node-1") == (
        "it was down before this run, which did not restart its Docker")
    assert node_wait.why_node_down(state, "gpu-99") == "not an inventory host"
    state.limit_hosts = [hosts["node-2"], hosts["node-3"]]
    assert node_wait.why_node_down(state, "node-1") == "its host is not in this run (--limit)"


def node(hostname, state="ready", availability="active", host=None):
    labels = {"gpufleet.host": host} if host else {}
    return {"hostname": hostname, "state": state, "availability": availability, "labels": labels}


def test_node_host_is_the_label_the_swarm_phase_sets():
    assert node_wait.node_host(node("ip-10-0-0-3", host="gpu-03")) == "gpu-03"
    assert node_wait.node_host(node("gpu-03")) == "gpu-03"


def test_down_nodes_are_active_nodes_not_ready():
    listed = {"nodes": [node("a"), node("b", state="down"), node("c", "down", "drain")]}
    assert [n["hostname"] for n in node_wait.down_nodes(listed)] == ["b"]


class Polls:
    """SwarmNodes answers, one per poll; counts the polls."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.count = 0

    def __call__(self, fact):
        self.count += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def polls(monkeypatch):
    """The current host (pyinfra's context) for wait_for_nodes: what it logs, its fact reads."""
    from pyinfra.context import ctx_host

    current = Inventory((["node-1"], {})).get_host("node-1")
    logged = []
    monkeypatch.setattr(current, "log_styled", lambda text, **kw: logged.append(text))
    with ctx_host.use(current):
        yield current, logged


def test_a_node_down_for_another_reason_is_reported_once_and_not_polled(polls, monkeypatch):
    host, logged = polls
    reader = Polls([{"nodes": [node("node-1"), node("node-3", "down")]}])
    monkeypatch.setattr(host, "get_fact", reader)
    monkeypatch.setattr(node_wait.time, "sleep", lambda s: pytest.fail("waited for a dead node"))
    node_wait.wait_for_nodes({"nodes": [node("node-1"), node("node-3", "down")]}, set(),
                         lambda name: "its host could not be reached in this run")
    assert reader.count == 0
    assert logged == ["Swarm node node-3 is down (its host could not be reached in this run): "
                      "not waited for; the stack is placed on the ready nodes"]


def test_a_node_this_run_restarted_is_waited_for_until_ready(polls, monkeypatch):
    host, logged = polls
    down = {"nodes": [node("node-1"), node("node-2", "down")]}
    reader = Polls([down, {"nodes": [node("node-1"), node("node-2")]}])
    monkeypatch.setattr(host, "get_fact", reader)
    monkeypatch.setattr(node_wait.time, "sleep", lambda s: None)
    listed = node_wait.wait_for_nodes(down, {"node-2"}, lambda name: "?")
    assert [n["state"] for n in listed["nodes"]] == ["ready", "ready"]
    assert reader.count == 2
    assert logged == ["waiting for Swarm nodes this run restarted or re-formed: node-2"] * 2


def with_down(nodes, index):
    return [sizing.Node(**{**n.__dict__, "available": False}) if i == index else n
            for i, n in enumerate(nodes)]


def served_settings():
    return stack_settings([model("llama", replicas=2), model("qwen", port=8001)])


def test_a_node_going_down_changes_nothing_the_stack_renders():
    settings = served_settings()
    served = [spec for spec in settings.models if spec.serve]
    down = with_down(NODES, 1)
    assert gw.render_gateway(served, down, 8080) == gw.render_gateway(served, NODES, 8080)
    gateway = gw.render_gateway(served, NODES, 8080)
    assert (stack_render.render_stack(settings, down, SECRETS, gateway)
            == stack_render.render_stack(settings, NODES, SECRETS, gateway))


def test_a_drained_node_leaves_the_gateway():
    settings = served_settings()
    served = [spec for spec in settings.models if spec.serve]
    drained = [sizing.Node(**{**n.__dict__, "available": False, "active": False})
               if i == 1 else n for i, n in enumerate(NODES)]
    assert NODES[1].addr not in gw.render_gateway(served, drained, 8080)
    assert NODES[1].addr in gw.render_gateway(served, NODES, 8080)


def test_placement_counts_only_ready_nodes():
    down = with_down(NODES, 1)
    assert len(sizing.eligible_nodes(down, 1, None)) == len(NODES) - 1
    assert len(sizing.eligible_nodes(down, 1, None, include_down=True)) == len(NODES)
