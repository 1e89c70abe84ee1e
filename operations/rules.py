"""What a value means, checked before any host is touched: the rules beyond a key's type.

Plain functions, called from the configuration model's validators (operations/config.py) and
from the inventory check (operations/inventory_check.py). Each returns what is wrong as the
text after "expected ...", or None / [] when the value is good. Each rule has a case in
tests/unit/test_bad_input.py.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Any

# --- Addresses and ports ----------------------------------------------------------------------

# Linux interface names: at most IFNAMSIZ - 1 = 15 characters, no '/', ':' or whitespace.
_INTERFACE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$")
_DOTTED = re.compile(r"^[0-9.]+$")


def split_advertise_address(value: str) -> tuple[str, str | None]:
    """<ip|interface>[:port], IPv6 with a port written [addr]:port -> (ip or interface, port)."""
    if value.startswith("["):
        address, _, rest = value[1:].partition("]")
        return address, (rest[1:] or None) if rest.startswith(":") else (rest or None)
    if value.count(":") == 1:
        address, port = value.split(":")
        return address, port
    return value, None


def advertise_address_problem(value: str) -> str | None:
    """`docker swarm init/join --advertise-addr` takes <ip|interface>[:port] (Docker's CLI
    reference, "docker swarm init"). An IPv6 address with a port is written [addr]:port."""
    address, port = split_advertise_address(value)
    if value.startswith("[") and value.partition("]")[2][:1] not in ("", ":"):
        return "an IP address or interface name, optionally :port (IPv6 as [addr]:port)"
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"a port from 1 to 65535 after the address ({port!r} is not)"
    try:
        ipaddress.ip_address(address)
        return None
    except ValueError:
        pass
    if _DOTTED.match(address):
        return f"an IPv4 address of four numbers from 0 to 255 ({address!r} is not one)"
    if _INTERFACE.match(address):
        return None
    return "an IP address or interface name (up to 15 letters, digits, '.', '_', '-'), optionally :port"


def cidr_problem(value: str) -> str | None:
    """An IPv4 source network for iptables (-s): an address or address/prefix, host bits clear.
    IPv6 is not offered: the engine firewall is written for iptables only (README)."""
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        return f"an IPv4 address or network such as 10.0.0.5 or 10.0.0.0/24 ({error})"
    if network.version != 4:
        return "an IPv4 address or network (the engine firewall is written for iptables, IPv4)"
    return None


# Ports Docker Swarm itself uses on every node (Docker's "Use overlay networks" guide: 2377/tcp
# cluster management, 7946/tcp+udp node communication, 4789/udp overlay traffic) and sshd's,
# which pyinfra reaches the hosts on: a service published on the nodes must not take one.
RESERVED_PORTS = {22: "sshd", 2377: "Swarm cluster management", 7946: "Swarm node gossip",
                  4789: "Swarm overlay (VXLAN)"}


def reserved_port_problem(port: int) -> str | None:
    if port in RESERVED_PORTS:
        return f"a port not used on the nodes themselves ({port} is {RESERVED_PORTS[port]})"
    return None


# --- Images -------------------------------------------------------------------------------------

# Docker's reference grammar (distribution/reference: domain, path components in lowercase,
# tag, digest), with a tag or a digest required: the stack pins what it runs.
_REFERENCE = re.compile(
    r"^(?:(?P<domain>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def image_problem(value: str) -> str | None:
    """A pinned image reference: name[:tag][@sha256:digest], a tag other than latest or a
    digest."""
    match = _REFERENCE.match(value)
    if not match:
        return ("an image reference such as 'vllm/vllm-openai:v0.11.0' (lowercase name, "
                "then :tag and/or @sha256:digest)")
    if not match["tag"] and not match["digest"]:
        return f"an image pinned by tag or digest ({value!r} has neither: it would float)"
    if match["tag"] == "latest" and not match["digest"]:
        return f"an image pinned by a tag other than 'latest' or by digest ({value!r} would float)"
    return None


# --- Engine flags -------------------------------------------------------------------------------

# Flags each engine gets from the deploy itself (operations/stack.engine_command and the
# wrapper's secrets): set twice, the engine would take the last one and the gateway, the smoke
# tests and the placement would no longer match what runs. vLLM's names and aliases are those
# of `vllm serve --help` (vllm/engine/arg_utils.py: -tp for --tensor-parallel-size); TGI's of
# text-generation-launcher (launcher/src/main.rs, clap Args; -p is --port).
MANAGED_FLAGS: dict[str, dict[str, str]] = {
    "vllm": {
        "--model": "models[].name (the weights' path)", "--served-model-name": "served_model_name",
        "--host": "the deploy (0.0.0.0 on the node's network)", "--port": "models[].port",
        "--tensor-parallel-size": "tensor_parallel_size", "-tp": "tensor_parallel_size",
        "--gpu-memory-utilization": "gpu_memory_utilization", "--max-model-len": "max_model_len",
        "--api-key": "stack_api_key_file (a Docker secret)", "--download-dir": "models_dir",
    },
    "tgi": {
        "--model-id": "models[].name (the weights' path)",
        # Not a flag of TGI's launcher at all: clap would refuse it and TGI never start.
        "--served-model-name": "served_model_name (TGI has no such flag: the gateway answers the "
                               "served name)",
        "--hostname": "the deploy (0.0.0.0 on the node's network)", "--port": "models[].port",
        "-p": "models[].port", "--num-shard": "tensor_parallel_size",
        "--cuda-memory-fraction": "gpu_memory_utilization", "--max-total-tokens": "max_model_len",
        "--api-key": "stack_api_key_file (a Docker secret)",
    },
}


def engine_args_problem(engine: str, args: list[str]) -> str | None:
    """Flags in models[].engine_args that the deploy sets itself, or any flag for Ollama (its
    `ollama serve` takes none: it is configured through OLLAMA_* environment variables)."""
    if engine == "ollama":
        return "no engine_args for engine 'ollama' (`ollama serve` takes no flags)" if args else None
    managed = MANAGED_FLAGS.get(engine, {})
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in managed:
            return (f"engine flags the deploy does not set itself: {flag} comes from "
                    f"{managed[flag]}")
    return None


def gguf_file_problem(engine: str, serve: bool, gguf_file: str | None,
                      allow_patterns: list[str]) -> str | None:
    """Ollama serves only its own store, built from one GGUF file (ollama create's FROM): a
    served Ollama model names it, other engines do not, and allow_patterns must fetch it."""
    if engine == "ollama" and serve and not gguf_file:
        return ("a GGUF file of the repository (e.g. 'model-Q4_K_M.gguf') for a served model of "
                "engine 'ollama': Ollama serves only its own store, imported from a GGUF file")
    if gguf_file and engine != "ollama":
        return f"no gguf_file for engine {engine!r} (it serves the safetensors checkpoint)"
    if gguf_file and allow_patterns and not any(
            fnmatch.fnmatch(gguf_file, pattern) for pattern in allow_patterns):
        return f"allow_patterns that include {gguf_file!r} (it is imported into Ollama's store)"
    return None


# --- daemon.json --------------------------------------------------------------------------------

def daemon_config_problem(config: dict[str, Any], data_root: str) -> str | None:
    """docker_daemon_config keys that would undo what other keys promise: another data root
    than docker_data_root (preflight checks that one's disk), another default runtime than
    NVIDIA's (engines would not see GPUs), or generic resources (the GPUs the swarm advertises
    come from nvidia-smi)."""
    if "data-root" in config and str(config["data-root"]).rstrip("/") != data_root.rstrip("/"):
        return f"no 'data-root' other than docker_data_root ({data_root}): set docker_data_root"
    if "default-runtime" in config and config["default-runtime"] != "nvidia":
        return "no 'default-runtime' other than 'nvidia' (engines would not see their GPUs)"
    if "node-generic-resources" in config:
        return "no 'node-generic-resources' (the deploy advertises the GPUs nvidia-smi finds)"
    return None


# --- Files on the control machine -------------------------------------------------------------

def private_file_problem(path: str) -> str | None:
    """A file on the control machine: there, a regular file, and private (no group or other
    permission bits: 0600 or 0400). A TLS private key is checked with this alone (several
    lines); a one-line secret with secret_file_problem."""
    target = Path(os.path.expanduser(path))
    try:
        info = target.stat()
    except OSError as error:
        return f"a readable file on the control machine ({error.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "a regular file on the control machine (this is not one)"
    if info.st_mode & 0o077:
        return (f"a private file (mode 0600 or 0400; this one is {stat.S_IMODE(info.st_mode):04o}): "
                f"chmod 600 {path}")
    return None


def secret_file_problem(path: str) -> str | None:
    """A file holding a secret on the control machine: private (private_file_problem),
    readable, not empty, one line."""
    problem = private_file_problem(path)
    if problem:
        return problem
    target = Path(os.path.expanduser(path))
    try:
        value = target.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        return f"a file this user can read on the control machine ({getattr(error, 'strerror', error)})"
    if not value or "\n" in value:
        return "a file holding the secret on one line (as operations/stack_secrets.py reads it)"
    return None
