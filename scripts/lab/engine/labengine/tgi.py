"""`text-generation-launcher` in the lab: a LAB STAND-IN for TGI 3.3.6 (not TGI).

Command line: exactly the flags of TGI v3.3.6's launcher (launcher/src/main.rs, clap `Args`),
each also read from its upper-case environment variable as clap's `env` does; anything else is
refused as clap refuses it (exit 2, "error: unexpected argument '--served-model-name' found").
The launcher's own argument checks that matter here are kept: --max-input-tokens below
--max-total-tokens, not both --max-input-tokens and --max-input-length.

Routes and auth as router/src/server.rs: the API key layer (`Authorization: Bearer <key>`,
compared case-insensitively, 401 with an empty body) covers POST /, /generate,
/generate_stream, /v1/chat/completions, /v1/completions, /tokenize; GET /, /health, /info,
/metrics and /v1/models are open. /v1/models lists one model: the --model-id. A chat answer's
"model" is the request's (or the model id when it is absent or "tgi").
"""

from __future__ import annotations

import json
import logging
import os
import sys

from . import STAND_IN, protocol
from .app import EngineApp
from .cli import ServeConfig, UsageError

log = logging.getLogger("labengine")
TGI_VERSION = "3.3.6"
VERSION = f"{TGI_VERSION}+gpufleet.lab"
USAGE = "Usage: text-generation-launcher [OPTIONS]"

# clap Args of launcher/src/main.rs at v3.3.6: field -> "value" (takes one), "flag" (none).
ARGS = {
    "model_id": "value", "revision": "value", "validation_workers": "value", "sharded": "value",
    "num_shard": "value", "quantize": "value", "speculate": "value", "dtype": "value",
    "kv_cache_dtype": "value", "trust_remote_code": "flag", "max_concurrent_requests": "value",
    "max_best_of": "value", "max_stop_sequences": "value", "max_top_n_tokens": "value",
    "max_input_tokens": "value", "max_input_length": "value", "max_total_tokens": "value",
    "waiting_served_ratio": "value", "max_batch_prefill_tokens": "value",
    "max_batch_total_tokens": "value", "max_waiting_tokens": "value", "max_batch_size": "value",
    "cuda_graphs": "value", "hostname": "value", "port": "value", "prometheus_port": "value",
    "shard_uds_path": "value", "master_addr": "value", "master_port": "value",
    "huggingface_hub_cache": "value", "weights_cache_override": "value",
    "disable_custom_kernels": "flag", "cuda_memory_fraction": "value", "rope_scaling": "value",
    "rope_factor": "value", "json_output": "flag", "otlp_endpoint": "value",
    "otlp_service_name": "value", "cors_allow_origin": "value", "api_key": "value",
    "watermark_gamma": "value", "watermark_delta": "value", "ngrok": "flag",
    "ngrok_authtoken": "value", "ngrok_edge": "value", "tokenizer_config_path": "value",
    "disable_grammar_support": "flag", "env": "flag", "max_client_batch_size": "value",
    "lora_adapters": "value", "usage_stats": "value", "payload_limit": "value",
    "enable_prefill_logprobs": "flag", "graceful_termination_timeout": "value",
}
SHORT = {"-p": "port", "-e": "env", "-g": "graceful_termination_timeout"}
DEFAULTS = {"model_id": "bigscience/bloom-560m", "hostname": "0.0.0.0", "port": "3000",
            "max_concurrent_requests": "128", "payload_limit": "2000000", "usage_stats": "on",
            "cuda_memory_fraction": "1.0"}
# The `env` of `#[clap(env)]` on a field without a value of its own (flags are not read).
NO_ENV = {"env"}


def _clap_error(message: str) -> UsageError:
    return UsageError(f"error: {message}\n\n{USAGE}\n\nFor more information, try '--help'.")


def parse_launcher(argv: list[str], environ: dict[str, str] | None = None) -> dict[str, object]:
    """The launcher's arguments -> {field: value}; UsageError as clap (or the launcher) would."""
    environ = os.environ if environ is None else environ
    given: dict[str, object] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        name, eq, inline = word.partition("=")
        if name.startswith("--"):
            field = name[2:].replace("-", "_")
            if "_" in name[2:] or field not in ARGS:  # clap: kebab-case long names only
                raise _clap_error(f"unexpected argument '{name}' found")
        elif name in SHORT:
            field = SHORT[name]
        else:
            raise _clap_error(f"unexpected argument '{word}' found")
        if ARGS[field] == "flag":
            if eq:
                raise _clap_error(f"unexpected value '{inline}' for '{name}' found; no more "
                                  "were expected")
            given[field] = True
            continue
        if not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                raise _clap_error(f"a value is required for '{name} <{field.upper()}>' but "
                                  "none was supplied")
            inline = argv[i]
            i += 1
        if field in given and field != "cors_allow_origin":
            raise _clap_error(f"the argument '--{field.replace('_', '-')} <{field.upper()}>' "
                              "cannot be used multiple times")
        given[field] = inline
    for field, kind in ARGS.items():
        if field not in given and kind == "value" and field not in NO_ENV \
                and environ.get(field.upper()):
            given[field] = environ[field.upper()]
    for field, value in DEFAULTS.items():
        given.setdefault(field, value)
    _check(given)
    return given


