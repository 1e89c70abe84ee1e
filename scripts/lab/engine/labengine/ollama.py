"""`ollama` in the lab: a LAB STAND-IN for Ollama 0.12.6 (not Ollama).

What it keeps of Ollama (ollama/ollama at v0.12.6):
- Configuration by environment only (envconfig/config.go): OLLAMA_HOST (default
  127.0.0.1:11434), OLLAMA_MODELS (default ~/.ollama/models), OLLAMA_NOPRUNE, OLLAMA_KEEP_ALIVE.
  `ollama serve` takes no flags.
- The store (server/modelpath.go, server/manifest.go): manifests/<host>/<namespace>/<model>/<tag>
  (JSON, schemaVersion 2, a config layer and layers by digest) and blobs/sha256-<hex>. `serve`
  creates blobs/ at start (MkdirAll: a read-only store that has one is fine) and, unless
  OLLAMA_NOPRUNE, removes blobs no manifest names, as Ollama prunes at start.
- `ollama create NAME -f Modelfile` with `FROM <file.gguf>`: the client hashes the file and POSTs
  it to /api/blobs/<digest>, which answers 200 without storing anything when blobs/<digest>
  exists (server/routes.go CreateBlobHandler); the server's /api/create references that blob as the model layer (server/create.go ggufLayers), adds a
  template layer from the GGUF's tokenizer.chat_template (Ollama would translate it into one of
  its Go templates; the stand-in keeps the Jinja text and renders it: a difference in what the
  template blob holds, not in the layout) and writes the config and the manifest.
- Routes (server/routes.go GenerateRoutes): GET|HEAD /, /api/version, /api/tags, POST
  /api/show, /api/create, HEAD|POST /api/blobs/:digest, GET /api/ps, POST /api/generate,
  /api/chat (NDJSON streams unless "stream": false), POST /v1/chat/completions,
  /v1/completions, GET /v1/models (ids `name:tag`, owned_by the namespace). No API key: Ollama
  has none. Unknown models: 404 `model "x" not found, try pulling it first`.
- Models load on their first request and stay loaded (OLLAMA_KEEP_ALIVE=-1 in the stack).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from urllib import request as urlrequest

from . import STAND_IN, STAND_IN_NOTICE, protocol
from .app import EngineApp
from .cli import ServeConfig

log = logging.getLogger("labengine")
OLLAMA_VERSION = "0.12.6"
VERSION = f"{OLLAMA_VERSION}+gpufleet.lab"
MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA = "application/vnd.ollama.image.model"
TEMPLATE_MEDIA = "application/vnd.ollama.image.template"


# --- Names and the store -----------------------------------------------------------------------

def parse_name(name: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) with Ollama's defaults (types/model/name.go)."""
    base, tag = (name.rsplit(":", 1) if ":" in name.rsplit("/", 1)[-1] else (name, "latest"))
    parts = base.split("/")
    return (parts[-3] if len(parts) >= 3 else "registry.ollama.ai",
            parts[-2] if len(parts) >= 2 else "library", parts[-1], tag)


