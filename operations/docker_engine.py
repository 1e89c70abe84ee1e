"""Docker Engine: the packages (pinned and held), /etc/docker/daemon.json (merged, never
clobbered) and the docker service (restarted only when its configuration changed).

Two sources, chosen by `docker_engine_source`:
- "docker": Docker's own apt repository (key /etc/apt/keyrings/docker.asc, checked against
  `docker_key_fingerprint` before it is used; deb822 source /etc/apt/sources.list.d/docker.sources),
  docker-ce and docker-ce-cli pinned to the apt version built from `docker_version` for the
  host's distribution, containerd.io and the buildx and compose plugins pinned to their upstream
  versions (`docker_containerd_version`, ...; the apt revision is the repository's), all held
  with `apt-mark hold`: nothing of the engine floats under a running cluster.
- "distro": the distribution's own `docker.io` (what the lab uses).

A host already carrying the engine from the *other* source is refused, not converted: swapping
engines restarts every container and is a decision for an operator, not a side effect.

Remote commands on a run that changes nothing: one `EngineState` read (plus pyinfra's
`AptSources` read for the "docker" source), one `DaemonJson` read and pyinfra's two systemd
reads, each once while planning and once while executing.
"""

from __future__ import annotations

import copy
import json
import posixpath
from io import StringIO
from typing import Any, Callable

from pyinfra import host
from pyinfra.api import (
    FactBase,
    FileUploadCommand,
    OperationError,
    QuoteString,
    StringCommand,
    deploy,
    operation,
)
from pyinfra.facts.apt import noninteractive_apt
from pyinfra.operations import apt, systemd

from operations.phase import PhaseResult, explain, fails_only_this_host

DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_KEYRING = "/etc/apt/keyrings/docker.asc"
DOCKER_SOURCES_NAME = "docker"  # -> /etc/apt/sources.list.d/docker.sources
DOCKER_SERVICE = "docker.service"
DEFAULT_DATA_ROOT = "/var/lib/docker"

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

ENGINE_ANSWER_TIMEOUT_S = 90


# --- Pure logic -----------------------------------------------------------------------------


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


def upstream_of(apt_version: str) -> str:
    """"5:28.5.2-1~debian.12~bookworm" -> "28.5.2"; "1.7.28-1" -> "1.7.28"."""
    version = apt_version.split(":", 1)[1] if ":" in apt_version else apt_version
    return version.rsplit("-", 1)[0] if "-" in version else version


def is_exact_pin(pin: str) -> bool:
    """Docker's apt versions of docker-ce carry an epoch and a revision; upstream pins neither."""
    return ":" in pin or "-" in pin


def version_matches(installed: str, pin: str | None) -> bool:
    if pin is None:
        return True
    return installed == pin if is_exact_pin(pin) else upstream_of(installed) == pin


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
        lines.append(
            f"v=$(apt-cache madison {name} | awk -v want='{pin}-' "
            "'{ v = $3; sub(/^[0-9]+:/, \"\", v); if (index(v, want) == 1) { print $3; exit } }')")
        lines.append(
            f"[ -n \"$v\" ] || {{ echo 'no {name} {pin} in the configured repository; it has:' >&2; "
            f"apt-cache madison {name} | awk '{{print $3}}' | head -n 5 >&2; exit 1; }}")
        lines.append(f"specs=\"$specs {name}=$v\"")
    lines.append(f"{noninteractive_apt(('install ' + extra_args).strip())} $specs")
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