def _int(given: dict, field: str) -> int | None:
    if field not in given:
        return None
    try:
        return int(str(given[field]))
    except ValueError:
        raise _clap_error(f"invalid value '{given[field]}' for '--{field.replace('_', '-')} "
                          f"<{field.upper()}>': invalid digit found in string") from None


def _check(given: dict) -> None:
    """The launcher's own checks (launcher/src/main.rs main), as ArgumentValidation errors."""
    for field in ("port", "num_shard", "max_total_tokens", "max_input_tokens", "max_input_length",
                  "payload_limit", "max_concurrent_requests"):
        _int(given, field)
    if "max_input_tokens" in given and "max_input_length" in given:
        raise UsageError("Both `max_input_tokens` and `max_input_length` are set. Please define "
                         "only `max_input_tokens` as `max_input_length is deprecated for naming "
                         "consistency.")
    max_input = _int(given, "max_input_tokens") or _int(given, "max_input_length")
    max_total = _int(given, "max_total_tokens")
    if max_input is not None and max_total is not None and max_input >= max_total:
        raise UsageError(f"`max_input_tokens`({max_input}) must be < `max_total_tokens`({max_total})")


def serve_config(given: dict, environ: dict[str, str] | None = None) -> ServeConfig:
    """What the shared engine app needs, from the launcher's arguments."""
    config = ServeConfig(model=str(given["model_id"]), served_model_names=[str(given["model_id"])],
                         host=str(given["hostname"]), port=_int(given, "port") or 3000,
                         max_model_len=_int(given, "max_total_tokens"))
    if given.get("api_key"):
        config.api_key, config.api_key_source = str(given["api_key"]), "--api-key / API_KEY"
    for field in ("num_shard", "cuda_memory_fraction", "quantize", "dtype"):
        if field in given:
            config.ignored.append(f"--{field.replace('_', '-')} {given[field]}")
    return config