def shortest(host: str, namespace: str, model: str, tag: str) -> str:
    """Name.DisplayShortest: the defaults left out, the tag kept."""
    prefix = "" if host == "registry.ollama.ai" else f"{host}/"
    prefix += "" if namespace == "library" and not prefix else f"{namespace}/"
    return f"{prefix}{model}:{tag}"


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest.replace(":", "-")

    def manifest_path(self, name: str) -> Path:
        return self.root.joinpath("manifests", *parse_name(name))

    def manifest(self, name: str) -> dict | None:
        path = self.manifest_path(name)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def names(self) -> list[str]:
        base = self.root / "manifests"
        return sorted(shortest(*path.relative_to(base).parts) for path in base.glob("*/*/*/*")
                      if path.is_file() and not path.name.endswith(".partial"))

    def layer(self, manifest: dict, media: str) -> dict | None:
        return next((l for l in manifest.get("layers") or [] if l.get("mediaType") == media), None)

    def write_blob(self, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob(digest)
        if not path.exists():
            tmp = path.with_name(path.name + ".partial")
            tmp.write_bytes(data)
            tmp.replace(path)
        return {"digest": digest, "size": len(data)}

    def prune(self) -> int:
        """Blobs no manifest names are removed (server/images.go PruneLayers)."""
        used = set()
        for name in self.names():
            manifest = self.manifest(name) or {}
            for layer in [manifest.get("config") or {}, *(manifest.get("layers") or [])]:
                used.add(str(layer.get("digest", "")).replace(":", "-"))
        removed = 0
        for path in (self.root / "blobs").glob("sha256-*"):
            if path.name not in used:
                path.unlink()
                removed += 1
        return removed


def create_model(store: Store, name: str, files: dict[str, str], template: str | None) -> None:
    """What /api/create does with a GGUF file (server/create.go): the blob is the model layer,
    a template layer, a config blob, then the manifest (written last, by rename)."""
    from . import gguf

    if len(files) != 1:
        raise protocol.APIError(400, "the stand-in creates a model from one GGUF file")
    (_, digest), = files.items()
    path = store.blob(digest)
    if not path.is_file():
        raise protocol.APIError(400, f"blob {digest} not found")
    metadata, _ = gguf.read_header(path)
    layers = [{"mediaType": MODEL_MEDIA, "digest": digest, "size": path.stat().st_size}]
    template = template or metadata.get("tokenizer.chat_template")
    if template:
        layers.append({"mediaType": TEMPLATE_MEDIA, **store.write_blob(template.encode())})
    family = str(metadata.get("general.architecture", "llama"))
    config = {"model_format": "gguf", "model_family": family, "model_families": [family],
              "model_type": "", "file_type": "F32", "architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}
    config_layer = {"mediaType": CONFIG_MEDIA,
                    **store.write_blob(json.dumps(config, separators=(",", ":")).encode())}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA, "config": config_layer,
                "layers": layers}
    target = store.manifest_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    tmp.write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
    tmp.replace(target)


# --- The server -----------------------------------------------------------------------------------

class _ModelApp(EngineApp):
    """One loaded model: its answers carry the name the client asked for (openai/openai.go)."""

    def response_model(self, request) -> str:
        return request.model

class OllamaApp(EngineApp):
    """Ollama's routes; one shared-loop engine app per loaded model."""

    def __init__(self, store: Store, host: str, port: int, **kwargs):
        config = ServeConfig(model=str(store.root), served_model_names=["ollama"], host=host,
                             port=port)
        super().__init__(config, None, **kwargs)
        self.ready = True
        self.store = store
        self.loaded: dict[str, EngineApp] = {}

    def _model_app(self, name: str) -> EngineApp:
        """The engine app of a model of the store, loaded on first use."""
        full = shortest(*parse_name(name))
        if full in self.loaded:
            return self.loaded[full]
        manifest = self.store.manifest(full)
        layer = self.store.layer(manifest, MODEL_MEDIA) if manifest else None
        if layer is None:
            raise protocol.APIError(404, f'model "{name}" not found, try pulling it first',
                                    "api_error")
        template_layer = self.store.layer(manifest, TEMPLATE_MEDIA)
        template = self.store.blob(template_layer["digest"]).read_text() if template_layer else None
        from .engine import Engine

        engine = Engine.from_gguf(self.store.blob(layer["digest"]), chat_template=template)
        app = _ModelApp(ServeConfig(model=full, served_model_names=[full]), engine,
                        hostname=self.hostname)
        app.executor = self.executor
        self.loaded[full] = app
        return app

    def _details(self, name: str) -> dict:
        manifest = self.store.manifest(name) or {}
        return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                "parameter_size": "", "quantization_level": "F32",
                "size": sum(l.get("size", 0) for l in manifest.get("layers") or [])}

    def tags(self) -> dict:
        models = []
        for name in self.store.names():
            path = self.store.manifest_path(name)
            details = self._details(name)
            models.append({"name": name, "model": name, "size": details.pop("size"),
                           "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                        time.gmtime(path.stat().st_mtime)),
                           "digest": hashlib.sha256(path.read_bytes()).hexdigest(),
                           "details": details, "_mtime": int(path.stat().st_mtime)})
        return {"models": models}

    async def _route(self, scope, receive, send, method: str, path: str) -> int:
        try:
            return await self._route_ollama(scope, receive, send, method, path)
        except protocol.APIError as error:
            if path.startswith("/v1/"):
                return await self._send_json(send, error.status, {"error": {
                    "message": error.message, "type": "api_error", "param": None, "code": None}})
            return await self._send_json(send, error.status, {"error": error.message})

    async def _route_ollama(self, scope, receive, send, method, path) -> int:
        if path == "/" and method in ("GET", "HEAD"):
            return await self._send(send, 200, b"Ollama is running", b"text/plain; charset=utf-8")
        if path == "/api/version" and method in ("GET", "HEAD"):
            return await self._send_json(send, 200, {"version": VERSION})
        if path == "/api/tags" and method in ("GET", "HEAD"):
            body = self.tags()
            for model in body["models"]:
                model.pop("_mtime")
            return await self._send_json(send, 200, body)
        if path == "/v1/models" and method == "GET":
            return await self._send_json(send, 200, {"object": "list", "data": [
                {"id": m["name"], "object": "model", "created": m["_mtime"],
                 "owned_by": parse_name(m["name"])[1]} for m in self.tags()["models"]]})
        if path == "/api/ps" and method == "GET":
            return await self._send_json(send, 200, {"models": [
                {"name": name, "model": name, "expires_at": "0001-01-01T00:00:00Z"}
                for name in self.loaded]})
        if path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
            return await self._blob(path.rsplit("/", 1)[1], method, receive, send)
        if method != "POST":
            return await self._send(send, 404, b"404 page not found", b"text/plain")
        raw = await self._read_body(receive)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            raise protocol.APIError(400, "invalid JSON body") from None
        if not isinstance(body, dict):
            raise protocol.APIError(400, "the request body must be a JSON object")
        name = str(body.get("model") or body.get("name") or "")
        if path == "/api/show":
            manifest = self.store.manifest(name) if name else None
            if manifest is None:
                raise protocol.APIError(404, f"model '{name}' not found")
            template = self.store.layer(manifest, TEMPLATE_MEDIA)
            return await self._send_json(send, 200, {
                "modelfile": f"# LAB STAND-IN ({STAND_IN})\nFROM {name}\n",
                "template": self.store.blob(template["digest"]).read_text() if template else "",
                "details": {k: v for k, v in self._details(name).items() if k != "size"},
                "capabilities": ["completion"]})
        if path == "/api/create":
            create_model(self.store, name, dict(body.get("files") or {}), body.get("template"))
            lines = [{"status": "parsing GGUF"}, {"status": "writing manifest"},
                     {"status": "success"}]
            return await self._send(send, 200, b"".join(json.dumps(l).encode() + b"\n"
                                                         for l in lines), b"application/x-ndjson")
        app = self._model_app(name)
        if path in ("/v1/chat/completions", "/v1/completions"):
            validate = protocol.validate_chat if path.endswith("chat/completions") \
                else protocol.validate_completion
            request = validate(body, [app.config.served_name, name])
            return await app._serve(request, app._prompts(request), receive, send)
        if path in ("/api/generate", "/api/chat"):
            return await self._native(app, name, path, body, send)
        return await self._send(send, 404, b"404 page not found", b"text/plain")

    async def _blob(self, digest: str, method: str, receive, send) -> int:
        path = self.store.blob(digest)
        if method == "HEAD":
            return await self._send(send, 200 if path.exists() else 404, b"", None)
        if path.exists():
            # Stored already: nothing is written. (Ollama answers without reading the upload; a
            # stand-in answering before reading it could have the client's send reset, so the
            # upload is read and dropped first.)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    break
            return await self._send(send, 200, b"", None)
        data = await self._read_body(receive)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise protocol.APIError(400, f"digest mismatch, expected {digest!r}")
        self.store.write_blob(data)
        return await self._send(send, 201, b"", None)

    async def _native(self, app: EngineApp, name: str, path: str, body: dict, send) -> int:
        """/api/generate and /api/chat: NDJSON chunks, then a done line with the counts."""
        options = body.get("options") or {}
        sampling = protocol.Sampling(
            max_tokens=options.get("num_predict") if (options.get("num_predict") or -1) > 0 else None,
            temperature=float(options.get("temperature", 0.8)), top_p=float(options.get("top_p", 0.9)),
            top_k=int(options.get("top_k", 40)), seed=options.get("seed"),
            stop=list(options.get("stop") or []))
        chat = path == "/api/chat"
        if chat:
            messages = [{"role": m.get("role"), "content": m.get("content", "")}
                        for m in body.get("messages") or []]
            text = app.engine.chat_prompt(messages, True)
            ids = app.engine.encode(text, False)
        else:
            ids = app.engine.encode(str(body.get("prompt", "")), True)
        request = protocol.Request("completion", name, sampling)
        limit = protocol.check_length(len(ids), sampling.max_tokens, app.engine.max_model_len)
        stream, started = body.get("stream", True) is not False, time.monotonic()
        gone = asyncio.Event()

        def line(text: str, done: bool, extra: dict | None = None) -> bytes:
            out = {"model": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            out.update({"message": {"role": "assistant", "content": text}} if chat
                       else {"response": text})
            out["done"] = done
            out.update(extra or {})
            return json.dumps(out).encode() + b"\n"

        if stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self._headers(b"application/x-ndjson")})

        async def emit(delta: str, count: int) -> None:
            await send({"type": "http.response.body", "body": line(delta, False), "more_body": True})

        result = await app._generate(ids, request, limit, app.engine.new_rng(sampling.seed),
                                     gone, emit if stream else None)
        done = {"done_reason": "length" if result["finish_reason"] == "length" else "stop",
                "total_duration": int((time.monotonic() - started) * 1e9),
                "prompt_eval_count": len(ids), "eval_count": result["tokens"]}
        if not stream:
            return await self._send(send, 200, line(result["text"], True, done).rstrip(b"\n"))
        await send({"type": "http.response.body", "body": line(result["rest"], True, done),
                    "more_body": False})
        return 200


