"""GPU health rules (operations/gpu_health.py) and the lab's GPU faults that exercise them."""

from __future__ import annotations

import pytest

from operations import gpu_health as gh
from operations.toolkit import gpu_daemon_config
from scripts.lab import gpu_faults

UUID0 = "GPU-3f8a2b1c-7d4e-4a5b-9c6d-1e2f3a4b5c6d"
UUID1 = "GPU-8c9d0e1f-2a3b-4c5d-8e7f-6a5b4c3d2e1f"


def gpu(index=0, uuid=UUID0, bus="00000000:18:00.0", **health):
    return {"index": index, "uuid": uuid, "pci_bus_id": bus, "lost": False, **health}


def test_bus_key_matches_nvidia_smi_and_kernel_log_forms():
    assert gh.bus_key("00000000:2A:00.0") == gh.bus_key("0000:2a:00") == "0000:2a:00"
    assert gh.bus_key("0001:18:00.0") != gh.bus_key("0000:18:00.0")  # another PCI domain
    assert gh.bus_key("not a bus") is None


@pytest.mark.parametrize("health, reason", [
    ({"ecc_uncorrected": 2}, "2 uncorrected ECC error(s) since the driver loaded"),
    ({"retired_pages_pending": True}, "retired pages pending (a reset or reboot retires them)"),
    ({"remap_pending": True}, "row remapping pending (a GPU reset activates it)"),
    ({"remap_failed": True}, "row remapping failed (NVIDIA: the GPU needs service)"),
    ({"recovery_action": "Drain and Reset"}, "the driver asks for recovery: Drain and Reset"),
    ({"xids": [79]}, "Xid 79 since boot (GPU has fallen off the bus)"),
    ({"xids": [95]}, "Xid 95 since boot (uncontained ECC error)"),
    ({"xids": [119]}, "Xid 119 since boot (GSP RPC timeout)"),
    ({"lost": True, "lost_error": "Unknown Error"},
     "lost: nvidia-smi cannot reach it (Unknown Error)"),
])
def test_each_rule_names_its_reason(health, reason):
    assert gh.unhealthy_reasons(gpu(**health)) == [reason]


@pytest.mark.parametrize("health", [
    {},
    {"ecc_uncorrected": 0, "retired_pages_pending": None, "remap_pending": False,
     "remap_failed": False, "recovery_action": "None"},
    {"xids": [13, 31, 43]},  # application faults: the application's, not the GPU's
    {"xids": [63, 94]},      # a row marked for remapping: the remapper's pending flag says so
    {"ecc_uncorrected": None, "recovery_action": "N/A"},  # not reported by this GPU
])
def test_a_healthy_gpu_has_no_reason(health):
    assert gh.unhealthy_reasons(gpu(**health)) == []


def test_serving_gpus_leaves_out_the_unhealthy_by_uuid_and_by_bus():
    listed = [gpu(0, UUID0, "00000000:18:00.0"), gpu(1, UUID1, "00000000:2A:00.0")]
    ecc = {"gpus": [gpu(0, UUID0, "00000000:18:00.0", ecc_uncorrected=1)]}
    assert [g["uuid"] for g in gh.serving_gpus(listed, ecc)] == [UUID1]
    # An Xid seen for a bus whose GPU nvidia-smi still lists: matched by its address.
    xid = {"gpus": [{"index": None, "uuid": None, "pci_bus_id": "0000:2a:00", "xids": [48]}]}
    assert [g["uuid"] for g in gh.serving_gpus(listed, xid)] == [UUID0]
    assert gh.serving_gpus(listed, {"gpus": []}) == listed


def test_the_daemon_config_advertises_only_serving_gpus():
    listed = [gpu(0, UUID0), gpu(1, UUID1, "00000000:2A:00.0")]
    health = {"gpus": [gpu(1, UUID1, "00000000:2A:00.0", remap_failed=True)]}
    config = gpu_daemon_config(gh.serving_gpus(listed, health))
    assert config["node-generic-resources"] == [f"NVIDIA-GPU={UUID0}"]


def test_a_lost_gpu_is_named_only_when_one_advertised_uuid_is_missing():
    def lost():
        return [{"index": None, "uuid": None, "pci_bus_id": "0000:2A:00.0", "reasons": ["lost"]}]

    assert gh.name_lost_gpus(lost(), [UUID0, UUID1], [UUID0])[0]["uuid"] == UUID1
    # Two UUIDs missing for one lost GPU: which is which cannot be told, so neither is claimed.
    assert gh.name_lost_gpus(lost(), [UUID0, UUID1, "GPU-x"], [UUID0])[0]["uuid"] is None
    assert gh.name_lost_gpus(lost(), [], [UUID0])[0]["uuid"] is None


def test_describe_gives_host_index_uuid_and_every_reason():
    bad = {"index": 1, "uuid": UUID1, "pci_bus_id": "00000000:2A:00.0",
           "reasons": ["a", "b"]}
    assert gh.describe(bad) == f"GPU 1 {UUID1} (00000000:2A:00.0): a; b"


def test_lab_fault_scripts_write_one_key_per_gpu_and_refuse_unknown_faults():
    script = gpu_faults.fault_script(1, "ecc=3")
    assert "/run/nvidia-sim/faults/1" in script and "echo 'ecc_uncorrected=3'" in script
    assert "/etc/gpu-simulator/faults/0" in gpu_faults.fault_script(0, "remap-failed")
    assert "recovery_action=Reset" in gpu_faults.fault_script(0, "recovery")
    assert gpu_faults.fault_script(0, "clear").startswith("rm -f ")
    with pytest.raises(ValueError, match="unknown GPU fault 'melted'"):
        gpu_faults.fault_script(0, "melted")
    with pytest.raises(ValueError, match="letters, digits"):
        gpu_faults.fault_script(0, "recovery=x; reboot")


def test_the_report_has_one_row_per_gpu_and_names_a_lost_one_from_daemon_json():
    from scripts import gpu_health as report

    health = {"available": True, "error": None, "gpus": [
        gpu(0, UUID0, "00000000:18:00.0", ecc_uncorrected=0),
        {"index": None, "uuid": None, "pci_bus_id": "0000:2A:00.0", "lost": True,
         "lost_error": "Unknown Error", "xids": [79]}]}
    nvidia = {"gpus": [{"index": 0, "uuid": UUID0}]}
    daemon = {"config": {"node-generic-resources": [f"NVIDIA-GPU={UUID0}", f"NVIDIA-GPU={UUID1}"]}}
    rows = report.host_rows("gpu-01", health, nvidia, daemon)
    assert [(r["gpu"], r["uuid"], r["state"], r["advertised"]) for r in rows] == [
        (0, UUID0, "healthy", True), (None, UUID1, "UNHEALTHY", True)]
    assert rows[1]["reason"].startswith("lost: nvidia-smi cannot reach it (Unknown Error); Xid 79")
    assert report.exit_code(rows) == report.EXIT_UNHEALTHY
    assert report.exit_code(rows[:1]) == report.EXIT_HEALTHY
    unread = report.host_rows("gpu-02", {"available": False, "error": "nvidia-smi is not installed",
                                         "gpus": []}, {}, {})
    assert report.exit_code(rows + unread) == report.EXIT_HOST_FAILED
    table = report.render(rows + unread).splitlines()
    assert table[0].split() == list(report.HEADER) and "not read" in table[-1]
