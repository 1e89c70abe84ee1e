"""The load test's scenarios with a fake fleet (commands recorded, stack facts made up) and fake
engines on 127.0.0.1: 1 then N replicas, gateway and direct, docker stats sampled, and the
original replica count restored, also when a scenario fails."""

import argparse
import socket

import pytest

from operations import config, inventory_data
from scripts import loadtest as lt
from tests.unit.fake_openai import FakeOpenAI

KEY = "sk-scenario-secret"
SERVICE = "gpufleet_tiny-llama"


def settings(engine_port, gateway_port):
    # The ports are the fake servers' (ephemeral, 32768 and up): the drain agent's default,
    # port + 10000, would pass 65535 for a quarter of them, so it is given, below them.
    model = {"name": "tiny-llama", "repo_id": "lab/tiny", "revision": "e" * 40,
             "port": engine_port, "drain_port": 19999}
    data = {**inventory_data.load_group_data()["all"], "models": [model], "stack_api_key_file": "/k", "stack_engine_key_file": "/ek", "monitoring_grafana_admin_password_file": "/gk",
            "stack_publish_mode": "host", "stack_gateway_port": gateway_port,
            "smoke_deadline_s": 2}
    return config.validate_host_data("node-1", data)


class FakeFleet:
    """Answers like Fleet: `docker service scale` changes the replicas of the made-up stack,
    `docker stats` returns one line per engine task with growing network counters."""

    def __init__(self, replicas=2):
        self.replicas, self.commands, self.stats_calls = replicas, [], 0
        self.hosts = {f"node-{i}": {} for i in (1, 2, 3)}

    def pyinfra_host(self, name):
        return name

    def run(self, name, command, timeout=300):
        if command.startswith("docker service scale"):
            self.commands.append(command)
            self.replicas = int(command.rsplit("=", 1)[1])
            return True, [], []
        self.stats_calls += 1
        n = self.stats_calls
        return True, [
            '{"CPUPerc":"%d.0%%","MemUsage":"100MiB / 1GiB","Name":"%s.1.abc","NetIO":"%dkB / %dkB"}'
            % (10 + n, SERVICE, n, 2 * n)], []

    def read_fact(self, name, fact, **kwargs):
        return stack(self.replicas)


def stack(replicas):
    nodes = [{"id": f"n{i}", "hostname": f"node-{i}", "host": f"node-{i}",
              "role": "manager" if i == 1 else "worker", "availability": "active",
              "state": "ready", "addr": "127.0.0.1"} for i in (1, 2, 3)]
    task = {"desired": "running", "state": "running", "current": "Running", "error": ""}
    tasks = [{**task, "id": "g", "name": "gpufleet_gateway.n1", "service": "gpufleet_gateway",
              "node": "node-1"}]
    tasks += [{**task, "id": f"t{i}", "name": f"{SERVICE}.{i}", "service": SERVICE,
               "node": f"node-{i}"} for i in range(1, replicas + 1)]
    return {"error": None, "nodes": nodes, "tasks": tasks, "services": [
        {"id": "s1", "name": "gpufleet_gateway", "labels": {}, "mode": "global", "replicas": None,
         "ports": []},
        {"id": "s2", "name": SERVICE, "labels": {}, "mode": "replicated", "replicas": replicas,
         "ports": []}]}


def args(**overrides):
    base = dict(model=None, replicas=3, requests=4, concurrency=2, max_seconds=20.0,
                no_stream=False, max_tokens=4, request_timeout=10.0, settle=0.0,
                sample_interval=0.05, prompts=None, request_rate=None, burstiness=1.0, seed=0)
    return argparse.Namespace(**{**base, **overrides})


def port_of(server):
    return int(server.url.rsplit(":", 1)[1])


def test_four_scenarios_sampled_and_the_count_restored():
    fleet = FakeFleet(replicas=2)
    with FakeOpenAI(key=KEY) as engine, FakeOpenAI(key=KEY) as gateway:
        s = settings(port_of(engine), port_of(gateway))
        records, scenarios = lt.run_scenarios(fleet, s, "node-1", stack(2), KEY, args())
        # Engine tasks are reached through the gateway, pinned (engine ports admit only it).
        assert gateway.requests == 16 and engine.requests == 0
    assert fleet.commands == [
        f"docker service scale --detach {SERVICE}=1",
        f"docker service scale --detach {SERVICE}=3",
        f"docker service scale --detach {SERVICE}=2",
    ]
    assert [s["name"] for s in scenarios] == ["1 replica(s), gateway", "1 replica(s), pinned",
                                              "3 replica(s), gateway", "3 replica(s), pinned"]
    assert [len(s["endpoints"]) for s in scenarios] == [1, 1, 1, 3]
    assert len(records) == 16 and all(r.ok for r in records)
    # A sample before and after each scenario at least: network I/O counts the whole of it.
    assert all(s["usage_totals"]["samples"] >= 2 for s in scenarios)
    assert all(s["usage_totals"]["net_rx_bytes"] > 0 for s in scenarios)
    assert all(s["summary"]["requests"] == 4 for s in scenarios)


def test_the_count_is_restored_when_a_scenario_fails():
    fleet = FakeFleet(replicas=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # no engine answers: health fails after scaling
    s = settings(dead, dead + 1 if dead < 65535 else dead - 1)  # no gateway answers either
    with pytest.raises(RuntimeError, match="health failed"):
        lt.run_scenarios(fleet, s, "node-1", stack(2), KEY, args())
    assert fleet.commands[-1] == f"docker service scale --detach {SERVICE}=2"


class RejectingFleet(FakeFleet):
    """Workers cannot run the engine: Swarm rejects the tasks it places there."""

    def read_fact(self, name, fact, **kwargs):
        made = stack(self.replicas)
        for task in made["tasks"]:
            if task["service"] == SERVICE and task["node"] != "node-1":
                task.update(state="rejected", desired="ready",
                            error="node is missing network attachments")
        return made


def test_replicas_that_never_run_stop_the_scenarios_with_swarms_reason():
    fleet = RejectingFleet(replicas=1)
    with FakeOpenAI(key=KEY) as engine, FakeOpenAI(key=KEY) as gateway:
        s = settings(port_of(engine), port_of(gateway))
        with pytest.raises(RuntimeError, match="1 of 3 task.*missing network attachments"):
            lt.run_scenarios(fleet, s, "node-1", stack(1), KEY, args())
    assert fleet.commands[-1] == f"docker service scale --detach {SERVICE}=1"
