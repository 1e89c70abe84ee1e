"""Docker Engine's packages, from Docker's apt repository or the distribution: every one pinned
and held, Docker's key checked against its fingerprint (the install part of the Docker Engine
phase, operations/docker_engine.py).

- "docker": Docker's own apt repository (key /etc/apt/keyrings/docker.asc, used only when its
  fingerprint is `docker_key_fingerprint`; deb822 source /etc/apt/sources.list.d/docker.sources):
  docker-ce and docker-ce-cli at the apt version built from `docker_version` for the host's
  distribution; containerd.io and the buildx and compose plugins at their upstream versions
  (`docker_containerd_version`, ...: the apt revision is the repository's); all five held with
  `apt-mark hold`, so nothing of the engine floats under a running cluster.
- "distro": the distribution's own `docker.io` (what the lab uses).

A host already carrying the engine from the *other* source is refused, not converted: swapping
engines restarts every container and is a decision for an operator, not a side effect.

    install_engine(source="docker", version="28.5.2", apt_url=..., fingerprint=..., companions=...)
"""

from __future__ import annotations

import posixpath
from typing import Any

from pyinfra import host, logger
from pyinfra.api import FactBase, OperationError, QuoteString, StringCommand, operation
from pyinfra.operations import apt

from operations.apt_pins import apt_install, resolve_pin_lines, upstream_version
from operations.phase import explain, fails_only_this_host

DOCKER_KEYRING = "/etc/apt/keyrings/docker.asc"
DOCKER_SOURCES_NAME = "docker"  # -> /etc/apt/sources.list.d/docker.sources

# Distributions Docker's apt repository publishes for (the path under docker_apt_url).
DOCKER_REPO_DISTROS = ("debian", "ubuntu")

# Packages installed from Docker's repository, every one pinned and held: the engine and CLI
# to Docker's exact apt version of docker_version, the others to an upstream version.
DOCKER_PINNED_PACKAGES = ("docker-ce", "docker-ce-cli")
DOCKER_UNPINNED_PACKAGES = ("containerd.io", "docker-buildx-plugin", "docker-compose-plugin")
DOCKER_HELD_PACKAGES = DOCKER_PINNED_PACKAGES + DOCKER_UNPINNED_PACKAGES
DISTRO_PACKAGES = ("docker.io",)

# Needed on a fresh host before Docker's repository can be used: TLS roots for apt and curl,
# curl to fetch the key. Installed only when missing and actually needed.
REPO_TOOL_PACKAGES = ("ca-certificates", "curl", "gpg")

# Every package EngineState reports on (one dpkg-query for all of them).
QUERIED_PACKAGES = (
    DOCKER_PINNED_PACKAGES + DOCKER_UNPINNED_PACKAGES + DISTRO_PACKAGES + REPO_TOOL_PACKAGES
)


# --- Pure logic ---------------------------------------------------------------------------


def docker_apt_version(version: str, distro_id: str, version_id: str, codename: str) -> str:
    """The apt version Docker's repository gives docker-ce/docker-ce-cli `version` on a
    distribution, e.g. ("28.5.2", "debian", "12", "bookworm") -> "5:28.5.2-1~debian.12~bookworm"
    and ("28.5.2", "ubuntu", "24.04", "noble") -> "5:28.5.2-1~ubuntu.24.04~noble"."""
    parts = (("distribution", distro_id), ("version", version_id), ("codename", codename))
    for label, value in parts:
        if not value:
            raise ValueError(f"cannot build Docker's apt version without the {label}")
    return f"5:{version}-1~{distro_id}.{version_id}~{codename}"


