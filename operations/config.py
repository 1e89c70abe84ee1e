"""The typed model of every configuration key, and the check that runs before any host is touched.

Data reaches a host from group_data/all.py, group_data/<group>.py and the inventory's host data.
Everything a phase reads goes through `Settings`: unknown keys, wrong types and impossible values
are refused with one line that names the host, the key, the value and what would be accepted.

Two entry points:
- `validate_inventory(globals())` at the end of an inventory file: pyinfra executes inventory files
  before it connects to anything, so a bad value stops the run before the first SSH connection.
- `settings_for(host)` in deploy.py: the same model over pyinfra's final view of the host's data
  (which also includes `--data` overrides), giving the phases a typed object.
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

REPO_ROOT = Path(__file__).resolve().parent.parent
GROUP_DATA_DIR = REPO_ROOT / "group_data"

# Exit status for a configuration refused before any host was contacted (as a scheduler sees it).
EXIT_BAD_CONFIG = 2


def _absolute_path(value: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise ValueError("an absolute path such as /opt/models")
    if path == PurePosixPath("/"):
        raise ValueError("a directory below /, not / itself")
    if ".." in path.parts:
        raise ValueError("a path without '..'")
    return str(path)


def _json_keys(value: dict[str, Any]) -> dict[str, Any]:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"JSON-serialisable values ({error})") from None
    return value


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
GiB = Annotated[int, Field(ge=0, le=1_000_000)]
DockerSize = Annotated[str, Field(pattern=r"^[1-9][0-9]*[kmg]$")]
SemVer = Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")]
HttpUrl = Annotated[str, Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")]
Fingerprint = Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{40}$")]
ImageRef = Annotated[str, Field(pattern=r"^[^\s]+$")]


def _toolkit_at_least_1_19(value: str) -> str:
    upstream = value.split("-", 1)[0].split("~", 1)[0]
    if tuple(int(part) for part in upstream.split(".")[:2]) < (1, 19):
        raise ValueError("1.19.0-1 or later (1.18 dropped Docker Swarm support in its default mode)")
    return value


ToolkitVersion = Annotated[
    str,
    Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+(~rc\.[0-9]+)?-[0-9]+$"),
    AfterValidator(_toolkit_at_least_1_19),
]


def _home_or_absolute(value: str) -> str:
    if not (value.startswith("/") or value.startswith("~")):
        raise ValueError("an absolute path (or one starting with ~) on the control machine")
    return value


ControlPath = Annotated[str, AfterValidator(_home_or_absolute)]

_LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


def _node_labels(value: dict[str, str]) -> dict[str, str]:
    for key, text in value.items():
        if not _LABEL_KEY.match(key) or key.startswith("gpufleet."):
            raise ValueError(f"label keys in lowercase reverse-DNS form, not under gpufleet. ({key!r})")
        if "\n" in text:
            raise ValueError(f"single-line label values ({key!r})")
    return value


class ModelSpec(BaseModel):
    """One model to pre-download to <models_dir>/<name>/ on the hosts of `groups`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
    repo_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")]
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]
    allow_patterns: list[str] = []
    ignore_patterns: list[str] = []
    groups: list[str] = ["gpu_nodes"]

    # Serving (the stack phase): one Swarm service per model with serve=True.
    serve: bool = True
    engine: Literal["vllm", "tgi", "ollama"] = "vllm"
    # The name clients send as "model"; defaults to `name`.
    served_model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")] | None = None
    replicas: Annotated[int, Field(ge=1, le=256)] = 1
    # GPUs per replica (tensor parallelism); each replica reserves this many NVIDIA-GPU resources.
    tensor_parallel_size: Annotated[int, Field(ge=1, le=16)] = 1
    max_model_len: Annotated[int, Field(ge=16, le=10_000_000)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    # Host port of each replica, published in host mode (one replica per node): the direct
    # address of an engine task, which the smoke tests check beside the gateway.
    port: Annotated[int, Field(ge=1024, le=65535)] = 8000
    # Further engine flags, verbatim (e.g. ["--enable-prefix-caching"]).
    engine_args: list[Annotated[str, Field(pattern=r"^[^\n]+$")]] = []
    # /dev/shm of each replica in GiB; None: operations.sizing.shm_bytes decides.
    shm_size_gb: Annotated[float, Field(gt=0, le=4096)] | None = None
    # Only nodes whose gpufleet.gpu.model label equals this (e.g. "NVIDIA H100 80GB HBM3").
    gpu_model: str | None = None
    # Seconds a replica may take to load before failing health checks count (large models: minutes).
    health_start_period_s: Annotated[int, Field(ge=10, le=7200)] = 1200
    # Seconds Swarm waits, after SIGTERM, for a replica to finish its in-flight requests before
    # killing it (rolling updates, drains): a longer generation is cut. The gateway's own
    # timeout server (15 min) bounds a request anyway.
    stop_grace_period_s: Annotated[int, Field(ge=10, le=3600)] = 300
    # Image for this model's engine; None: stack_engine_images[engine].
    image: ImageRef | None = None

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.name


class Settings(BaseModel):
    """Every key the deploy reads; defaults live in group_data/all.py (one comment per key)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Where things live on the hosts
    models_dir: AbsolutePath
    docker_data_root: AbsolutePath

    # Preflight
    preflight_min_free_gb_models: GiB
    preflight_min_free_gb_docker: GiB
    preflight_require_kernel_headers: bool
    preflight_require_time_sync: bool

    # NVIDIA driver
    nvidia_cuda_repo_url: HttpUrl
    nvidia_cuda_key_fingerprint: Fingerprint
    nvidia_driver_branch: Annotated[str, Field(pattern=r"^[0-9]{3}$")]
    nvidia_driver_version: Annotated[str, Field(pattern=r"^[0-9]{3}\.[0-9]+(\.[0-9]+)?$")]
    nvidia_driver_flavour: Literal["open", "proprietary"]
    nvidia_fabricmanager: Literal["auto"] | bool
    nvidia_allow_reboot: bool
    nvidia_reboot_timeout_s: Annotated[int, Field(ge=60, le=3600)]

    # NVIDIA Container Toolkit
    nvidia_container_toolkit_repo_url: HttpUrl
    nvidia_container_toolkit_key_url: HttpUrl
    nvidia_container_toolkit_key_fingerprint: Fingerprint
    nvidia_container_toolkit_version: ToolkitVersion
    nvidia_container_verify_image: ImageRef

    # Model weights
    models: list[ModelSpec]
    hf_endpoint: HttpUrl
    hf_token_file: ControlPath | None
    weights_cache_dir: ControlPath
    weights_verify: Literal["size", "sha256"]
    weights_free_margin_gb: GiB

    # Docker Swarm
    swarm_advertise_address: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$")] | None
    swarm_node_labels: Annotated[dict[str, str], AfterValidator(_node_labels)]
    swarm_retire: bool
    swarm_takeover: bool
    swarm_drain_timeout_s: Annotated[int, Field(ge=10, le=3600)]

    # Inference stack
    stack_name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")]
    stack_engine_images: dict[Literal["vllm", "tgi", "ollama"], ImageRef]
    stack_gateway_image: ImageRef
    stack_secret_uids: dict[Literal["vllm", "tgi", "ollama", "gateway"], Annotated[int, Field(ge=0, le=2**31)]]
    stack_gateway_port: Annotated[int, Field(ge=1, le=65535)]
    stack_publish_mode: Literal["ingress", "host"]
    stack_api_key_file: ControlPath | None
    stack_converge_timeout_s: Annotated[int, Field(ge=30, le=14400)]
    stack_update_monitor_s: Annotated[int, Field(ge=5, le=3600)]

    # Smoke tests
    smoke_deadline_s: Annotated[int, Field(ge=1, le=7200)]

    # Docker Engine
    docker_engine_source: Literal["docker", "distro"]
    docker_version: SemVer
    docker_apt_url: HttpUrl
    docker_log_max_size: DockerSize
    docker_log_max_file: Annotated[int, Field(ge=1, le=100)]
    docker_daemon_config: Annotated[dict[str, Any], AfterValidator(_json_keys)]

    @model_validator(mode="after")
    def _model_names_unique(self) -> "Settings":
        names = [spec.name for spec in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise PydanticCustomError(
                "duplicate_model_name",
                "expected one entry per model name; {names} appear more than once",
                {"key": "models", "names": ", ".join(duplicates)},
            )
        return self

    @model_validator(mode="after")
    def _serving_consistent(self) -> "Settings":
        served = [spec for spec in self.models if spec.serve]
        for key, values in (("served_model_name", [spec.served_name for spec in served]),
                            ("port", [spec.port for spec in served])):
            clashes = sorted({str(v) for v in values if values.count(v) > 1})
            if clashes:
                raise PydanticCustomError(
                    "serving_clash",
                    "expected a different {field} for each served model; {values} used more than once",
                    {"key": "models", "field": key, "values": ", ".join(clashes)},
                )
        if self.stack_gateway_port in {spec.port for spec in served}:
            raise PydanticCustomError(
                "serving_clash", "expected a port that no served model uses (models[].port)",
                {"key": "stack_gateway_port"},
            )
        missing = sorted({spec.engine for spec in served if spec.image is None
                          and spec.engine not in self.stack_engine_images})
        if missing:
            raise PydanticCustomError(
                "serving_clash", "expected an image for engine(s) {engines} (or models[].image)",
                {"key": "stack_engine_images", "engines": ", ".join(missing)},
            )
        if served and self.stack_api_key_file is None:
            raise PydanticCustomError(
                "serving_clash",
                "expected a file on the control machine holding the API key, since models are served",
                {"key": "stack_api_key_file"},
            )
        return self

    @model_validator(mode="after")
    def _driver_version_on_branch(self) -> "Settings":
        if not self.nvidia_driver_version.startswith(self.nvidia_driver_branch + "."):
            raise PydanticCustomError(
                "driver_not_on_branch",
                "expected a version on nvidia_driver_branch {branch} (starting with '{branch}.')",
                {"key": "nvidia_driver_version", "branch": self.nvidia_driver_branch},
            )
        return self


def _pyinfra_keys() -> set[str]:
    """Data keys pyinfra itself understands (connection data and global arguments): allowed
    in host data, checked by pyinfra, not by this model."""
    from pyinfra.api.arguments import all_argument_meta
    from pyinfra.connectors.ssh import connector_data_meta

    return set(all_argument_meta) | set(connector_data_meta)


# Lab inventories describe their hosts with a few keys of their own (which container a host is);
# they are metadata for the lab's tools, never read by a phase.
LAB_KEY_PREFIX = "lab_"


class ConfigError(Exception):
    """One or more refused values; `lines` holds one human line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _describe_expectation(error: dict[str, Any]) -> str:
    """Turn one pydantic error into 'what would be accepted'."""
    kind = error["type"]
    message = error["msg"]
    if kind == "missing":
        return "this key is required (group_data/all.py sets a default: was it removed?)"
    if kind in ("driver_not_on_branch", "duplicate_model_name", "serving_clash"):
        return message
    if kind == "value_error":
        # Our own validators raise ValueError("<what is accepted>").
        return "expected " + message.removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        return "expected " + _PATTERN_WORDS.get(pattern, f"a string matching {pattern}")
    if kind in _TYPE_WORDS:
        return "expected " + _TYPE_WORDS[kind].format(**error.get("ctx", {}))
    if message.startswith("Input should be "):
        return "expected " + message.removeprefix("Input should be ")
    return message


_TYPE_WORDS = {
    "int_type": "a whole number (unquoted)",
    "bool_type": "True or False",
    "string_type": "a string",
    "dict_type": "a dict",
    "greater_than_equal": "a number >= {ge}",
    "less_than_equal": "a number <= {le}",
}

_PATTERN_WORDS = {
    r"^[1-9][0-9]*[kmg]$": "a size such as '100m' (a number followed by k, m or g)",
    r"^[0-9]+\.[0-9]+\.[0-9]+$": "a version such as '28.5.2'",
    r"^https?://[^\s/]+(/[^\s]*)?$": "an http(s) URL such as 'https://download.docker.com/linux'",
    r"^[0-9A-Fa-f]{40}$": "a 40-hex-digit key fingerprint",
    r"^[0-9]{3}$": "a driver branch such as '580'",
    r"^[0-9]{3}\.[0-9]+(\.[0-9]+)?$": "a driver version such as '580.95.05'",
    r"^[0-9]+\.[0-9]+\.[0-9]+(~rc\.[0-9]+)?-[0-9]+$": "an apt version such as '1.19.1-1'",
    r"^[^\s]+$": "an image reference without spaces, such as 'ubuntu:24.04'",
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$": "a directory name of letters, digits, '.', '_' or '-'",
    r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$": "a Hub repo id such as 'meta-llama/Llama-3.1-8B-Instruct'",
    r"^[0-9a-f]{40}$": "a pinned 40-hex commit (not a branch or tag)",
    r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$": "an IP address or interface name, optionally :port",
}


def _path(loc: tuple) -> str:
    """models[0].revision"""
    return str(loc[0]) + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])


