"""The typed model of every configuration key: one host's merged data in, `Settings` or one line
per problem out (naming the key, the value and what would be accepted).

Data reaches a host from group_data/all.py, group_data/<group>.py, the inventory's host data and
`--data` (operations/inventory_data.py merges them). What values mean beyond their type
(addresses, ports, images, engine flags) is in operations/rules.py.

Two entry points:
- `validate_inventory(globals())` at the end of an inventory file: pyinfra executes inventory files
  before it connects to anything, so a bad value, `--data` included, stops the run before the
  first SSH connection (operations/inventory_check.py does the work).
- `settings_for(host)` in deploy.py: the same model over pyinfra's final view of the host's data,
  giving the phases a typed object (the backstop: the inventory refused bad data already).
"""

from __future__ import annotations

import re
import sys
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from operations import cuda_compat, rules
from operations.config_messages import ConfigError, problem_lines  # noqa: F401  (ConfigError: config.ConfigError)
from operations.config_types import ControlPath, ImageRef, ServicePort, _checked
from operations.monitoring_config import MonitoringSettings

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


def _raise_rule(key: str, problem: str | None) -> None:
    """In a model validator: refuse `key` with a rules.* problem (what is expected), if any."""
    if problem:
        raise PydanticCustomError("rule", "expected {rule}", {"key": key, "rule": problem})


# A vLLM replica's drain agent listens here, above its own port, unless drain_port says.
DRAIN_PORT_OFFSET = 10000

AdvertiseAddress = Annotated[str, _checked(rules.advertise_address_problem)]


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
    port: Annotated[int, Field(ge=1024, le=65535), _checked(rules.reserved_port_problem)] = 8000
    # vLLM only: the port of the replica's drain agent (operations/drain_agent.py), which the
    # gateway's agent check asks whether the replica is being stopped; None: port + 10000.
    drain_port: Annotated[int, Field(ge=1024, le=65535), _checked(rules.reserved_port_problem)] | None = None
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
    # Engine "ollama" only, and required there: the GGUF file of the repository (its path in
    # it) imported into Ollama's own store (operations/ollama_store.py). Only this file is
    # downloaded unless allow_patterns selects more.
    gguf_file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*\.gguf$")] | None = None

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.name

    @property
    def agent_port(self) -> int | None:
        """The drain agent's port: vLLM replicas only (the engine that aborts at SIGTERM)."""
        if self.engine != "vllm":
            return None
        return self.drain_port or self.port + DRAIN_PORT_OFFSET

    @model_validator(mode="after")
    def _engine_args_unmanaged(self) -> "ModelSpec":
        _raise_rule("engine_args", rules.engine_args_problem(self.engine, self.engine_args))
        _raise_rule("gguf_file", rules.gguf_file_problem(self.engine, self.serve, self.gguf_file,
                                                         self.allow_patterns))
        if self.drain_port is not None and self.engine != "vllm":
            _raise_rule("drain_port", f"no drain_port for engine {self.engine!r} (only vLLM "
                                      "replicas run the drain agent)")
        return self


