"""The lab's CPU engine image: a LAB STAND-IN for vllm/vllm-openai (see README.md here).

    tag = ensure_image()     # gpufleet-lab-engine:<hash of the recipe and the base>, built once

The build context is assembled from the files of the recipe only (Dockerfile, .dockerignore,
requirements.txt, labengine/*.py) plus this machine's CA bundle (pip's trust store in the
build stage only), so the tag hashes what the image is made of and nothing a test run leaves
behind (__pycache__). Standard library only.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from scripts.lab import images

ENGINE_DIR = Path(__file__).resolve().parent
IMAGE_NAME = f"{images.IMAGE_PREFIX}engine"
# The Dockerfile's first stage (the venv of pinned wheels), tagged so that its layers stay in
# the build cache (an untagged stage is a dangling image: `docker image prune` drops it, and a
# code change would then download every wheel again).
VENV_IMAGE_NAME = f"{images.IMAGE_PREFIX}engine-venv"
VENV_INPUTS = ("Dockerfile", "requirements.txt", "build-ca.crt")
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
        base = images.ensure_base()
        if not images._image_exists(f"{IMAGE_NAME}:{images.recipe_hash(Path(tmp), extra=base)}"):
            _ensure_venv_stage(Path(tmp), base)
        return images.ensure_image(IMAGE_NAME, Path(tmp),
                                   "lab CPU engine, a stand-in for vllm/vllm-openai")


# The TGI and Ollama stand-ins: the engine image with the upstream image's entrypoint, user and
# environment (TGI: /tgi-entrypoint.sh runs text-generation-launcher, as root; Ollama:
# ENTRYPOINT ["/bin/ollama"], CMD ["serve"], OLLAMA_HOST=0.0.0.0:11434, as root: ollama/ollama
# v0.12.6 Dockerfile).
FLAVOURS = {
    "tgi": {"repository": "lab/text-generation-inference", "what": "TGI 3.3.6",
            "instructions": 'ENTRYPOINT ["text-generation-launcher"]\n'},
    "ollama": {"repository": "lab/ollama", "what": "Ollama 0.12.6",
               "instructions": 'ENV OLLAMA_HOST=0.0.0.0:11434\nEXPOSE 11434\n'
                               'ENTRYPOINT ["ollama"]\nCMD ["serve"]\n'},
}


def ensure_flavour(engine: str) -> str:
    """The TGI or Ollama stand-in image (built on the engine image); returns its tag."""
    flavour = FLAVOURS[engine]
    dockerfile = (f"# LAB STAND-IN for {flavour['what']}: the gpu-fleet lab CPU engine, not "
                  f"{flavour['what']}\nARG BASE\nFROM {ensure_image()}\nUSER root\nWORKDIR /\n"
                  f"{flavour['instructions']}"
                  f'LABEL org.opencontainers.image.title="gpu-fleet lab CPU engine ({engine})" \\\n'
                  f'      org.opencontainers.image.description="gpu-fleet lab CPU engine: a LAB '
                  f'STAND-IN for {flavour["what"]} (numpy forward pass of the lab\'s tiny Llama)"\n')
    return images.ensure_image_from(f"{IMAGE_NAME}-{engine}", {"Dockerfile": dockerfile},
                                    f"lab CPU engine, a stand-in for {flavour['what']}")


def _ensure_venv_stage(context: Path, base: str) -> None:
    """Build (or keep) the venv stage as <VENV_IMAGE_NAME>:<hash of what it is made of>."""
    tag = f"{VENV_IMAGE_NAME}:{images.recipe_hash(*(context / n for n in VENV_INPUTS), extra=base)}"
    if images._image_exists(tag):
        return
    images._say(f"building the engine's venv stage {tag} (pinned wheels from PyPI)")
    result = subprocess.run(["docker", "build", "--target", "venv", "--build-arg", f"BASE={base}",
                             "-t", tag, str(context)], capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-800:]
        raise images.ImageError(f"docker build of {tag} failed: {output}")