def wanted_packages(
    source: str, version: str, distro: dict[str, str],
    companions: dict[str, str] | None = None,
) -> list[tuple[str, str | None]]:
    """The (package, pin) pairs a source needs on a distribution. A pin is Docker's exact apt
    version (docker-ce, docker-ce-cli: "5:28.5.2-1~debian.12~bookworm"), an upstream version
    (containerd.io and the plugins, from `companions`: "1.7.28", any apt revision), or None."""
    if source == "distro":
        return [(name, None) for name in DISTRO_PACKAGES]
    if source != "docker":
        raise ValueError(f"unknown docker_engine_source {source!r} (expected 'docker' or 'distro')")
    pinned = docker_apt_version(
        version, distro.get("id", ""), distro.get("version_id", ""), distro.get("codename", "")
    )
    companions = companions or {}
    return [(name, pinned) for name in DOCKER_PINNED_PACKAGES] + [
        (name, companions.get(name)) for name in DOCKER_UNPINNED_PACKAGES
    ]


def is_exact_pin(pin: str) -> bool:
    """Docker's apt versions of docker-ce carry an epoch and a revision; upstream pins neither."""
    return ":" in pin or "-" in pin


def version_matches(installed: str, pin: str | None) -> bool:
    if pin is None:
        return True
    return installed == pin if is_exact_pin(pin) else upstream_version(installed) == pin


def packages_to_install(
    wanted: list[tuple[str, str | None]], installed: dict[str, dict[str, Any]]
) -> list[tuple[str, str | None]]:
    """The wanted packages that are missing or installed at another version than pinned."""
    return [
        (name, pinned)
        for name, pinned in wanted
        if name not in installed or not version_matches(installed[name]["version"], pinned)
    ]


def install_script(missing: list[tuple[str, str | None]], extra_args: str) -> str:
    """apt-get install of the missing packages: an exact pin as name=version, an upstream pin
    resolved from the repository (the first `apt-cache madison` version of that upstream), or a
    failure naming what the repository has."""
    lines = ["set -e", "specs=''"]
    for name, pin in missing:
        if pin is None or is_exact_pin(pin):
            lines.append(f"specs=\"$specs {name}{'=' + pin if pin else ''}\"")
            continue
        lines += resolve_pin_lines(name, pin)
        lines.append(f"specs=\"$specs {name}=$v\"")
    lines.append(apt_install(["$specs"], extra_args))
    return "\n".join(lines)


def other_source_conflict(source: str, installed: dict[str, dict[str, Any]]) -> str | None:
    """Why the engine installed on a host belongs to the other source, or None."""
    if source == "docker" and "docker.io" in installed:
        return (
            "the distribution's docker.io is installed but docker_engine_source is 'docker'; "
            "remove docker.io deliberately (every container stops) or set "
            "docker_engine_source = 'distro'"
        )
    if source == "distro":
        found = [name for name in DOCKER_PINNED_PACKAGES if name in installed]
        if found:
            return (
                f"{', '.join(found)} from Docker's repository is installed but "
                "docker_engine_source is 'distro'; remove it deliberately or set "
                "docker_engine_source = 'docker'"
            )
    return None


def parse_engine_state(lines: list[str]) -> dict[str, Any]:
    """Parse the EngineState fact output (`key=value` lines)."""
    state: dict[str, Any] = {
        "distro": {"id": "", "version_id": "", "codename": ""},
        "arch": "",
        "apt_key": False,
        "key_fingerprints": [],
        "packages": {},
    }
    for line in lines:
        key, _, value = line.partition("=")
        if key == "os":
            parts = (value.split(" ") + ["", "", ""])[:3]
            state["distro"] = {"id": parts[0], "version_id": parts[1], "codename": parts[2]}
        elif key == "arch":
            state["arch"] = value.strip()
        elif key == "key":
            state["apt_key"] = value.strip() == "present"
        elif key == "keyfpr" and value.strip():
            state["key_fingerprints"].append(value.strip().upper())
        elif key == "pkg":
            # "<name> <version> <status abbrev>", version empty when not installed; the
            # abbreviation is want + current state (+ error flag): "ii", "hi" (held), "rc".
            parts = value.split(" ")
            if len(parts) < 3 or len(parts[2]) < 2:
                continue
            name, version, abbrev = parts[0], parts[1], parts[2]
            if abbrev[1] == "i" and version:
                state["packages"][name] = {"version": version, "held": abbrev[0] == "h"}
    return state


# --- Fact and operation -------------------------------------------------------------------


