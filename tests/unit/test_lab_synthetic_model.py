"""The synthetic model for weight benchmarks (scripts/lab/hub/synthetic.py): a sharded checkpoint
of the size asked, the same revision on every machine, and the real huggingface_hub client gets
it from the hub stand-in with every shard matching its LFS sha256."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from scripts.lab.hub import synthetic
from tests.unit.test_lab_hub import _start  # the real client against the stand-in


def test_a_sharded_checkpoint_of_the_size_asked_with_a_stable_revision(tmp_path):
    repo, revision = synthetic.write_synthetic(tmp_path / "a", 4, 2)
    again = synthetic.write_synthetic(tmp_path / "b", 4, 2)
    assert (repo, revision) == again == ("gpufleet-lab/synthetic-4mib", again[1])
    files = tmp_path / "a" / repo / revision
    shards = synthetic.shard_names(2)
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name in shards:
        data = (files / name).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        begin, end = next(v for k, v in header.items() if k != "__metadata__")["data_offsets"]
        assert end - begin == 2 * synthetic.MIB == len(data) - 8 - length
    # incompressible, and not the same bytes in both shards
    one = (files / shards[0]).read_bytes()[-4096:]
    assert one != (files / shards[1]).read_bytes()[-4096:] and len(set(one)) > 200
    assert "LAB STAND-IN" in (files / "README.md").read_text()
    index = json.loads((files / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    # a repository already there is kept, not written again
    mtime = (files / shards[0]).stat().st_mtime_ns
    assert synthetic.write_synthetic(tmp_path / "a", 4, 2) == (repo, revision)
    assert (files / shards[0]).stat().st_mtime_ns == mtime


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="shards"):
        synthetic.write_synthetic("/nonexistent", 2, 3)


def test_the_real_client_downloads_and_verifies_it(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    root = tmp_path / "hub"
    repo, revision = synthetic.write_synthetic(root, 3, 3)
    hub = _start(monkeypatch, huggingface_hub, root)
    try:
        api = huggingface_hub.HfApi(endpoint=hub.base_url, token=False)
        info = api.model_info(repo, revision=revision, files_metadata=True)
        assert info.sha == revision
        out = tmp_path / "out"
        huggingface_hub.snapshot_download(repo, revision=revision, local_dir=out,
                                          endpoint=hub.base_url, token=False)
        for sibling in info.siblings:
            if sibling.lfs:
                digest = hashlib.sha256((out / sibling.rfilename).read_bytes()).hexdigest()
                assert digest == sibling.lfs.sha256, sibling.rfilename
    finally:
        hub.shutdown()
        hub.server_close()
