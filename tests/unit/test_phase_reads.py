"""read_fact: a fact is read once per run while no operation runs a command (issue 9)."""

from __future__ import annotations

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import StateOperationHostData

from operations.phase import changes_so_far, read_fact


class Answers:
    """A fact reader that counts its reads and answers a fresh dict each time."""

    def __init__(self):
        self.reads = []

    def __call__(self, fact_cls, **kwargs):
        self.reads.append((fact_cls, kwargs))
        return {"read": len(self.reads), "gpus": ["GPU-0"]}


class FactA:
    pass


class FactB:
    pass


@pytest.fixture
def fleet(monkeypatch):
    inventory = Inventory((["node-1", "node-2"], {}))
    state = State(inventory, Config())
    hosts = [inventory.get_host("node-1"), inventory.get_host("node-2")]
    readers = {}
    for h in hosts:
        readers[h.name] = Answers()
        monkeypatch.setattr(h, "get_fact", readers[h.name])
    return state, hosts, readers


def complete(state, host, op_hash: str, commands: list) -> None:
    meta = OperationMeta(op_hash, None)
    meta.set_complete(True, commands, None)
    state.ops[host][op_hash] = StateOperationHostData(lambda: iter(()), {}, meta)


def test_a_run_that_changes_nothing_reads_each_fact_once(fleet):
    state, (one, _), readers = fleet
    assert read_fact(one, FactA) == {"read": 1, "gpus": ["GPU-0"]}
    complete(state, one, "noop", [])  # an operation that ran no command
    assert read_fact(one, FactA)["read"] == 1
    assert len(readers["node-1"].reads) == 1


def test_a_command_on_any_host_reads_again(fleet):
    state, (one, two), readers = fleet
    read_fact(one, FactA)
    complete(state, two, "promote", ["docker node promote node-1"])
    assert changes_so_far(state) == 1
    assert read_fact(one, FactA)["read"] == 2  # another host's command can change this one


def test_each_host_fact_and_argument_is_read_on_its_own(fleet):
    _, (one, two), readers = fleet
    read_fact(one, FactA)
    read_fact(two, FactA)
    read_fact(one, FactB)
    read_fact(one, FactA, path="/etc/x")
    read_fact(one, FactA, path="/etc/x")
    assert len(readers["node-1"].reads) == 3
    assert len(readers["node-2"].reads) == 1


def test_a_caller_editing_the_answer_does_not_edit_the_next(fleet):
    _, (one, _), _ = fleet
    read_fact(one, FactA)["gpus"].append("GPU-1")
    assert read_fact(one, FactA)["gpus"] == ["GPU-0"]


def test_an_operation_still_running_does_not_count(fleet):
    state, (one, _), readers = fleet
    read_fact(one, FactA)
    state.ops[one]["running"] = StateOperationHostData(
        lambda: iter(()), {}, OperationMeta("running", None))
    assert read_fact(one, FactA)["read"] == 1


def test_a_host_without_pyinfra_state_reads_every_time():
    class Fake:  # pyinfra-testing's FakeHost has no state.ops
        name = "fake"
        state = object()

        def __init__(self):
            self.reads = 0

        def get_fact(self, fact_cls, **kwargs):
            self.reads += 1
            return self.reads

    fake = Fake()
    assert [read_fact(fake, FactA), read_fact(fake, FactA)] == [1, 2]


def test_the_hosts_own_sudo_passed_or_not_is_the_same_read(fleet):
    _, (one, _), readers = fleet
    read_fact(one, FactA)
    read_fact(one, FactA, _sudo=True)
    assert len(readers["node-1"].reads) == 1
