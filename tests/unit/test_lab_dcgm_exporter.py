"""The lab's dcgm-exporter stand-in (scripts/lab/dcgm/exporter.py): dcgm-exporter's names, types
and labels from the simulated nvidia-smi, the XID from the GPU's LAB FAULT."""

import subprocess

from scripts.lab.dcgm import exporter

SMI = ("0, GPU-aaaa, NVIDIA H100 80GB HBM3, 00000000:18:00.0, 580.95.05, 0, 0, 81559, 92, 70.00, 2\n"
       "Unable to determine the device handle for GPU00000000:2A:00.0: Unknown Error\n")


def fake_run(argv, **kwargs):
    assert argv[0] == "nvidia-smi" and argv[2] == "--format=csv,noheader,nounits"
    return subprocess.CompletedProcess(argv, 15, SMI, "")


def test_a_lost_gpu_is_left_out_and_the_xid_comes_from_its_fault(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "FAULTS_DIR", str(tmp_path))
    gpus = exporter.read_gpus(run=fake_run)
    assert [g["uuid"] for g in gpus] == ["GPU-aaaa"] and gpus[0]["xid"] == "0"
    (tmp_path / "0").write_text("temperature=92\nxid=79\n")
    assert exporter.read_gpus(run=fake_run)[0]["xid"] == "79"


def test_names_types_and_labels_are_dcgm_exporters(tmp_path):
    (tmp_path / "0").write_text("xid=79\n")
    assert exporter.fault("0", "xid", str(tmp_path)) == "79"
    assert exporter.fault("1", "xid", str(tmp_path)) is None
    gpu = dict(zip(exporter.FIELDS, [v.strip() for v in SMI.splitlines()[0].split(",")]))
    gpu["xid"] = "79"
    text = exporter.render([gpu], "node-1")
    labels = ('gpu="0",UUID="GPU-aaaa",pci_bus_id="00000000:18:00.0",device="nvidia0",'
              'modelName="NVIDIA H100 80GB HBM3",Hostname="node-1",DCGM_FI_DRIVER_VERSION="580.95.05"')
    assert f"DCGM_FI_DEV_GPU_TEMP{{{labels}}} 92" in text
    assert f"DCGM_FI_DEV_XID_ERRORS{{{labels}}} 79" in text
    assert f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} 70.0" in text
    assert f"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{labels}}} 2" in text
    assert "# TYPE DCGM_FI_DEV_ECC_DBE_VOL_TOTAL counter" in text
    assert "# TYPE DCGM_FI_DEV_FB_FREE gauge" in text