def _format_errors(host_name: str, data: dict[str, Any], error: ValidationError) -> list[str]:
    """One line per problem. pydantic reports a union (e.g. "auto" | bool) once per member:
    those are folded into one line per key. Inside a list or dict value (models) each problem
    gets its own line with its path. A cross-key rule has no location: it names its key in the
    error's context."""
    expectations: dict[str, list[str]] = {}
    lines = []
    for item in error.errors():
        loc = item["loc"] or (item.get("ctx", {}).get("key", "?"),)
        key = str(loc[0])
        nested = len(loc) > 1 and isinstance(data.get(key), (list, tuple, dict))
        if item["type"] == "extra_forbidden":
            if nested:
                lines.append(f"host {host_name}: unknown key '{_path(loc)}' = {item['input']!r}: "
                             f"see 'models' in README.md for the keys of an entry")
                continue
            close = difflib.get_close_matches(key, Settings.model_fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see the keys in README.md"
            lines.append(f"host {host_name}: unknown key '{key}' = {data[key]!r}: {hint}")
        elif nested:
            lines.append(f"host {host_name}: key '{_path(loc)}' = {item.get('input')!r}: "
                         f"{_describe_expectation(item)}")
        else:
            expectations.setdefault(key, []).append(_describe_expectation(item))
    for key, described in expectations.items():
        value = data.get(key, "<missing>")
        if len(described) > 1:
            described = ["expected " + " or ".join(d.removeprefix("expected ") for d in described)]
        lines.append(f"host {host_name}: key '{key}' = {value!r}: {described[0]}")
    return lines


def validate_host_data(host_name: str, data: dict[str, Any]) -> Settings:
    """Build the typed settings of one host from its merged data, or raise ConfigError."""
    ignored = _pyinfra_keys()
    ours = {
        key: value
        for key, value in data.items()
        if key not in ignored and not key.startswith(LAB_KEY_PREFIX) and not key.startswith("__")
    }
    try:
        return Settings.model_validate(ours)
    except ValidationError as error:
        raise ConfigError(_format_errors(host_name, ours, error)) from None


def _split_host(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
        return str(entry[0]), entry[1]
    return str(entry), {}


def inventory_host_data(
    inventory_globals: dict[str, Any], group_data: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Merge data per host the way pyinfra does for an inventory file: all < the inventory
    file's own group < other groups (in file order) < host data."""
    file_group = Path(inventory_globals["__file__"]).stem
    groups: dict[str, list[Any]] = {
        name: list(value)
        for name, value in inventory_globals.items()
        if not name.startswith("_") and isinstance(value, (list, tuple))
    }
    hosts: dict[str, dict[str, Any]] = {}
    memberships: dict[str, list[str]] = {}
    for group, entries in groups.items():
        for entry in entries:
            name, data = _split_host(entry)
            hosts.setdefault(name, {}).update(data)
            memberships.setdefault(name, []).append(group)

    merged = {}
    for name, host_data in hosts.items():
        data: dict[str, Any] = dict(group_data.get("all", {}))
        for group in [file_group, *memberships[name]]:
            data.update(group_data.get(group, {}))
        data.update(host_data)
        merged[name] = data
    return merged


def _imported_names(path: Path) -> set[str]:
    """Names bound by import statements: modules are not data (pyinfra drops them too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def load_group_data(directory: Path = GROUP_DATA_DIR) -> dict[str, dict[str, Any]]:
    """Read group_data/<group>.py the way pyinfra does: a file's top-level names, less the names
    its imports introduce and dunders. (pyinfra's own loader needs a running CLI state.)"""
    groups = {}
    for path in sorted(directory.glob("*.py")):
        names: dict[str, Any] = {"__file__": str(path)}
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), names)
        imported = _imported_names(path)
        groups[path.stem] = {
            key: value
            for key, value in names.items()
            if key not in imported and not key.startswith("__")
        }
    return groups


def group_data_dirs(inventory_file: str) -> list[Path]:
    """Where pyinfra looks for group data, in its order: group_data/ in the working directory,
    then beside the inventory's directory."""
    dirs = [Path.cwd() / "group_data"]
    beside_inventory = Path(inventory_file).resolve().parent / "group_data"
    if beside_inventory != dirs[0]:
        dirs.append(beside_inventory)
    return [directory for directory in dirs if directory.is_dir()]


def check_inventory(inventory_globals: dict[str, Any]) -> list[str]:
    """Every problem in an inventory and its group data, one line each (empty: all good)."""
    problems: list[str] = []
    group_data: dict[str, dict[str, Any]] = {}
    for directory in group_data_dirs(inventory_globals["__file__"]):
        for group, data in load_group_data(directory).items():
            group_data.setdefault(group, {}).update(data)
    per_host = inventory_host_data(inventory_globals, group_data)
    if not per_host:
        problems.append(f"{inventory_globals['__file__']}: the inventory names no hosts")
    for name, data in per_host.items():
        try:
            validate_host_data(name, data)
        except ConfigError as error:
            problems.extend(error.lines)
    problems += _fleet_wide_problems(per_host)
    if "swarm_managers" in inventory_globals:
        from operations.swarm import manager_group_problems

        def names(group: str) -> list[str]:
            return [_split_host(entry)[0] for entry in inventory_globals.get(group, [])]

        retiring = {name for name, data in per_host.items() if data.get("swarm_retire")}
        problems += [
            f"{inventory_globals['__file__']}: {problem}"
            for problem in manager_group_problems(names("swarm_managers"), names("gpu_nodes"), retiring)
        ]
    return problems


# Keys one Swarm service reads the same on every node: the stack is one file for the fleet.
FLEET_WIDE_KEYS = ("models_dir", "models", "stack_name", "stack_engine_images", "stack_gateway_image",
                   "stack_gateway_port", "stack_publish_mode", "stack_secret_uids")


def _fleet_wide_problems(per_host: dict[str, dict[str, Any]]) -> list[str]:
    """A key the stack applies fleet-wide must not differ between hosts (an engine's weights
    mount, say, is one path for every node the Swarm may place it on)."""
    problems = []
    names = sorted(per_host)
    if not names:
        return problems
    first = names[0]
    for key in FLEET_WIDE_KEYS:
        for name in names[1:]:
            if per_host[name].get(key) != per_host[first].get(key):
                problems.append(
                    f"host {name}: key '{key}' = {per_host[name].get(key)!r}: expected the same value "
                    f"on every host ({first} has {per_host[first].get(key)!r}): one stack serves the fleet")
                break
    return problems


def refuse(lines: list[str]) -> None:
    """Print the problems, one per line, and stop the run without a traceback."""
    for line in lines:
        print(f"configuration error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_CONFIG)


def validate_inventory(inventory_globals: dict[str, Any]) -> None:
    """Call at the end of an inventory file: refuse bad data before pyinfra connects."""
    problems = check_inventory(inventory_globals)
    if problems:
        refuse(problems)


def settings_for(host) -> Settings:
    """The typed settings of the host pyinfra is preparing (its final merged data)."""
    try:
        return validate_host_data(host.name, host.data.dict())
    except ConfigError as error:
        refuse(error.lines)
        raise  # unreachable: refuse() exits
