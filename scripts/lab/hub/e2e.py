"""End-to-end check of the lab hub container (lab stand-in, not huggingface.co).

    python -m scripts.lab.hub.e2e [--keep]

Builds the image (FROM the lab's shared base, about 15 s the first time), writes the tiny model
into a scratch directory, starts the hub with a token on a scratch bridge network
(172.31.250.0/24, created and removed here), then drives the real huggingface_hub client from
this machine against the container: a wrong token is refused (401), the right one downloads
every file intact, a second download moves no file bytes, a dropped connection is survived.
Cleans up everything unless --keep, except the image: the lab's shared, hash-tagged one, kept
like the base (`lab.py down --purge-images` removes it). Needs a Docker engine, debootstrap (for
the base) and huggingface_hub (pinned in pyproject.toml).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import model, service

LAB = "gpulab-hub-e2e"
NETWORK = f"{LAB}-net"
SUBNET = "172.31.250.0/24"
ADDRESS = "172.31.250.10"
TOKEN = "lab-hub-e2e-token"


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def lab_call(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def cleanup(workdir: Path) -> None:
    service.stop(LAB)
    service.remove_image(LAB)
    subprocess.run(["docker", "network", "rm", NETWORK], capture_output=True)
    shutil.rmtree(workdir, ignore_errors=True)


def run(keep: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="lab-hub-e2e-"))
    started = time.monotonic()
    try:
        subprocess.run(["docker", "network", "create", "--label", f"{service.LABEL}={LAB}",
                        "--subnet", SUBNET, NETWORK], capture_output=True)
        revision = model.write_repo(workdir / "data")
        token_file = workdir / "token"
        token_file.write_text(TOKEN + "\n")
        step("image (the lab base + python3, about 15 s when not built yet)")
        step(f"image {service.ensure_image(LAB)}")
        base = service.start(LAB, NETWORK, ADDRESS, workdir / "data", token_file=token_file)
        step(f"hub at {base}, {model.REPO_ID}@{revision}")

        os.environ["HF_ENDPOINT"] = base  # before the client is imported: it reads it once
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        import huggingface_hub as hf

        def download(dest: str, token: str | bool) -> Path:
            return Path(hf.snapshot_download(model.REPO_ID, revision="main",
                                             local_dir=workdir / dest, endpoint=base,
                                             cache_dir=workdir / "cache", token=token))

        try:
            download("wrong", "not-the-token")
            raise AssertionError("a wrong token was accepted")
        except hf.errors.HfHubHTTPError as e:
            assert e.response.status_code == 401, e
        step(f"wrong token refused (401); client huggingface_hub {hf.__version__}")

        lab_call(base, "/_lab/faults", {"mode": "drop", "file": "model.safetensors"})
        t = time.monotonic()
        out = download("weights", TOKEN)
        files = model.build_files()
        for name, content in files.items():
            assert (out / name).read_bytes() == content, name
        stats = lab_call(base, "/_lab/stats")
        assert stats["faults"] == {"drop": 1}, stats["faults"]
        step(f"downloaded {len(files)} files intact through a dropped connection in "
             f"{time.monotonic() - t:.1f} s ({stats['total_bytes']} bytes served)")

        lab_call(base, "/_lab/stats/reset", {})
        download("weights", TOKEN)
        assert lab_call(base, "/_lab/stats")["total_bytes"] == 0
        step("second download: 0 file bytes")
        logs = subprocess.run(["docker", "logs", service.container_name(LAB)],
                              capture_output=True).stderr.decode()
        assert TOKEN not in logs, "the token reached the log"
        step(f"OK in {time.monotonic() - started:.0f} s")
    finally:
        if keep:
            step(f"kept: container {service.container_name(LAB)}, network {NETWORK}, {workdir}")
        else:
            cleanup(workdir)


if __name__ == "__main__":
    run(keep="--keep" in sys.argv[1:])
