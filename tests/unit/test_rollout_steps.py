"""The rollout's reading of the Swarm and of a maintained host (scripts/rollout/steps.py), against
canned command output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scripts.rollout import steps


class FakeFleet:
    def __init__(self, answers: dict[str, list[str]], ok: bool = True):
        self.answers, self.ok, self.commands = answers, ok, []

    def run(self, name, command, timeout=300):
        self.commands.append((name, command))
        for needle, lines in self.answers.items():
            if needle in command:
                return self.ok, lines, []
        return self.ok, [], []


NODE = {"id": "n5", "hostname": "node-5", "labels": {}}


def test_a_task_told_to_stop_still_counts_while_its_container_runs():
    fleet = FakeFleet({"docker node ps": [
        "gpufleet_tiny-llama.2 Shutdown Running 3 seconds ago",   # the drain agent finishing
        "gpufleet_gateway.x Shutdown Shutdown 1 second ago",
        "\\_ gpufleet_tiny-llama.2 Shutdown Failed 2 hours ago",
    ]})
    assert steps.tasks_running_on(fleet, "node-1", NODE) == ["gpufleet_tiny-llama.2 Shutdown Running 3 seconds ago"]


def test_the_fleet_serves_without_a_node_only_when_its_tasks_are_gone_and_every_count_is_met():
    fleet = FakeFleet({"docker node ps": [], "docker service ls": [
        "gpufleet_gateway 3/3", "gpufleet_tiny-llama 1/2", "odd line"]})
    check = steps.serving_without(fleet, "node-1", "gpufleet", [NODE])
    assert check() == "gpufleet_tiny-llama 1/2"
    fleet.answers["docker service ls"] = ["gpufleet_gateway 2/2", "gpufleet_tiny-llama 2/2"]
    assert check() is None
    assert any("label=com.docker.stack.namespace=gpufleet" in c for _, c in fleet.commands)


def test_a_wait_that_runs_out_says_what_was_still_missing(monkeypatch):
    monkeypatch.setattr(steps, "POLL_S", 0)
    said = []
    with pytest.raises(steps.StepFailed, match="the fleet not reached within 0s: tiny-llama 1/2"):
        steps.wait_until(lambda: "tiny-llama 1/2", 0, "the fleet", said.append)
    assert said == ["waiting for the fleet: tiny-llama 1/2"]


def test_a_command_that_fails_stops_the_step_with_the_host_and_the_error():
    with pytest.raises(steps.StepFailed, match="node-1: `docker node update"):
        steps.run_ok(FakeFleet({}, ok=False), "node-1", "docker node update --availability drain n5")


SETTINGS = SimpleNamespace(nvidia_driver_version="580.95.05", docker_engine_source="docker",
                           docker_version="28.5.2", nvidia_container_toolkit_version="1.19.1-1")


def test_a_maintained_host_must_run_exactly_the_versions_asked_for():
    right = {"driver": "580.95.05", "gpus": 2, "docker": "28.5.2", "toolkit": "1.19.1-1"}
    assert steps.version_problems(right, SETTINGS) == []
    assert steps.version_problems({**right, "driver": "580.82.07"}, SETTINGS) == [
        "driver 580.82.07 loaded, 580.95.05 wanted"]
    wrong = {"driver": None, "gpus": 0, "docker": "26.1.5", "toolkit": "1.19.0-1"}
    assert steps.version_problems(wrong, SETTINGS) == [
        "driver not loaded, 580.95.05 wanted",
        "no GPU visible to nvidia-smi",
        "Docker Engine 26.1.5, 28.5.2 wanted",
        "Container Toolkit 1.19.0-1, 1.19.1-1 wanted"]


def test_draining_labels_the_node_for_maintenance_and_activating_removes_the_label(monkeypatch):
    fleet = FakeFleet({})
    node = {"id": "n5", "hostname": "node-5", "labels": {"gpufleet.host": "node-5"}}
    monkeypatch.setattr(steps, "swarm_nodes", lambda fleet, manager: [node])
    steps.set_availability(fleet, "node-1", "node-5", "drain")
    assert fleet.commands[-1][1] == ("docker node update --label-add gpufleet-maintenance=rollout "
                                     "--availability drain n5")
    node["labels"]["gpufleet-maintenance"] = "rollout"
    steps.set_availability(fleet, "node-1", "node-5", "active")
    assert fleet.commands[-1][1] == ("docker node update --label-rm gpufleet-maintenance "
                                     "--availability active n5")


def test_a_failed_deploy_is_reported_with_its_own_words(tmp_path):
    log = tmp_path / "node-2.log"
    log.write_text(
        "--> Starting operation: NVIDIA driver | Reboot into NVIDIA driver 580.95.05 if needed \n"
        "    [node-2] Connected\n"
        "    [node-2] the loaded NVIDIA driver is not 580.95.05:\n"
        "    [node-2] NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
        "    [node-2] \n"
        "    [node-2] Error: executed 5 commands\n"
        "    [node-1] No changes\n\n--> pyinfra error: No hosts remaining!\n")
    assert steps.deploy_failure(log, "node-2") == (
        "NVIDIA driver | Reboot into NVIDIA driver 580.95.05 if needed: the loaded NVIDIA driver "
        "is not 580.95.05: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
        "driver.")
    assert steps.deploy_failure(log, "node-9") == "--> pyinfra error: No hosts remaining!"
    assert steps.deploy_failure(tmp_path / "missing.log", "node-2") == "no deploy log"


def test_the_reboots_a_deploy_did_are_counted_from_its_log(tmp_path):
    log = tmp_path / "node-3.log"
    log.write_text("--> Starting operation: NVIDIA driver | NVIDIA driver 580.95.05 (open kernel modules)\n"
                   "    [node-3] Success\n\n"
                   "--> Starting operation: NVIDIA driver | Reboot into NVIDIA driver 580.95.05 if needed \n"
                   "    [node-3] Connected\n    [node-3] Success\n\n"
                   "--> Starting operation: Docker Engine | Restart Docker (daemon.json changed)\n"
                   "    [node-3] Success\n")
    assert steps.reboots_in_log(log, "node-3") == 1
    assert steps.reboots_in_log(log, "node-4") == 0