def merge_daemon_config(current: dict[str, Any], managed: dict[str, Any]) -> dict[str, Any]:
    """daemon.json as it should be: `managed` keys win, nested dicts are merged key by key,
    lists and scalars are replaced, and keys only `current` has (an operator's) are kept.
    Neither argument is modified."""
    result = copy.deepcopy(current)
    for key, value in managed.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_daemon_config(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def managed_daemon_config(
    log_max_size: str,
    log_max_file: int,
    daemon_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    data_root: str = DEFAULT_DATA_ROOT,
) -> dict[str, Any]:
    """The daemon.json keys this deploy owns: json-file log rotation, `data-root` when it is
    not Docker's default, then `extra` (from later phases: NVIDIA runtime, generic resources),
    then the operator's `docker_daemon_config` over all of them."""
    managed: dict[str, Any] = {
        "log-driver": "json-file",
        # dockerd accepts only strings in log-opts.
        "log-opts": {"max-size": str(log_max_size), "max-file": str(log_max_file)},
    }
    if data_root.rstrip("/") != DEFAULT_DATA_ROOT:
        managed["data-root"] = data_root
    managed = merge_daemon_config(managed, extra or {})
    return merge_daemon_config(managed, daemon_config or {})


def render_daemon_json(config: dict[str, Any]) -> str:
    """daemon.json text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def changed_keys(current: dict[str, Any], merged: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted key paths where `merged` differs from `current` (names only: values may be
    anything an operator put there)."""
    keys = []
    for key in sorted(set(current) | set(merged)):
        left, right = current.get(key), merged.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += changed_keys(left, right, f"{prefix}{key}.")
        elif key not in current or key not in merged or not same_config({"v": left}, {"v": right}):
            keys.append(f"{prefix}{key}")
    return keys


def same_config(left: dict[str, Any], right: dict[str, Any]) -> bool:
    """Equal as JSON data (key order and formatting ignored; true is not 1, "5" is not 5)."""
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


def parse_daemon_json(lines: list[str]) -> dict[str, Any]:
    """Parse the DaemonJson fact output (a marker line, then the file): never raises."""
    if not lines or lines[0].strip() == "#missing":
        return {"exists": False, "config": {}, "error": None}
    if lines[0].strip() == "#unreadable":
        return {"exists": True, "config": None, "error": "the file could not be read"}
    text = "\n".join(lines[1:])
    if not text.strip():
        # dockerd starts with an empty daemon.json: it holds no keys.
        return {"exists": True, "config": {}, "error": None}
    try:
        config = json.loads(text)
    except ValueError as error:
        return {"exists": True, "config": None, "error": f"invalid JSON: {error}"}
    if not isinstance(config, dict):
        return {
            "exists": True,
            "config": None,
            "error": f"expected a JSON object, found a {type(config).__name__}",
        }
    return {"exists": True, "config": config, "error": None}


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


# --- Facts ----------------------------------------------------------------------------------


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


class DaemonJson(FactBase):
    """The Docker daemon configuration file, parsed; never fails.

    .. code:: python

        {"exists": True, "config": {"log-driver": "json-file"}, "error": None}
        {"exists": False, "config": {}, "error": None}
        {"exists": True, "config": None, "error": "invalid JSON: Expecting ',' ..."}
    """

    @staticmethod
    def default():
        return {"exists": False, "config": {}, "error": None}

    def command(self, path: str = DAEMON_JSON) -> StringCommand:
        quoted = QuoteString(path)
        return StringCommand(
            "if [ -e", quoted, "]; then",
            "if [ -r", quoted, "]; then echo '#present'; cat", quoted, "; echo;",
            "else echo '#unreadable'; fi;",
            "else echo '#missing'; fi",
        )

    def process(self, output):
        return parse_daemon_json(output)


# --- Operations -----------------------------------------------------------------------------


def _apt_install(packages: list[str], extra_args: str = "") -> str:
    args = f"install {extra_args}".strip()
    return f"{noninteractive_apt(args)} {' '.join(packages)}"


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
            yield _apt_install(tools, "--no-install-recommends")

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
            yield _apt_install(specs, " ".join(extra))

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

    if not missing and not to_hold and (key_ok or source != "docker"):
        listed = ", ".join(f"{name} {installed[name]['version']}" for name, _ in wanted)
        if source == "docker":
            host.noop(f"Docker Engine is installed and held: {listed}")
        else:
            host.noop(f"Docker Engine is installed: {listed}")


@operation()
@fails_only_this_host
def daemon_json(managed: dict | Callable[[], dict], path: str = DAEMON_JSON):
    """
    Merge the managed keys into the Docker daemon configuration: keys an operator added by hand
    are kept, managed keys win (nested objects merged key by key). The file is compared as
    data; when it differs, the new file is staged next to it (0644 root), checked with
    ``dockerd --validate`` where the engine has it, and moved into place.

    + managed: the daemon.json keys this deploy owns, or a function returning them, called when
      the operation runs (for keys known only then, such as the GPUs of a host whose driver is
      loaded earlier in the same run)
    + path: the daemon configuration file

    **Example:**

    .. code:: python

        daemon_json(
            name="Merge /etc/docker/daemon.json",
            managed={"log-driver": "json-file", "log-opts": {"max-size": "100m"}},
        )
    """
    if callable(managed):
        managed = managed()
    current = host.get_fact(DaemonJson, path=path)
    if current["error"]:
        raise OperationError(
            f"{path} on this host cannot be used ({current['error']}); dockerd will not start "
            "with it either. Fix or remove the file by hand, then run the deploy again."
        )

    merged = merge_daemon_config(current["config"], managed)
    if same_config(merged, current["config"]):
        if current["exists"]:
            host.noop(f"{path} already holds the managed keys")
        else:
            host.noop(f"no daemon.json keys to manage and {path} is absent")
        return

    explain(f"{path}: managed keys differ: {', '.join(changed_keys(current['config'], merged))}")
    staging = f"{path}.pyinfra-new"
    quoted_staging = QuoteString(staging)
    yield StringCommand("install -d -m 0755", QuoteString(posixpath.dirname(path)))
    yield FileUploadCommand(StringIO(render_daemon_json(merged)), staging)
    yield StringCommand(
        "chown root:root", quoted_staging, "&& chmod 0644", quoted_staging,
        # dockerd >= 23 can check a configuration without starting; older engines cannot.
        "&& if dockerd --help 2>/dev/null | grep -q -- '--validate'; then",
        "dockerd --validate --config-file", quoted_staging, "|| { rm -f", quoted_staging,
        "; exit 1; }; fi",
        "&& mv -f", quoted_staging, QuoteString(path),
    )


@operation(is_idempotent=False)
@fails_only_this_host
def wait_for_engine(timeout: int = ENGINE_ANSWER_TIMEOUT_S, socket: str = "/var/run/docker.sock"):
    """
    Wait (bounded) until the Docker Engine answers ``docker info`` on its unix socket. Always
    issues its command: call it only after a (re)start, with ``_if``.

    + timeout: seconds to wait before failing the host
    + socket: the engine's unix socket

    **Example:**

    .. code:: python

        restarted = systemd.service(service="docker", restarted=True, _if=config.did_change)
        wait_for_engine(name="Wait for Docker", _if=restarted.did_change)
    """
    probe = f"until docker -H unix://{socket} info >/dev/null 2>&1; do sleep 1; done"
    yield StringCommand(
        "timeout", str(int(timeout)), "sh -c", QuoteString(probe),
        "|| { echo", QuoteString(f"Docker Engine did not answer on {socket} within {timeout}s"),
        ">&2; exit 1; }",
    )


# --- Phase ----------------------------------------------------------------------------------


@deploy("Docker Engine")
def docker_engine(settings, extra_daemon_config=None) -> PhaseResult:
    """Install the engine, merge daemon.json, restart only when it changed, keep it running.

    `extra_daemon_config`: daemon.json keys from other phases (NVIDIA runtime, generic
    resources), merged under the operator's `docker_daemon_config`; a dict, or a function
    called when daemon.json is merged (the GPUs of a fresh host are known only after its driver
    is loaded, later than this phase is planned). Returns whether anything changed.
    """
    if settings.docker_engine_source == "docker":
        install_name = f"Install Docker Engine {settings.docker_version} (Docker's repository)"
    else:
        install_name = "Install Docker Engine (distribution's docker.io)"
    install = install_engine(
        name=install_name,
        source=settings.docker_engine_source,
        version=settings.docker_version,
        apt_url=settings.docker_apt_url.rstrip("/"),
        fingerprint=settings.docker_key_fingerprint.upper(),
        companions={"containerd.io": settings.docker_containerd_version,
                    "docker-buildx-plugin": settings.docker_buildx_version,
                    "docker-compose-plugin": settings.docker_compose_version},
    )

    def managed() -> dict[str, Any]:
        extra = extra_daemon_config() if callable(extra_daemon_config) else extra_daemon_config
        return managed_daemon_config(
            settings.docker_log_max_size,
            settings.docker_log_max_file,
            settings.docker_daemon_config,
            extra,
            settings.docker_data_root,
        )

    config = daemon_json(name=f"Merge {DAEMON_JSON}", managed=managed)
    restarted = systemd.service(
        name="Restart Docker (daemon.json changed)",
        service=DOCKER_SERVICE,
        running=True,
        restarted=True,
        _if=config.did_change,
    )
    started = systemd.service(
        name="Docker enabled and running",
        service=DOCKER_SERVICE,
        running=True,
        enabled=True,
    )
    waited = wait_for_engine(
        name="Wait for Docker Engine to answer",
        _if=lambda: restarted.did_change() or started.did_change(),
    )
    return PhaseResult([install, config, restarted, started, waited])