class TGIApp(EngineApp):
    """TGI's routes over the shared generation loop."""

    PROTECTED = {("POST", "/"), ("POST", "/generate"), ("POST", "/generate_stream"),
                 ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                 ("POST", "/tokenize")}

    def __init__(self, config: ServeConfig, engine, payload_limit: int = 2_000_000, **kwargs):
        super().__init__(config, engine, **kwargs)
        self.payload_limit = payload_limit
        self.requests = 0

    def tgi_authorized(self, headers: dict[bytes, bytes]) -> bool:
        """TGI's check: the whole header equals "Bearer <key>", compared in lower case."""
        if not self.config.api_key:
            return True
        value = headers.get(b"authorization", b"").decode("latin-1")
        return value.lower() == f"Bearer {self.config.api_key}".lower()

    def response_model(self, request) -> str:
        return request.model if request.model not in ("", "tgi", None) else self.config.model

    def info(self) -> dict:
        """GET /info (router/src/lib.rs Info)."""
        total = self.engine.max_model_len
        return {"model_id": self.config.model, "model_sha": None, "model_pipeline_tag": None,
                "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4,
                "max_input_tokens": total - 1, "max_total_tokens": total,
                "validation_workers": 2, "max_client_batch_size": 4,
                "router": "text-generation-router", "version": VERSION, "sha": None,
                "docker_label": STAND_IN}

    async def _route(self, scope, receive, send, method: str, path: str) -> int:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if (method, path) in self.PROTECTED and not self.tgi_authorized(headers):
            return await self._send(send, 401, b"", None)
        if method == "GET" and path in ("/", "/health", "/ping"):
            return await self._send(send, 200 if self.ready else 503, b"", None)
        if method == "GET" and path == "/info":
            return await self._send_json(send, 200, self.info())
        if method == "GET" and path == "/metrics":
            text = (f"# TYPE tgi_request_count counter\ntgi_request_count {self.requests}\n"
                    f"# TYPE tgi_batch_current_size gauge\n"
                    f"tgi_batch_current_size {self.metrics.running}\n")
            return await self._send(send, 200, text.encode(), b"text/plain; version=0.0.4")
        if method == "GET" and path == "/v1/models":
            model_id = self.config.model
            return await self._send_json(send, 200, {"object": "list", "data": [
                {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]})
        if (method, path) not in self.PROTECTED or path == "/tokenize":
            return await self._send(send, 404, b"", None)
        self.requests += 1
        try:
            body = await self._read_body(receive)
            if len(body) > self.payload_limit:
                raise protocol.APIError(413, "payload too large")
            parsed = json.loads(body) if body else None
            if path in ("/", "/generate", "/generate_stream"):
                request = self.generate_request(parsed, stream=path == "/generate_stream"
                                                or bool((parsed or {}).get("stream")))
            elif path == "/v1/completions":
                parsed = {**(parsed or {}), "model": self.config.model}
                request = protocol.validate_completion(parsed, [self.config.model])
            else:
                named = (parsed or {}).get("model") if isinstance(parsed, dict) else None
                request = protocol.validate_chat(parsed, [named or self.config.model])
            prompts = self._prompts(request)
        except ValueError as error:
            return await self._send_json(send, 422, {"error": f"Failed to deserialize the JSON "
                                                    f"body into the target type: {error}",
                                           "error_type": "validation"})
        except protocol.APIError as error:
            return await self._send_json(send, 422 if error.status == 400 else error.status,
                                         {"error": error.message, "error_type": "validation"})
        if request.kind == "generate":
            return await self._generate_native(request, prompts, receive, send)
        return await self._serve(request, prompts, receive, send)

    def generate_request(self, body, stream: bool) -> protocol.Request:
        """POST /generate body ({"inputs", "parameters"}) -> a Request (max_new_tokens: the rest
        of the context when absent, as router/src/validation.rs)."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            raise protocol.APIError(400, "inputs: expected a string")
        params = body.get("parameters") or {}
        sampling = protocol.Sampling(
            max_tokens=params.get("max_new_tokens"),
            temperature=float(params.get("temperature") or 0.0) if params.get("do_sample")
            or params.get("temperature") else 0.0,
            top_p=float(params.get("top_p") or 1.0), top_k=int(params.get("top_k") or 0),
            seed=params.get("seed"), stop=list(params.get("stop") or []))
        request = protocol.Request("generate", self.config.model, sampling,
                                   prompts=[body["inputs"]], stream=stream)
        request.details = bool(params.get("details"))
        return request

    def _prompts(self, request):
        if request.kind != "generate":
            return super()._prompts(request)
        ids = self.engine.encode(request.prompts[0], True)
        return [(ids, request.prompts[0], protocol.check_length(
            len(ids), request.sampling.max_tokens, self.engine.max_model_len))]

    async def _generate_native(self, request, prompts, receive, send) -> int:
        import asyncio

        ids, _, limit = prompts[0]
        gone = asyncio.Event()
        rng = self.engine.new_rng(request.sampling.seed)
        if not request.stream:
            result = await self._generate(ids, request, limit, rng, gone)
            body = {"generated_text": result["text"]}
            if request.details:
                body["details"] = {"finish_reason": {"length": "length"}.get(
                    result["finish_reason"], "eos_token"), "generated_tokens": result["tokens"],
                    "seed": request.sampling.seed, "prefill": [], "tokens": []}
            return await self._send_json(send, 200, body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._headers(b"text/event-stream")})
        index = 0

        async def emit(delta: str, count: int) -> None:
            nonlocal index
            event = {"index": index, "token": {"id": 0, "text": delta, "logprob": 0.0,
                                              "special": False},
                     "generated_text": None, "details": None}
            index += 1
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data:" + json.dumps(event).encode() + b"\n\n"})

        result = await self._generate(ids, request, limit, rng, gone, emit)
        final = {"index": index, "token": {"id": 0, "text": result["rest"], "logprob": 0.0,
                                          "special": False},
                 "generated_text": result["text"],
                 "details": {"finish_reason": "length" if result["finish_reason"] == "length"
                             else "eos_token", "generated_tokens": result["tokens"],
                             "seed": request.sampling.seed}}
        await send({"type": "http.response.body", "more_body": False,
                    "body": b"data:" + json.dumps(final).encode() + b"\n\n"})
        return 200


def main(argv: list[str] | None = None) -> int:
    from . import STAND_IN_NOTICE

    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s INFO text_generation_launcher: [labengine] %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        print(f"text-generation-launcher {VERSION}")
        return 0
    if "--help" in argv or "-h" in argv:
        print(f"{USAGE}\n(the gpu-fleet lab CPU engine, a LAB STAND-IN for TGI {TGI_VERSION}; "
              f"options: {', '.join('--' + a.replace('_', '-') for a in ARGS)})")
        return 0
    try:
        given = parse_launcher(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    config = serve_config(given)
    log.warning(STAND_IN_NOTICE.replace("vLLM", f"TGI {TGI_VERSION}"))
    for level, line in config.log_lines():
        getattr(log, level)(line)
    from .engine import Engine

    try:
        engine = Engine(config)
    except Exception as error:
        log.error("cannot load %s: %s", config.model, error)
        return 1
    import uvicorn

    app = TGIApp(config, engine, payload_limit=int(given["payload_limit"]))
    log.info("Connected (lab stand-in) on http://%s:%d", config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", lifespan="on",
                timeout_keep_alive=5, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