class EngineState(FactBase):
    """What the Docker Engine phase needs to know about a host, in one command: distribution
    (from /etc/os-release), dpkg architecture, whether Docker's apt key is in place, and the
    installed version and hold state of the engine and helper packages.

    .. code:: python

        {
            "distro": {"id": "debian", "version_id": "12", "codename": "bookworm"},
            "arch": "amd64",
            "apt_key": True,
            "packages": {"docker-ce": {"version": "5:28.5.2-1~debian.12~bookworm", "held": True}},
        }
    """

    def command(self) -> str:
        packages = " ".join(QUERIED_PACKAGES)
        return (
            "( [ -r /etc/os-release ] && . /etc/os-release; "
            'echo "os=${ID:-} ${VERSION_ID:-} ${VERSION_CODENAME:-}" ); '
            'echo "arch=$(dpkg --print-architecture 2>/dev/null)"; '
            f"if [ -s {DOCKER_KEYRING} ]; then echo key=present; "
            f"gpg --show-keys --with-colons {DOCKER_KEYRING} 2>/dev/null | "
            "awk -F: '$1 == \"fpr\" { print \"keyfpr=\" $10 }'; fi; "
            "dpkg-query -W -f='pkg=${Package} ${Version} ${db:Status-Abbrev}\\n' "
            f"{packages} 2>/dev/null || true"
        )

    def process(self, output):
        return parse_engine_state(output)


# The first Docker Engine whose swarmkit keeps GPU tasks on a node when the node is updated
# (moby/moby#44378, fixed by moby/swarmkit#3082).
SWARM_GPU_FIX = (23, 0)


def swarm_gpu_warning(installed: dict[str, dict[str, Any]]) -> str | None:
    """What an engine older than SWARM_GPU_FIX does to a GPU fleet, when the host has one."""
    for name in ("docker-ce", "docker.io"):
        version = (upstream_version((installed.get(name) or {}).get("version")) or "").split("+")[0]
        if not version:
            continue
        try:
            numbers = tuple(int(part) for part in version.split(".")[:2])
        except ValueError:
            return None
        if numbers < SWARM_GPU_FIX:
            return (f"Docker Engine {version} ({name}) is older than 23.0: Swarm rejects every "
                    "GPU task on a node whenever the node is updated (a label, a promotion) and "
                    "on every node when a manager becomes leader (moby/moby#44378); use "
                    "docker_engine_source \"docker\"")
    return None


def fetch_key_command(key_url: str, fingerprint: str) -> StringCommand:
    """Fetch Docker's key to a staged file, check it is the key with `fingerprint` (gpg), then
    move it into place; a key that is not it is refused and removed, never used."""
    staging = f"{DOCKER_KEYRING}.new"
    return StringCommand(
        "install -d -m 0755", posixpath.dirname(DOCKER_KEYRING),
        "&& curl -fsSL --retry 3 --proto '=https,http' -o", staging, QuoteString(key_url),
        "&& gpg --show-keys --with-colons", staging,
        "| awk -F: '$1 == \"fpr\" { print $10 }' | grep -qix", QuoteString(fingerprint),
        "&& chmod 0644", staging,
        "&& mv -f", staging, DOCKER_KEYRING,
        "|| { rm -f", staging, ";",
        "echo", QuoteString(f"the key at {key_url} is not Docker's key {fingerprint} "
                            "(docker_key_fingerprint), or could not be fetched"),
        ">&2;",
        "exit 1; }",
    )


