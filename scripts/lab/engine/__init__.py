"""The lab's CPU engine image: a LAB STAND-IN for vllm/vllm-openai (see README.md here).

    tag = ensure_image()     # gpufleet-lab-engine:<hash of the recipe and the base>, built once

The build context is assembled from the files of the recipe only (Dockerfile, .dockerignore,
requirements.txt, labengine/*.py) plus this machine's CA bundle (pip's trust store in the
build stage only), so the tag hashes what the image is made of and nothing a test run leaves
behind (__pycache__). Standard library only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from scripts.lab import images

ENGINE_DIR = Path(__file__).resolve().parent
IMAGE_NAME = f"{images.IMAGE_PREFIX}engine"
# Where the lab registry holds it: the production image's name under the lab's namespace.
REPOSITORY = "lab/vllm-openai"
PORT = 8000
# The build machine's trust store, for pip in the build (a TLS-inspecting proxy's CA included).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def recipe_files() -> list[Path]:
    """The files the image is built from, relative to ENGINE_DIR, in a stable order."""
    files = [Path("Dockerfile"), Path(".dockerignore"), Path("requirements.txt")]
    files += sorted(p.relative_to(ENGINE_DIR) for p in (ENGINE_DIR / "labengine").glob("*.py"))
    return files


def ensure_image() -> str:
    """Build (or reuse) the engine image; returns its tag."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-engine-") as tmp:
        for relative in recipe_files():
            target = Path(tmp, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ENGINE_DIR / relative, target)
        ca = Path(tmp, "build-ca.crt")
        ca.write_bytes(HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b"")
        return images.ensure_image(IMAGE_NAME, Path(tmp),
                                   "lab CPU engine, a stand-in for vllm/vllm-openai")