# --- The CLI ---------------------------------------------------------------------------------------

def settings(environ: dict[str, str]) -> tuple[str, int, Path]:
    """OLLAMA_HOST (host[:port], scheme allowed) and OLLAMA_MODELS, with Ollama's defaults."""
    hostport = environ.get("OLLAMA_HOST", "").strip() or "127.0.0.1:11434"
    hostport = hostport.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "11434")
    models = environ.get("OLLAMA_MODELS") or str(Path.home() / ".ollama" / "models")
    return host or "127.0.0.1", int(port or 11434), Path(models)


def _client_url(environ) -> str:
    host, port, _ = settings(environ)
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def _call(url: str, method: str = "GET", body: dict | bytes | None = None, timeout: float = 30):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urlrequest.Request(url, data=data, method=method)
    with urlrequest.urlopen(req, timeout=timeout) as response:
        return response.status, response.read()


def cli_create(name: str, modelfile: Path, environ) -> int:
    """`ollama create NAME -f Modelfile` for `FROM <file.gguf>` (cmd/cmd.go CreateHandler)."""
    base = _client_url(environ)
    source = None
    for raw in modelfile.read_text().splitlines():
        keyword, _, value = raw.strip().partition(" ")
        if keyword.upper() == "FROM":
            source = (modelfile.parent / value.strip()).resolve()
    if source is None or not source.is_file():
        print(f"Error: no FROM file in {modelfile} (the stand-in imports a GGUF file)",
              file=sys.stderr)
        return 1
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest_text = "sha256:" + digest.hexdigest()
    # api/client.go CreateBlob: a POST of the file; the server answers 200 without reading it
    # when blobs/<digest> exists (201 when it stored it).
    status, _ = _call(f"{base}/api/blobs/{digest_text}", "POST", source.read_bytes(), timeout=600)
    print(f"{'using existing layer' if status == 200 else 'copying file'} {digest_text}")
    try:
        _, out = _call(f"{base}/api/create", "POST",
                       {"model": name, "files": {source.name: digest_text}}, timeout=600)
    except Exception as error:  # noqa: BLE001 - the server's answer, as Ollama's CLI prints it
        detail = error.read().decode() if hasattr(error, "read") else str(error)
        print(f"Error: {detail}", file=sys.stderr)
        return 1
    for line in out.decode().splitlines():
        print(json.loads(line).get("status", ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ)
    if argv[:1] in (["--version"], ["-v"]):
        print(f"ollama version is {VERSION}")
        return 0
    command = argv[0] if argv else "help"
    if command == "serve":
        if len(argv) > 1:
            print(f"Error: unknown flag: {argv[1]}", file=sys.stderr)
            return 1
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="time=%(asctime)s level=%(levelname)s source=labengine msg=%(message)s")
        host, port, models = settings(environ)
        store = Store(models)
        (models / "blobs").mkdir(parents=True, exist_ok=True)
        if not environ.get("OLLAMA_NOPRUNE"):
            log.info("pruned %d unused blobs", store.prune())
        log.warning(STAND_IN_NOTICE.replace("vLLM", f"Ollama {OLLAMA_VERSION}"))
        log.info("Listening on %s:%d (version %s), models %s: %s", host, port, VERSION, models,
                 ", ".join(store.names()) or "none")
        import uvicorn

        uvicorn.run(OllamaApp(store, host, port), host=host, port=port, log_level="warning",
                    lifespan="on", timeout_keep_alive=5, timeout_graceful_shutdown=5)
        return 0
    base = _client_url(environ)
    try:
        if command == "list":
            _, out = _call(f"{base}/api/tags")
            print("NAME\tID\tSIZE\tMODIFIED")
            for model in json.loads(out)["models"]:
                print(f"{model['name']}\t{model['digest'][:12]}\t{model['size']}\t{model['modified_at']}")
            return 0
        if command == "show" and len(argv) == 2:
            _call(f"{base}/api/show", "POST", {"model": argv[1]})
            print(f"  Model\n    architecture    llama\n  (lab stand-in: {argv[1]})")
            return 0
        if command == "create" and len(argv) == 4 and argv[2] == "-f":
            return cli_create(argv[1], Path(argv[3]), environ)
    except Exception as error:  # noqa: BLE001 - the server's answer, as Ollama's CLI prints it
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print("Usage: ollama serve | list | show MODEL | create MODEL -f Modelfile "
          f"(the gpu-fleet lab stand-in for Ollama {OLLAMA_VERSION})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
