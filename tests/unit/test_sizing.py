"""The stack's sizing rules (operations/sizing.py): shm, fit, update order."""

import pytest

from operations import sizing
from operations.sizing import GIB, MIB, Node


def nodes(count=3, gpus=8, memory_mib=81559, model="NVIDIA H100 80GB HBM3", ram=2048 * GIB):
    return [Node(f"gpu-{i:02d}", gpus, model, memory_mib, ram) for i in range(1, count + 1)]


@pytest.mark.parametrize(("tp", "expected"), [(1, 1 * GIB), (2, 3 * GIB), (8, 15 * GIB)])
def test_shm_grows_per_rank_from_a_floor(tp, expected):
    assert sizing.shm_bytes(tp, [2048 * GIB]) == expected


def test_shm_is_capped_by_the_smallest_nodes_memory():
    assert sizing.shm_bytes(8, [16 * GIB, 2048 * GIB]) == 4 * GIB  # a quarter of 16 GiB


def test_shm_override_wins_and_a_tiny_host_still_gets_dockers_default():
    assert sizing.shm_bytes(8, [2048 * GIB], override_gb=0.5) == GIB // 2
    assert sizing.shm_bytes(1, [100 * MIB]) == 64 * MIB


def test_a_model_that_fits_has_no_problems():
    assert sizing.fit_problems("llama", 3, 2, 0.9, None, nodes(), 16 * GIB) == []


def test_tensor_parallel_above_any_node_is_refused_with_the_numbers():
    problems = sizing.fit_problems("llama", 1, 16, 0.9, None, nodes(gpus=8), 0)
    assert problems == ["model llama: tensor_parallel_size 16 needs 16 GPUs on one node; "
                        "the most any node has is 8 (gpu-01)"]


def test_more_replicas_than_nodes_is_refused():
    problems = sizing.fit_problems("llama", 4, 1, 0.9, None, nodes(count=3), 0)
    assert len(problems) == 1 and "replicas 4 need 4 nodes" in problems[0] and "3 such node(s)" in problems[0]


def test_weights_larger_than_gpu_memory_are_refused_with_the_numbers():
    # 140 GiB of weights on one 80 GB GPU at 0.9: 140 GiB per GPU against 71.7 GiB.
    problems = sizing.fit_problems("llama-70b", 1, 1, 0.9, None, nodes(), 140 * GIB)
    assert len(problems) == 1
    assert "weights of 140.0 GiB over tensor_parallel_size 1 need 140.0 GiB per GPU" in problems[0]
    assert "81559 MiB x gpu_memory_utilization 0.9 = 71.7 GiB" in problems[0]
    # Split over 2 GPUs it fits.
    assert sizing.fit_problems("llama-70b", 1, 2, 0.9, None, nodes(), 140 * GIB) == []


def test_a_gpu_model_no_node_has_is_refused():
    problems = sizing.fit_problems("llama", 1, 1, 0.9, "NVIDIA B200", nodes(), 0)
    assert problems == ["model llama: gpu_model 'NVIDIA B200' is on no active node "
                        "(nodes have: NVIDIA H100 80GB HBM3)"]


def test_drained_nodes_do_not_count():
    fleet = nodes(count=2) + [Node("gpu-03", 8, "NVIDIA H100 80GB HBM3", 81559, GIB, available=False)]
    assert "2 such node(s)" in sizing.fit_problems("llama", 3, 1, 0.9, None, fleet, 0)[0]


def test_engines_roll_stop_first_even_with_a_spare_node():
    # start-first deadlocked against max_replicas_per_node on the lab (see update_order).
    assert sizing.update_order(3, 1, nodes(count=3)) == "stop-first"
    assert sizing.update_order(2, 1, nodes(count=3)) == "stop-first"


def test_weights_bytes_counts_weight_files_only():
    manifest = {"files": [{"path": "model-00001.safetensors", "size": 10},
                          {"path": "model-00002.safetensors", "size": 5},
                          {"path": "tokenizer.json", "size": 1000}]}
    assert sizing.weights_bytes(manifest) == 15
    assert sizing.weights_bytes(None) == 0


def test_nodes_from_the_swarms_view():
    node = Node.from_swarm({"hostname": "gpu-01", "availability": "active", "state": "ready",
                            "memory_bytes": 5, "labels": {"gpufleet.gpu.count": "4",
                                                          "gpufleet.gpu.model": "NVIDIA A100",
                                                          "gpufleet.gpu.memory-mib": "40960"}})
    # No gpufleet.host label: a node no run with a manager has labelled yet (not monitored).
    assert node == Node("gpu-01", 4, "NVIDIA A100", 40960, 5, True, labelled=False)
    assert Node.from_swarm({"hostname": "gpu-01", "role": "manager",
                            "labels": {"gpufleet.host": "gpu-01"}}).labelled is True
    assert Node.from_swarm({"hostname": "x", "availability": "drain", "state": "ready"}).available is False


def test_a_node_drained_for_maintenance_is_still_rendered_for():
    """The rollout labels the nodes it drains: the stack (gateway servers, shm) stays rendered
    for them, as for a node that is down, so a run during the rollout does not roll the stack
    and the run after it does not roll it back. A node an operator drained is not."""
    maintained = Node.from_swarm({"hostname": "gpu-02", "availability": "drain", "state": "ready",
                                  "labels": {sizing.MAINTENANCE_LABEL: "rollout",
                                             "gpufleet.gpu.count": "2"}})
    drained = Node.from_swarm({"hostname": "gpu-03", "availability": "drain", "state": "ready",
                               "labels": {"gpufleet.gpu.count": "2"}})
    assert maintained.available is False and maintained.active is True
    assert drained.active is False
    assert sizing.eligible_nodes([maintained, drained], 1, None, include_down=True) == [maintained]
    assert sizing.eligible_nodes([maintained, drained], 1, None) == []
