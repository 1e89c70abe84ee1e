"""A synthetic model of a chosen size for weight-distribution benchmarks (LAB STAND-IN, no model).

The tiny model (model.py) is what the lab engine runs; it is 0.5 MiB, so distributing it proves
nothing about bandwidth. This repository has the shape of a real sharded checkpoint (config.json,
`model-0000N-of-0000M.safetensors` shards, `model.safetensors.index.json`, LFS rules) and a size
chosen on the command line; its tensors are seeded pseudo-random bytes (incompressible, like real
weights), generated on demand into the hub's data directory and never committed.

    python3 -m scripts.lab.hub.synthetic ROOT --mib 1024 --shards 4
    # -> gpufleet-lab/synthetic-1024mib <revision>   (the same revision on every machine)

No engine can serve it: it exists to be downloaded, verified and distributed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import struct
import sys
from pathlib import Path

from . import gitobjects

MIB = 1024 * 1024
SEED = 20261206
MESSAGE = "gpu-fleet lab synthetic model (seeded random bytes, not a model)"
TIMESTAMP = 1767225600


def repo_id(mib: int) -> str:
    return f"gpufleet-lab/synthetic-{mib}mib"


def _safetensors_header(name: str, size: int) -> bytes:
    header = {"__metadata__": {"format": "pt", "lab": "synthetic stand-in"},
              name: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def shard_names(shards: int) -> list[str]:
    return [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]


def _write_shard(path: Path, tensor: str, size: int, seed: int) -> tuple[int, str]:
    """One shard: a safetensors header and `size` seeded bytes. Returns (bytes, sha256)."""
    digest = hashlib.sha256()
    stream = random.Random(seed)
    with open(path, "wb") as handle:
        head = _safetensors_header(tensor, size)
        handle.write(head)
        digest.update(head)
        left = size
        while left:
            block = stream.randbytes(min(8 * MIB, left))
            handle.write(block)
            digest.update(block)
            left -= len(block)
    return len(head) + size, digest.hexdigest()


def small_files(mib: int, shards: int) -> dict[str, bytes]:
    per_shard = mib * MIB // shards
    index = {"metadata": {"total_size": per_shard * shards},
             "weight_map": {f"model.layers.{i}.weight": name
                            for i, name in enumerate(shard_names(shards))}}
    config = {"architectures": ["SyntheticForBenchmarks"], "model_type": "gpufleet-synthetic",
              "lab_stand_in": True, "size_mib": mib, "shards": shards}
    card = (f"# {repo_id(mib)}: LAB STAND-IN, not a model\n\nSeeded random bytes in {shards} "
            f"safetensors shards ({mib} MiB), made by scripts/lab/hub/synthetic.py for weight-"
            "distribution benchmarks. Nothing can run it.\n")
    return {
        ".gitattributes": gitobjects.HF_GITATTRIBUTES.encode(),
        "README.md": card.encode(),
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "model.safetensors.index.json": (json.dumps(index, indent=2) + "\n").encode(),
    }


def write_synthetic(root: Path, mib: int, shards: int) -> tuple[str, str]:
    """The repository under root (as model.write_repo lays one out). Returns (repo_id, revision);
    a repository already there with every shard at its size is kept as it is."""
    if mib < 1 or not 1 <= shards <= mib:
        raise ValueError(f"--mib {mib} --shards {shards}: expected 1 <= shards <= mib")
    repo = repo_id(mib)
    base = Path(root) / repo
    ref = base / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        if all((base / revision / n).is_file() for n in shard_names(shards)):
            return repo, revision
    staging = base / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = small_files(mib, shards)
    blobs = dict(files)
    per_shard = mib * MIB // shards
    for index, name in enumerate(shard_names(shards), start=1):
        size, sha = _write_shard(staging / name, f"model.layers.{index - 1}.weight", per_shard,
                                 SEED + index)
        blobs[name] = f"{gitobjects.LFS_SPEC}\noid sha256:{sha}\nsize {size}\n".encode()
    for path, content in files.items():
        (staging / path).write_bytes(content)
    revision = gitobjects.commit_sha1_of_blobs(blobs, MESSAGE, TIMESTAMP)
    shutil.rmtree(base / revision, ignore_errors=True)
    staging.rename(base / revision)
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(revision)
    return repo, revision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        print(*write_synthetic(args.root, args.mib, args.shards))
    except ValueError as error:
        print(f"synthetic: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