class Settings(MonitoringSettings):
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
    nvidia_nvlsm: Literal["auto"] | bool
    nvidia_allow_reboot: bool
    nvidia_reboot_timeout_s: Annotated[int, Field(ge=60, le=3600)]

    # NVIDIA Container Toolkit
    nvidia_container_toolkit_repo_url: HttpUrl
    nvidia_container_toolkit_key_url: HttpUrl
    nvidia_container_toolkit_key_fingerprint: Fingerprint
    nvidia_container_toolkit_version: ToolkitVersion
    nvidia_container_verify_image: ImageRef
    gpu_health_keep_out: bool

    # Model weights
    models: list[ModelSpec]
    hf_endpoint: HttpUrl
    hf_token_file: ControlPath | None
    weights_cache_dir: ControlPath
    weights_verify: Literal["size", "sha256"]
    weights_free_margin_gb: GiB
    weights_distribution: Literal["peers", "control"]
    weights_source: Literal["control", "seeder"]
    weights_relay_port: ServicePort

    # Docker Swarm
    swarm_advertise_address: AdvertiseAddress | None
    swarm_node_labels: Annotated[dict[str, str], AfterValidator(_node_labels)]
    swarm_retire: bool
    swarm_takeover: bool
    swarm_drain_timeout_s: Annotated[int, Field(ge=10, le=3600)]

    # Inference stack
    stack_name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")]
    stack_engine_images: dict[Literal["vllm", "tgi", "ollama"], ImageRef]
    stack_image_cuda: dict[str, Annotated[str, _checked(cuda_compat.cuda_problem)]]
    stack_gateway_image: ImageRef
    stack_secret_uids: dict[Literal["vllm", "tgi", "ollama", "gateway"], Annotated[int, Field(ge=0, le=2**31)]]
    stack_gateway_port: ServicePort
    stack_gateway_max_body_kb: Annotated[int, Field(ge=16, le=65536)]
    stack_publish_mode: Literal["ingress", "host"]
    stack_api_key_file: ControlPath | None
    stack_client_keys: dict[str, ControlPath]
    stack_client_rate_limits: dict[str, Annotated[int, Field(ge=1, le=1_000_000)]]
    stack_engine_key_file: ControlPath | None
    stack_gateway_tls_cert_file: ControlPath | None
    stack_gateway_tls_key_file: ControlPath | None
    stack_gateway_http_redirect_port: ServicePort | None
    stack_gateway_ca_file: ControlPath | None
    stack_gateway_tls_server_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")] | None
    stack_engine_firewall: bool
    stack_engine_allowed_sources: list[Annotated[str, _checked(rules.cidr_problem)]]
    stack_converge_timeout_s: Annotated[int, Field(ge=30, le=14400)]
    stack_update_monitor_s: Annotated[int, Field(ge=5, le=3600)]

    # Smoke tests
    smoke_deadline_s: Annotated[int, Field(ge=1, le=7200)]

    # Docker Engine
    docker_engine_source: Literal["docker", "distro"]
    docker_version: SemVer
    docker_containerd_version: SemVer
    docker_buildx_version: SemVer
    docker_compose_version: SemVer
    docker_key_fingerprint: Fingerprint
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
        if served and self.stack_engine_key_file is None:
            raise PydanticCustomError(
                "serving_clash",
                "expected a file on the control machine holding the engines' internal key, since "
                "models are served (make one: openssl rand -hex 32 > FILE; chmod 600 FILE)",
                {"key": "stack_engine_key_file"},
            )
        ports = {spec.port for spec in served} | {self.stack_gateway_port}
        if self.stack_gateway_http_redirect_port in ports:
            raise PydanticCustomError(
                "serving_clash",
                "expected a port that neither the gateway nor a served model uses",
                {"key": "stack_gateway_http_redirect_port"},
            )
        ports.add(self.stack_gateway_http_redirect_port)
        for spec in served:
            if spec.agent_port is None:
                continue
            taken = ports | {other.agent_port for other in served if other is not spec}
            if spec.agent_port <= 65535 and spec.agent_port not in taken:
                continue
            if spec.drain_port is not None:  # given, so in range: taken
                raise PydanticCustomError(
                    "serving_clash",
                    "expected a drain_port for {name} that no other port of the stack uses; "
                    "{value} is taken",
                    {"key": "models", "name": spec.name, "value": spec.agent_port},
                )
            raise PydanticCustomError(
                "serving_clash",
                "expected models[].drain_port for {name}: its default, port + 10000 = "
                "{value}, is {why}; give a free port in 1024-65535",
                {"key": "models", "name": spec.name, "value": spec.agent_port,
                 "why": "above 65535" if spec.agent_port > 65535 else "in use by another port of the stack"},
            )
        if self.stack_gateway_http_redirect_port and not self.stack_gateway_tls_cert_file:
            raise PydanticCustomError(
                "serving_clash",
                "expected None without TLS (stack_gateway_tls_cert_file): the gateway's own port "
                "then serves plain HTTP",
                {"key": "stack_gateway_http_redirect_port"},
            )
        return self

    @model_validator(mode="after")
    def _seeder_feeds_a_chain(self) -> "Settings":
        if self.weights_source == "seeder" and self.weights_distribution != "peers":
            raise PydanticCustomError(
                "rule",
                "expected \"control\" with weights_distribution \"control\": the seeder is the "
                "head of the hosts' chain (weights_distribution \"peers\")",
                {"key": "weights_source"},
            )
        return self

    @model_validator(mode="after")
    def _waits_outlast_model_loading(self) -> "Settings":
        slowest = max((spec.health_start_period_s for spec in self.models if spec.serve), default=0)
        if self.stack_converge_timeout_s < slowest:
            raise PydanticCustomError(
                "rule",
                "expected at least the longest models[].health_start_period_s ({slowest} s): "
                "the deploy would give up on replicas Swarm still lets load",
                {"key": "stack_converge_timeout_s", "slowest": slowest},
            )
        return self

    @model_validator(mode="after")
    def _daemon_config_keeps_managed_keys(self) -> "Settings":
        _raise_rule("docker_daemon_config",
                    rules.daemon_config_problem(self.docker_daemon_config, self.docker_data_root))
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

    @model_validator(mode="after")
    def _driver_runs_the_images(self) -> "Settings":
        """After the driver is known to be on its branch: new enough for every served image's
        CUDA (operations/cuda_compat.py)."""
        served = [spec for spec in self.models if spec.serve]
        _raise_rule("nvidia_driver_version", cuda_compat.driver_problem(
            self.nvidia_driver_version,
            [(f"model {spec.name}", spec.image or self.stack_engine_images[spec.engine])
             for spec in served],
            self.stack_image_cuda))
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