@operation()
@fails_only_this_host
def install_engine(source: str, version: str, apt_url: str, fingerprint: str = "",
                   companions: dict[str, str] | None = None):
    """
    Install Docker Engine from Docker's apt repository ("docker": docker-ce and docker-ce-cli
    pinned to ``version`` and held) or from the distribution ("distro": docker.io).

    apt-get update runs only when a package must be installed, and a host where everything is
    in place gets no command at all.

    + source: "docker" or "distro"
    + version: Docker Engine version for the "docker" source, e.g. "28.5.2"
    + apt_url: base URL of Docker's apt repository (the distribution is appended)
    + fingerprint: the 40 hex digits of Docker's signing key (the "docker" source)
    + companions: upstream versions of containerd.io, docker-buildx-plugin and
      docker-compose-plugin (the "docker" source), each pinned and held

    **Example:**

    .. code:: python

        install_engine(
            name="Install Docker Engine 28.5.2",
            source="docker",
            version="28.5.2",
            apt_url="https://download.docker.com/linux",
            fingerprint="9DC858229FC7DD38854AE2D88D81803C0EBFCD88",
            companions={"containerd.io": "1.7.28", "docker-buildx-plugin": "0.29.1",
                        "docker-compose-plugin": "2.40.3"},
        )
    """
    state = host.get_fact(EngineState)
    installed = state["packages"]
    distro = state["distro"]

    conflict = other_source_conflict(source, installed)
    if conflict:
        raise OperationError(conflict)

    if source == "docker" and distro["id"] not in DOCKER_REPO_DISTROS:
        raise OperationError(
            f"docker_engine_source 'docker' supports {' and '.join(DOCKER_REPO_DISTROS)} hosts; "
            f"this host's /etc/os-release says ID={distro['id'] or '(none)'}"
        )
    try:
        wanted = wanted_packages(source, version, distro, companions)
    except ValueError as error:
        raise OperationError(f"{error} (read from /etc/os-release)") from None
    missing = packages_to_install(wanted, installed)

    key_ok = fingerprint in state["key_fingerprints"]
    if source == "docker":
        # Tools for the repository: TLS roots always, curl and gpg only to fetch and check a key.
        # Their apt-get update never counts for the engine: it ran without the CA roots or the
        # key that Docker's repository needs, so the engine install below updates again.
        tools = [name for name in ("ca-certificates",) if name not in installed]
        if not key_ok:
            tools += [name for name in ("curl", "gpg") if name not in installed]
        if tools and (missing or not key_ok):
            yield "apt-get update"
            yield apt_install(tools, "--no-install-recommends")

        if not key_ok:
            if state["apt_key"]:
                explain(f"{DOCKER_KEYRING} holds {', '.join(state['key_fingerprints']) or 'no key gpg can read'}, "
                        f"not Docker's key {fingerprint}: fetched again")
            yield fetch_key_command(f"{apt_url}/{distro['id']}/gpg", fingerprint)

        yield from apt.sources_file._inner(
            filename=DOCKER_SOURCES_NAME,
            types="deb",
            uris=f"{apt_url}/{distro['id']}",
            suites=distro["codename"],
            components="stable",
            architectures=state["arch"] or None,
            signed_by=DOCKER_KEYRING,
        )

    if missing:
        yield "apt-get update"
        extra = []
        if any(pinned and name in installed for name, pinned in missing):
            extra.append("--allow-downgrades")
        if any(installed.get(name, {}).get("held") for name, _ in missing):
            extra.append("--allow-change-held-packages")
        if any(pin and not is_exact_pin(pin) for _, pin in missing):
            yield StringCommand("sh", "-c", QuoteString(install_script(missing, " ".join(extra))))
        else:
            specs = [f"{name}={pin}" if pin else name for name, pin in missing]
            yield apt_install(specs, " ".join(extra))

    to_hold = []
    if source == "docker":
        missing_names = {name for name, _ in missing}
        to_hold = [
            name
            for name in DOCKER_HELD_PACKAGES
            if name in missing_names or not installed.get(name, {}).get("held")
        ]
        if to_hold:
            yield StringCommand("apt-mark hold", *to_hold)

    warning = swarm_gpu_warning(installed)
    if warning and not missing:
        logger.warning(f"{host.name}: {warning}")

    if not missing and not to_hold and (key_ok or source != "docker"):
        listed = ", ".join(f"{name} {installed[name]['version']}" for name, _ in wanted)
        if source == "docker":
            host.noop(f"Docker Engine is installed and held: {listed}")
        else:
            host.noop(f"Docker Engine is installed: {listed}")
