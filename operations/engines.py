"""What each engine needs from the deploy, matched to the upstream versions group_data pins
(stack_engine_images): its command line, environment, health checks, the model ids its own
/v1/models lists, where its API key is enforced, and the names the gateway routes to it.

Upstream sources each rule below was matched against:
- vLLM v0.11.0: `vllm serve MODEL` flags (vllm/engine/arg_utils.py,
  vllm/entrypoints/openai/cli_args.py); the API key from --api-key or VLLM_API_KEY guards every
  /v1 route (vllm/entrypoints/openai/api_server.py), /health is open.
- TGI v3.3.6: the launcher's flags are the clap `Args` of launcher/src/main.rs, each also read
  from its upper-case environment variable (`#[clap(long, env)]`); there is no
  --served-model-name (clap refuses an unknown argument). router/src/server.rs: the API key
  layer covers /, /generate, /generate_stream, /v1/chat/completions, /v1/completions, /vertex,
  /invocations, /tokenize; /health, /info, /metrics and /v1/models are outside it. /v1/models
  lists one model whose id is the --model-id given (here the weights' path). The `model` of a
  chat request is echoed (and treated as a LoRA adapter id, falling back to the base model:
  server/text_generation_server/models/flash_causal_lm.py ADAPTER_TO_INDEX.get(id, 0)).
- Ollama v0.12.6: `ollama serve`, configured only by OLLAMA_* variables (envconfig/config.go);
  it answers GET / and /api/version without a model, lists its store's models as `name:tag`
  (/api/tags, /v1/models), has no API key, and loads only its own store (manifests/ + blobs/,
  server/modelpath.go), which the weights phase builds (operations/ollama_store.py).

    engines.command(spec)          # ["--model-id", "/models/tiny", "--hostname", "0.0.0.0", ...]
    engines.gateway_check(spec)    # {"method": "GET", "uri": "/health", "body": None}
"""

from __future__ import annotations

import json
import posixpath
import shlex

ENGINES = ("vllm", "tgi", "ollama")
# Where a service sees its model: the weights (vLLM, TGI) or the Ollama store of the model.
MODEL_MOUNT = "/models"
OLLAMA_DEFAULT_TAG = "latest"

# The engine reads the internal key (the gateway's, no client's: operations/gateway_access.py)
# from /run/secrets (a Docker secret), never from the stack file: a shell wrapper exports it
# under the name the engine reads, then execs the engine.
_SECRET_EXPORTS = {
    "vllm": ('VLLM_API_KEY="$(cat /run/secrets/engine_key)"; export VLLM_API_KEY; ',
             'exec vllm serve "$@"'),
    # TGI: `api_key` is `#[clap(long, env)]`, so API_KEY is the flag's variable.
    "tgi": ('API_KEY="$(cat /run/secrets/engine_key)"; export API_KEY; ',
            'exec text-generation-launcher "$@"'),
    # Ollama has no API key of its own: the gateway enforces the client's, the engine firewall
    # (operations/engine_ports.py) keeps everyone but the gateway nodes off its port.
    "ollama": ("", "exec ollama serve"),
}
_HF_TOKEN_EXPORT = ('if [ -r /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; '
                    'export HF_TOKEN; fi; ')


def model_path(spec) -> str:
    """The model's directory inside its engine container."""
    return posixpath.join(MODEL_MOUNT, spec.name)


def has_own_key(engine: str) -> bool:
    """Whether the engine itself refuses a request without the API key (Ollama: no)."""
    return engine != "ollama"


def _compose_escape(text: str) -> str:
    """`docker stack deploy` interpolates ${VAR} in every string: a literal $ is written $$."""
    return text.replace("$", "$$")


# vLLM aborts the requests in flight at SIGTERM: its tasks run under the drain agent
# (operations/drain_agent.py, a Swarm config at this path), which tells the gateway to send no
# more, waits for the engine to finish what it has, then stops it.
DRAIN_AGENT_PATH = "/usr/local/lib/gpufleet/drain_agent.py"
# How often each gateway asks an engine task's agent; after a stop, the agent waits the notice
# (two asks and a margin) before counting what the engine still holds.
DRAIN_AGENT_INTER_S = 1
DRAIN_NOTICE_S = 3
# Left to the engine's own shutdown within stop_grace_period_s, after the drain's deadline.
DRAIN_SHUTDOWN_MARGIN_S = 5


def drains(spec) -> bool:
    """Whether the model's tasks run under the drain agent (those with an agent port)."""
    return spec.agent_port is not None


def entrypoint(spec) -> list[str]:
    """A shell wrapper that exports the engine's secrets from /run/secrets, then execs the
    engine, or for vLLM the drain agent with the engine as its child."""
    export, run = _SECRET_EXPORTS[spec.engine]
    if drains(spec):
        deadline = spec.stop_grace_period_s - DRAIN_SHUTDOWN_MARGIN_S
        run = (f"exec python3 {DRAIN_AGENT_PATH} --agent-port {spec.agent_port} --engine-port "
               f"{spec.port} --notice {DRAIN_NOTICE_S} --deadline {deadline} -- "
               + run.removeprefix("exec "))
    script = "set -e; " + export + _HF_TOKEN_EXPORT + run
    return ["/bin/sh", "-c", _compose_escape(script), "engine"]