def project_keys(data: dict[str, Any]) -> dict[str, Any]:
    """The keys this model checks: less pyinfra's own (connection data, global arguments), the
    lab's metadata (lab_*) and dunders."""
    ignored = _pyinfra_keys()
    return {
        key: value
        for key, value in data.items()
        if key not in ignored and not key.startswith(LAB_KEY_PREFIX) and not key.startswith("__")
    }


def host_problems(data: dict[str, Any]) -> tuple[Settings | None, list[tuple[str, str]]]:
    """(settings, []) for good data, (None, [(key, text), ...]) otherwise."""
    ours = project_keys(data)
    try:
        return Settings.model_validate(ours), []
    except ValidationError as error:
        return None, problem_lines(ours, error, Settings.model_fields)


def validate_host_data(host_name: str, data: dict[str, Any]) -> Settings:
    """Build the typed settings of one host from its merged data, or raise ConfigError."""
    settings, problems = host_problems(data)
    if problems:
        raise ConfigError([f"host {host_name}: {text}" for _, text in problems])
    return settings


def refuse(lines: list[str]) -> None:
    """Print the problems, one per line, and stop the run without a traceback."""
    for line in lines:
        print(f"configuration error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_CONFIG)


def refusal(lines: list[str]) -> Exception:
    """What to raise for refused configuration once pyinfra runs (the deploy file, from a
    greenlet): under pyinfra's CLI an error it shows as our lines and exits 2 with, without a
    traceback (operations/cli_refusal.py); elsewhere a ConfigError."""
    if "pyinfra_cli.exceptions" in sys.modules:
        from operations.cli_refusal import Refused

        return Refused(lines)
    return ConfigError(lines)


def validate_inventory(inventory_globals: dict[str, Any]) -> None:
    """Call at the end of an inventory file: refuse bad data (the inventory's, its group data's
    and --data's) before pyinfra connects. (operations/inventory_check.py does the work.)"""
    from operations.inventory_check import check_inventory

    problems = check_inventory(inventory_globals)
    if problems:
        refuse(problems)


def settings_for(host) -> Settings:
    """The typed settings of the host pyinfra is preparing (its final merged data). The
    inventory already refused bad data before connecting; this is the backstop."""
    try:
        return validate_host_data(host.name, host.data.dict())
    except ConfigError as error:
        raise refusal(error.lines) from None
