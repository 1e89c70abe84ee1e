"""The rollout's planning (scripts/rollout/plan.py): which hosts a change touches, and batches
that never take a model's replicas or the Swarm's managers below what they need."""

from __future__ import annotations

from scripts.drift.report import Item
from scripts.rollout.plan import Model, Node, disruptive_changes, plan_batches
from scripts.rollout.report import HostRecord, RolloutRecord, drained_by_rollout, markdown, save


def fleet(count=4, managers=1, gpus=2):
    return [Node(f"gpu-{i}", gpus, "H100", manager=i <= managers) for i in range(1, count + 1)]


def test_only_the_phases_that_stop_serving_touch_a_host():
    items = [Item("NVIDIA driver | NVIDIA driver 580.95.05 (open kernel modules)", "change", "apt-get install"),
             Item("Docker Engine | Install Docker Engine 28.5.2 (Docker's repository)", "change", ""),
             Item("Inference stack | Deploy the inference stack", "change", "stack deploy"),
             Item("NVIDIA Container Toolkit | NVIDIA Container Toolkit 1.19.1-1", "conditional", "")]
    assert disruptive_changes(items) == [
        {"operation": "NVIDIA driver | NVIDIA driver 580.95.05 (open kernel modules)",
         "detail": "apt-get install"},
        {"operation": "Docker Engine | Install Docker Engine 28.5.2 (Docker's repository)", "detail": ""}]


def test_one_host_at_a_time_workers_in_the_order_given():
    touched = {f"gpu-{i}": ["driver"] for i in (2, 3, 4)}
    plan = plan_batches(touched, fleet(), [Model("m", 2)], 1)
    assert plan.batches == [["gpu-2"], ["gpu-3"], ["gpu-4"]] and plan.refused == []


def test_a_batch_never_takes_more_nodes_than_the_replicas_can_spare():
    # 4 nodes, 2 replicas: at most 2 out at once, whatever --max-unavailable says.
    touched = {f"gpu-{i}": ["driver"] for i in (2, 3, 4)}
    managers = fleet(managers=0)
    plan = plan_batches(touched, managers, [Model("m", 2)], 3)
    assert plan.batches == [["gpu-2", "gpu-3"], ["gpu-4"]]


def test_gpus_in_all_count_as_well_as_nodes():
    # 3 replicas of a 2-GPU model on 4 nodes of 2 GPUs: one node out at a time.
    plan = plan_batches({"gpu-1": ["x"], "gpu-2": ["x"]}, fleet(managers=0), [Model("m", 3, 2)], 2)
    assert plan.batches == [["gpu-1"], ["gpu-2"]]


def test_the_only_manager_is_refused_with_the_reason_and_nothing_after_it():
    plan = plan_batches({"gpu-1": ["x"], "gpu-2": ["x"]}, fleet(), [Model("m", 1)], 1)
    assert plan.batches == []
    assert plan.refused == ["gpu-1: cannot be taken out of serving: 0 of 1 manager(s) would be "
                            "left, the Swarm needs 1"]


def test_with_three_managers_one_goes_at_a_time_never_two():
    nodes = fleet(count=5, managers=3)
    plan = plan_batches({"gpu-1": ["x"], "gpu-2": ["x"], "gpu-3": ["x"]}, nodes, [Model("m", 1)], 3)
    assert plan.batches == [["gpu-1"], ["gpu-2"], ["gpu-3"]]


def test_a_model_that_needs_every_node_refuses_the_rollout():
    plan = plan_batches({"gpu-3": ["x"]}, fleet(count=3, managers=0), [Model("m", 3)], 1)
    assert plan.refused == ["gpu-3: cannot be taken out of serving: model m needs 3 node(s) with "
                            "1 GPU(s); 2 would be left"]


def test_a_node_already_out_counts_as_out():
    nodes = fleet(count=3, managers=0)
    nodes[0] = Node("gpu-1", 2, "H100", active=False)  # drained by an operator
    plan = plan_batches({"gpu-2": ["x"]}, nodes, [Model("m", 2)], 1)
    assert plan.batches == [] and "model m needs 2 node(s)" in plan.refused[0]


def test_a_gpu_model_constraint_counts_only_nodes_of_that_model():
    nodes = fleet(count=3, managers=0) + [Node("a100-1", 2, "A100")]
    plan = plan_batches({"gpu-1": ["x"]}, nodes, [Model("m", 3, 1, "H100")], 1)
    assert plan.batches == [] and "model m needs 3 node(s) with 1 GPU(s) H100" in plan.refused[0]


def test_a_host_outside_the_swarm_is_refused():
    plan = plan_batches({"gpu-9": ["x"]}, fleet(), [Model("m", 1)], 1)
    assert plan.refused == ["gpu-9: not a node of the Swarm (deploy it first)"]


def test_the_report_is_the_state_a_rerun_resumes_from(tmp_path):
    record = RolloutRecord("inventories/lab.py", ["nvidia_driver_version=580.95.05"], 1)
    record.batches = [["gpu-2"], ["gpu-3"]]
    record.hosts = {"gpu-2": HostRecord("gpu-2", status="done", rebooted=True, wall_s=61.0,
                                        changes=[{"operation": "NVIDIA driver | x", "detail": "apt"}]),
                    "gpu-3": HostRecord("gpu-3", status="failed", problem="driver not loaded")}
    save(record, tmp_path)
    assert drained_by_rollout(tmp_path / "rollout.json") == {"gpu-3": "failed"}
    text = (tmp_path / "rollout.md").read_text()
    assert "| gpu-2 | done |" in text and "- gpu-3: driver not loaded" in text
    assert "- gpu-2: NVIDIA driver | x" in text
    assert not list(tmp_path.glob("*.new"))
    assert drained_by_rollout(tmp_path / "missing.json") == {}
    assert "Batches: gpu-2; gpu-3" in markdown(record)