def command(spec) -> list[str]:
    """The engine's own arguments (after the wrapper), then models[].engine_args."""
    path = model_path(spec)
    if spec.engine == "vllm":
        args = [path, "--served-model-name", spec.served_name, "--host", "0.0.0.0",
                "--port", str(spec.port), "--tensor-parallel-size", str(spec.tensor_parallel_size),
                "--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
        if spec.max_model_len:
            args += ["--max-model-len", str(spec.max_model_len)]
    elif spec.engine == "tgi":
        # No --served-model-name: TGI has none; the gateway answers the served name. --hostname
        # is given on purpose: clap would otherwise read HOSTNAME, which Docker sets to the
        # container's id.
        args = ["--model-id", path, "--hostname", "0.0.0.0", "--port", str(spec.port),
                "--num-shard", str(spec.tensor_parallel_size),
                "--cuda-memory-fraction", str(spec.gpu_memory_utilization)]
        if spec.max_model_len:
            args += ["--max-total-tokens", str(spec.max_model_len)]
    else:  # ollama: configured by environment only
        args = []
    return [_compose_escape(arg) for arg in [*args, *spec.engine_args]]


def environment(spec) -> dict[str, str]:
    if spec.engine == "ollama":
        return {
            "OLLAMA_HOST": f"0.0.0.0:{spec.port}",
            "OLLAMA_MODELS": model_path(spec),
            # The store is mounted read-only: `ollama serve` prunes unreferenced blobs and empty
            # manifest folders at start (server/routes.go Serve) unless told not to.
            "OLLAMA_NOPRUNE": "1",
            # Loaded once and kept: Ollama unloads an idle model after 5 minutes by default.
            "OLLAMA_KEEP_ALIVE": "-1",
        }
    # The weights are on the node already (weights phase): the engine must not reach the Hub.
    env = {"HF_HUB_OFFLINE": "1"}
    if spec.engine == "vllm":
        env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    else:  # TGI reports usage to Hugging Face unless told not to (launcher --usage-stats).
        env["USAGE_STATS"] = "off"
    return env


def container_healthcheck(spec) -> list[str]:
    """A check the engine's own image can run: vLLM's has python3, TGI's curl, Ollama its CLI.
    Ollama's answers once its server is up and the model is in its store."""
    if spec.engine == "vllm":
        return ["CMD", "python3", "-c", "import urllib.request; "
                f"urllib.request.urlopen('http://127.0.0.1:{spec.port}/health', timeout=3)"]
    if spec.engine == "tgi":
        return ["CMD-SHELL", f"curl -fsS http://127.0.0.1:{spec.port}/health >/dev/null || exit 1"]
    return ["CMD-SHELL", f"OLLAMA_HOST=127.0.0.1:{spec.port} ollama show "
                         f"{shlex.quote(ollama_name(spec.served_name))} >/dev/null"]


def gateway_check(spec) -> dict[str, str | None]:
    """The gateway's HTTP health check of one engine task: method, URI, JSON body or None.
    Ollama has no /health: POST /api/show of the model answers 200 only when its server is up
    and the model is in its store."""
    if spec.engine == "ollama":
        return {"method": "POST", "uri": "/api/show",
                "body": json.dumps({"model": ollama_name(spec.served_name)}, separators=(",", ":"))}
    return {"method": "GET", "uri": "/health", "body": None}


def health_path(engine: str) -> str:
    """What the smoke tests poll until an engine answers: Ollama has no /health."""
    return "/api/version" if engine == "ollama" else "/health"


def listed_model_ids(spec) -> tuple[str, ...]:
    """What the engine's own /v1/models lists: vLLM the served name, TGI its --model-id (the
    weights' path), Ollama the store's `name:tag`."""
    if spec.engine == "tgi":
        return (model_path(spec),)
    if spec.engine == "ollama":
        return (ollama_name(spec.served_name),)
    return (spec.served_name,)


def auth_probe(engine: str) -> tuple[str, str] | None:
    """A request the engine refuses with 401 without the key (method, path); None: no own key.
    TGI's /v1/models is outside its key layer, its chat completions inside."""
    if engine == "vllm":
        return ("GET", "/v1/models")
    if engine == "tgi":
        return ("POST", "/v1/chat/completions")
    return None


def request_names(spec) -> tuple[str, ...]:
    """The "model" values the gateway routes to this model: its served name, and for Ollama the
    same name with the default tag, which Ollama resolves to the same model."""
    if spec.engine == "ollama" and ":" not in spec.served_name.rsplit("/", 1)[-1]:
        return (spec.served_name, f"{spec.served_name}:{OLLAMA_DEFAULT_TAG}")
    return (spec.served_name,)


def ollama_name(served_name: str) -> str:
    """Ollama's full name of a model: `name:tag` (types/model/name.go: the tag defaults to
    "latest")."""
    last = served_name.rsplit("/", 1)[-1]
    return served_name if ":" in last else f"{served_name}:{OLLAMA_DEFAULT_TAG}"
