"""Docker Engine: the packages (operations/docker_packages.py: pinned and held, from Docker's
repository or the distribution), /etc/docker/daemon.json (merged, never clobbered) and the
docker service (restarted only when its configuration changed).

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
from pyinfra.operations import systemd

from operations.docker_packages import install_engine
from operations.phase import PhaseResult, explain, fails_only_this_host

DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_SERVICE = "docker.service"
DEFAULT_DATA_ROOT = "/var/lib/docker"

ENGINE_ANSWER_TIMEOUT_S = 90


# --- Pure logic -----------------------------------------------------------------------------


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


# --- Facts ----------------------------------------------------------------------------------


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
