"""Stand-in services on the lab network, started by `scripts/lab.py up` before the deploy.

Each returns the configuration keys that point the production code at it: they are written to
.lab/<lab>/hosts.json under "settings", and inventories/lab.py hands them to every lab host as
host data. That is the only way a stand-in enters a run: production code knows none of them.

    .2  the NVIDIA stand-in: signed apt repositories laid out like NVIDIA's (scripts/lab/nvidia_sim)
    .3  the Hugging Face Hub stand-in: a tiny model behind the Hub's API, token required (scripts/lab/hub)
    .5  the Docker stand-in: a signed apt repository laid out like Docker's, Debian's builds of
        Docker Engine under Docker's package names (scripts/lab/docker_sim)
    .4  the registry stand-in: images the lab builds offline, pulled by the hosts (scripts/lab/registry),
        among them the inference stack's stand-ins: the CPU engine for vllm/vllm-openai
        (scripts/lab/engine) and the gateway for haproxy (scripts/lab/gateway)
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from scripts.lab import fleet

NVIDIA_REPO_OCTET = 2
HUB_OCTET = 3
REGISTRY_OCTET = 4
DOCKER_REPO_OCTET = 5
# The image of the GPU container check: a plain Debian userland, as NVIDIA's own checks use a
# plain distribution image (the runtime brings nvidia-smi into the container).
VERIFY_IMAGE = "lab/debian:bookworm"


def start(lab: str, subnet: ipaddress.IPv4Network, state_dir: Path) -> dict[str, object]:
    """Start (or keep) every stand-in the deploy uses; return the settings that select them."""
    return {
        **nvidia_repositories(lab, subnet, state_dir),
        **docker_repository(lab, subnet, state_dir),
        **hub(lab, subnet, state_dir),
        **registry(lab, subnet),
        **api_key(state_dir),
    }


def _key_file(path: Path, prefix: str) -> str:
    """A random key in a 0600 file, made once and kept (the control machine's secrets source, as
    production's would be)."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(prefix + secrets.token_hex(24) + "\n")
    path.chmod(0o600)
    return str(path)


# Named clients of the lab's gateway beside the operator (stack_client_keys).
LAB_CLIENTS = ("alice", "bob")


def api_key(state_dir: Path) -> dict[str, object]:
    """The gateway's credentials: the operator's key (the deploy's own tools), a key for each
    named lab client, and the engines' internal key, each made once per lab in a 0600 file."""
    return {
        "stack_api_key_file": _key_file(state_dir / "api-key", "sk-lab-"),
        "stack_client_keys": {name: _key_file(state_dir / "clients" / f"{name}.key", f"sk-{name}-")
                              for name in LAB_CLIENTS},
        "stack_engine_key_file": _key_file(state_dir / "engine-key", "ek-lab-"),
    }


def tls_settings(lab: str, state_dir: Path) -> dict[str, object]:
    """The lab CA and the gateway's certificate (scripts/lab/tls.py), as the keys that turn HTTPS
    on: `lab.py tls on` writes them into the lab's settings, `lab.py tls off` takes them out."""
    import json
    import subprocess

    from scripts.lab import tls

    # In the repository's venv: cryptography is a pinned dependency there, lab.py is stdlib-only.
    venv = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    made = subprocess.run([str(venv), "-m", "scripts.lab.tls", str(state_dir / "tls"),
                           tls.server_name(lab)], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, check=True)
    paths = json.loads(made.stdout)
    return {"stack_gateway_tls_cert_file": paths["cert"], "stack_gateway_tls_key_file": paths["key"],
            "stack_gateway_ca_file": paths["ca"], "stack_gateway_tls_server_name": paths["name"]}


def stop(lab: str) -> None:
    """What `down` cannot find by label alone (this machine's push tags of the registry)."""
    from scripts.lab.registry import service as registry_service

    registry_service.remove(lab)


def nvidia_repositories(lab: str, subnet: ipaddress.IPv4Network, state_dir: Path) -> dict[str, object]:
    from scripts.lab.nvidia_sim import repo, server

    served = state_dir / "nvidia-sim" / "repo"
    paths = repo.build_repo(served, state_dir / "nvidia-sim" / "gnupg")
    base = server.start(lab, fleet.network_name(lab), fleet.service_address(subnet, NVIDIA_REPO_OCTET), served)
    fleet.say(f"NVIDIA stand-in repositories at {base} (SIMULATOR, signed with the lab's own key)")
    return nvidia_settings(base, paths)


def nvidia_settings(base: str, paths: dict) -> dict[str, object]:
    """The production keys that point at the stand-in (same layout as NVIDIA's servers, the lab's
    signing key instead of NVIDIA's)."""
    return {
        "nvidia_cuda_repo_url": f"{base}compute/cuda/repos",
        "nvidia_cuda_key_fingerprint": paths["fingerprint"],
        "nvidia_container_toolkit_repo_url": f"{base}libnvidia-container/stable/deb",
        "nvidia_container_toolkit_key_url": f"{base}{paths['toolkit_key']}",
        "nvidia_container_toolkit_key_fingerprint": paths["fingerprint"],
    }


def docker_repository(lab: str, subnet: ipaddress.IPv4Network, state_dir: Path) -> dict[str, object]:
    """Docker's apt repository, stood in for: the lab installs docker-ce from it the way
    production does (docker_engine_source "docker", pinned and held). Debian's files it carries
    are cached beside the labs (.lab/.cache), so a second lab or an `up` after `down` fetches
    nothing."""
    from scripts.lab.docker_sim import repo
    from scripts.lab.nvidia_sim import server

    served = state_dir / "docker-sim" / "repo"
    built = repo.build_repo(served, state_dir / "docker-sim" / "gnupg",
                            state_dir.parent / ".cache" / "docker-sim-debian")
    base = server.start(lab, fleet.network_name(lab),
                        fleet.service_address(subnet, DOCKER_REPO_OCTET), served,
                        role="docker-sim-repo")
    fleet.say(f"Docker stand-in repository at {base}linux/debian: docker-ce "
              f"{', '.join(built['versions'])} (LAB STAND-IN: Debian's builds, signed with the "
              "lab's own key)")
    return docker_settings(base, built)


def docker_settings(base: str, built: dict) -> dict[str, object]:
    """The production keys that point the Docker Engine phase at the stand-in. docker_version
    stays production's default (one of the engine versions the stand-in offers); containerd.io
    is pinned to the one it carries."""
    return {
        "docker_engine_source": "docker",
        "docker_apt_url": f"{base}{built['url_path']}",
        "docker_key_fingerprint": built["fingerprint"],
        "docker_containerd_version": built["companions"]["containerd.io"],
        "docker_buildx_version": built["companions"]["docker-buildx-plugin"],
        "docker_compose_version": built["companions"]["docker-compose-plugin"],
    }


def registry(lab: str, subnet: ipaddress.IPv4Network) -> dict[str, object]:
    from scripts.lab import images
    from scripts.lab.registry import service as registry_service

    address = fleet.service_address(subnet, REGISTRY_OCTET)
    reg = registry_service.start(lab, fleet.network_name(lab), address)
    verify_image = registry_service.push(lab, images.ensure_base(), VERIFY_IMAGE, reg)
    fleet.say(f"registry stand-in at {reg['address']} (plain HTTP, lab hosts only)")
    return {**registry_settings(reg["address"], verify_image), **stack_images(lab, reg)}


def stack_images(lab: str, reg: dict) -> dict[str, object]:
    """The inference stack's images, built here (cached by recipe hash) and pushed to the lab
    registry (skipped when it holds them already): LAB STAND-INS for vllm/vllm-openai and
    haproxy."""
    from scripts.lab import engine, gateway
    from scripts.lab.registry import service as registry_service

    pushed = {}
    for name, module in (("engine", engine), ("gateway", gateway)):
        local = module.ensure_image()
        pushed[name] = registry_service.push(lab, local, pushed_name(module.REPOSITORY, local), reg)
    for flavour, recipe in engine.FLAVOURS.items():
        local = engine.ensure_flavour(flavour)
        pushed[flavour] = registry_service.push(lab, local,
                                                pushed_name(recipe["repository"], local), reg)
    fleet.say(f"stack stand-ins in the registry: engines {pushed['engine']}, {pushed['tgi']}, "
              f"{pushed['ollama']} (the lab CPU engine, not vLLM, TGI or Ollama), gateway "
              f"{pushed['gateway']} (Debian's haproxy 2.6)")
    uids = {name: image_uid(module.ensure_image()) for name, module in (("vllm", engine), ("gateway", gateway))}
    return {**stack_image_settings(pushed["engine"], pushed["gateway"], pushed["tgi"],
                                   pushed["ollama"]),
            **monitoring_images(lab, reg),
            # The stand-ins run as users of their own: they must own the secrets mounted for
            # them (the TGI and Ollama stand-ins run as root, as the upstream images do).
            "stack_secret_uids": {"vllm": uids["vllm"], "tgi": 0, "ollama": 0, "gateway": uids["gateway"]}}


def monitoring_images(lab: str, reg: dict) -> dict[str, object]:
    """The monitoring stack's images (scripts/lab/dcgm), built here and pushed: LAB STAND-INS
    for prom/prometheus, prom/alertmanager, prom/node-exporter and NVIDIA's dcgm-exporter."""
    from scripts.lab import dcgm
    from scripts.lab.registry import service as registry_service

    local = dcgm.ensure_images()
    pushed = {name: registry_service.push(lab, tag, pushed_name(dcgm.repository(name), tag), reg)
              for name, tag in local.items()}
    fleet.say("monitoring stand-ins in the registry: " + ", ".join(pushed.values()) + " (Debian's "
              "Prometheus 2.42, Alertmanager 0.25, node-exporter 1.5; a dcgm-exporter that reads "
              "the simulated GPUs)")
    return {f"monitoring_{name.replace('-', '_')}_image": image for name, image in pushed.items()} | {
        # Debian's Alertmanager runs as its package's user: it must own the receiver's secret.
        "monitoring_secret_uids": {"alertmanager": image_uid(local["alertmanager"]), "grafana": 472}}


def image_uid(image: str) -> int:
    """The uid an image's processes run as (its USER), read by running `id -u` in it."""
    import subprocess

    result = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", image, "-u"],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"cannot read the user of {image}: {result.stderr.strip()}")
    return int(result.stdout.strip())


def pushed_name(repository: str, local_tag: str) -> str:
    """lab/<name>:<the local tag's recipe hash>: a changed recipe is a new tag, which Swarm
    pulls and rolls out; an unchanged one is the same reference on every `up`."""
    return f"{repository}:{local_tag.rpartition(':')[2]}"


def stack_image_settings(engine_image: str, gateway_image: str, tgi_image: str | None = None,
                         ollama_image: str | None = None) -> dict[str, object]:
    """The production keys that point the stack at the lab's stand-in images."""
    images = {"vllm": engine_image}
    images.update({k: v for k, v in (("tgi", tgi_image), ("ollama", ollama_image)) if v})
    return {"stack_engine_images": images, "stack_gateway_image": gateway_image}


def registry_settings(address: str, verify_image: str) -> dict[str, object]:
    """Lab hosts pull from the stand-in over plain HTTP, which dockerd allows only for registries
    it is told about."""
    return {
        "docker_daemon_config": {"insecure-registries": [address]},
        "nvidia_container_verify_image": verify_image,
    }


def hub(lab: str, subnet: ipaddress.IPv4Network, state_dir: Path) -> dict[str, object]:
    """The Hub stand-in, requiring a token as a gated production model does: the deploy must
    bring the token from the control machine's secrets source (a 0600 file here)."""
    import secrets

    from scripts.lab.hub import gguf_repo, model, service

    token_file = state_dir / "hf-token"
    if not token_file.exists():
        token_file.touch(mode=0o600)
        token_file.write_text("hf_lab_" + secrets.token_hex(16) + "\n")
    token_file.chmod(0o600)
    revision = model.write_repo(state_dir / "hub")
    gguf_revision = gguf_repo.write_repo(state_dir / "hub")
    endpoint = service.start(lab, fleet.network_name(lab), fleet.service_address(subnet, HUB_OCTET),
                             state_dir / "hub", token_file=token_file)
    fleet.say(f"Hub stand-in at {endpoint} serving {model.REPO_ID}@{revision[:12]} and "
              f"{gguf_repo.REPO_ID}@{gguf_revision} (token required)")
    return hub_settings(endpoint, token_file, model.REPO_ID, revision)


def hub_settings(endpoint: str, token_file: Path, repo_id: str, revision: str) -> dict[str, object]:
    return {
        "hf_endpoint": endpoint,
        "hf_token_file": str(token_file),
        # Two replicas on three hosts: a spare node, so updates roll start-first; and a fleet
        # with one host down (tests/lab/test_run.py) can still place them.
        "models": [{"name": "tiny-llama", "repo_id": repo_id, "revision": revision, "replicas": 2}],
        # The lab model is half a megabyte: verify every byte on every run.
        "weights_verify": "sha256",
        "weights_free_margin_gb": 0,
        # The control-machine cache lives with the lab, so `down` removes it too.
        "weights_cache_dir": str(Path(token_file).parent / "weights-cache"),
    }
