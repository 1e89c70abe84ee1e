"""The ASGI application: vLLM's routes, API-key check, generation loop and streaming, over an
engine object (standard library only: tests drive it with a fake engine, the image with the
numpy one in engine.py).

The engine object provides: model_path, max_model_len, vocab_size, eos_token_ids,
encode(text, add_special_tokens) -> ids, chat_prompt(messages, add_generation_prompt, **kw)
-> text, decode(ids) -> text, token_str(id) -> text, new_rng(seed), and
generate(prompt_ids, sampling, rng) -> an iterator of (token id, logprob, [(id, logprob)...])
whose every step (one forward pass) runs in a worker thread, so /health answers while a
generation runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from . import STAND_IN, VERSION, protocol
from .cli import ServeConfig
from .metrics import Metrics
from .protocol import APIError, Request, TextStream

log = logging.getLogger("labengine")
JSON = b"application/json"
MAX_BODY = 8 * 1024 * 1024


class Disconnected(Exception):
    """The client went away during a streamed answer."""


class EngineApp:
    def __init__(self, config: ServeConfig, engine, workers: int = 4,
                 hostname: str | None = None):
        self.config = config
        self.engine = engine
        self.ready = engine is not None
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="forward")
        self.in_flight: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hostname = hostname or socket.gethostname()
        self.metrics = Metrics(config.served_name, engine.max_model_len if engine else 256)
        self.created = protocol.now()
        key = config.api_key
        self._key_hash = hashlib.sha256(key.encode()).digest() if key else None

    # --- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.loop = asyncio.get_running_loop()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.executor.shutdown(wait=False, cancel_futures=True)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            status = await self._route(scope, receive, send, method, path)
        except Disconnected:
            status = 499
        handler = path if path in ("/health", "/version", "/metrics", "/v1/models",
                                   "/v1/completions", "/v1/chat/completions") else "none"
        key = (handler, method, f"{status // 100}xx")
        self.metrics.http[key] = self.metrics.http.get(key, 0) + 1

    def abort_in_flight(self, why: str) -> None:
        """vLLM 0.11 at SIGTERM: every request in flight is aborted (its connection closed
        mid-answer by the server), none finished. Safe from a signal handler."""
        if self.loop is None:
            return
        log.warning("LAB STAND-IN: %s: aborting %d request(s) in flight, as vLLM 0.11 does",
                    why, len(self.in_flight))
        for task in list(self.in_flight):
            self.loop.call_soon_threadsafe(task.cancel)

    def _headers(self, content_type: bytes | None, length: int | None = None) -> list:
        headers = [(b"x-lab-stand-in", STAND_IN.encode()),
                   (b"x-engine-task", self.hostname.encode())]
        if content_type:
            headers.append((b"content-type", content_type))
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        return headers

    async def _send(self, send, status: int, body: bytes = b"",
                    content_type: bytes | None = JSON) -> int:
        await send({"type": "http.response.start", "status": status,
                    "headers": self._headers(content_type if body or status != 200 else None,
                                             len(body))})
        await send({"type": "http.response.body", "body": body})
        return status

    async def _send_json(self, send, status: int, obj) -> int:
        return await self._send(send, status, json.dumps(obj, ensure_ascii=False).encode())

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        """vLLM's check: `Authorization: Bearer <key>` (scheme in any case), compared in
        constant time; no key configured means every request is allowed."""
        if self._key_hash is None:
            return True
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._key_hash)

    async def _route(self, scope, receive, send, method: str, path: str) -> int:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if path == "/health":
            if method != "GET":
                return await self._send_json(send, 405, {"detail": "Method Not Allowed"})
            return await self._send(send, 200 if self.ready else 503, b"", None)
        if path == "/ping" and method in ("GET", "POST"):
            return await self._send(send, 200 if self.ready else 503, b"", None)
        if path == "/version" and method == "GET":
            return await self._send_json(send, 200, {"version": VERSION, "lab_stand_in": STAND_IN})
        if path == "/metrics" and method == "GET":
            return await self._send(send, 200, self.metrics.render().encode(),
                                    b"text/plain; version=0.0.4; charset=utf-8")
        if method != "OPTIONS" and path.startswith("/v1") and not self.authorized(headers):
            return await self._send_json(send, 401, protocol.UNAUTHORIZED)
        routes = {"/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}
        if path not in routes:
            return await self._send_json(send, 404, {"detail": "Not Found"})
        if method != routes[path]:
            return await self._send_json(send, 405, {"detail": "Method Not Allowed"})
        if not self.ready:
            return await self._send_json(send, 503, protocol.error_body(
                "the model is still loading", "ServiceUnavailableError", 503))
        if path == "/v1/models":
            return await self._send_json(send, 200, protocol.models_list(
                self.config.served_model_names, self.config.model, self.engine.max_model_len,
                self.created))
        try:
            body = await self._read_body(receive)
            try:
                parsed = json.loads(body) if body else None
            except ValueError as error:
                raise APIError(400, f"the request body is not valid JSON: {error}") from None
            if path == "/v1/completions":
                request = protocol.validate_completion(parsed, self.config.served_model_names)
            else:
                request = protocol.validate_chat(parsed, self.config.served_model_names)
            prompts = self._prompts(request)
        except APIError as error:
            return await self._send_json(send, error.status, error.body())
        return await self._serve(request, prompts, receive, send)

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                raise APIError(413, "request body too large")
            if not message.get("more_body"):
                return b"".join(chunks)

    # --- Generation ------------------------------------------------------------------------

    def _prompts(self, request: Request) -> list[tuple[list[int], str | None, int]]:
        """[(prompt token ids, prompt text or None, tokens it may generate)]; APIError when a
        prompt does not fit the context or names tokens the model does not have."""
        engine = self.engine
        if request.kind == "chat":
            text = engine.chat_prompt(request.messages, request.add_generation_prompt,
                                      **request.chat_template_kwargs)
            prompts = [(engine.encode(text, False), text)]
        else:
            prompts = []
            for prompt in request.prompts:
                if isinstance(prompt, str):
                    prompts.append((engine.encode(prompt, True), prompt))
                else:
                    bad = [i for i in prompt if not 0 <= i < engine.vocab_size]
                    if bad:
                        raise APIError(400, f"token id {bad[0]} is out of vocabulary (size "
                                            f"{engine.vocab_size})", param="prompt")
                    prompts.append((list(prompt), None))
        return [(ids, text, protocol.check_length(len(ids), request.sampling.max_tokens,
                                                  engine.max_model_len))
                for ids, text in prompts]

    def response_model(self, request: Request) -> str:
        """The "model" an answer carries: vLLM's served name."""
        return self.config.served_name

    async def _serve(self, request: Request, prompts, receive, send) -> int:
        kind, model = request.kind, self.response_model(request)
        rid, created = protocol.new_id(kind), protocol.now()
        gone = asyncio.Event()
        rng = self.engine.new_rng(request.sampling.seed)
        prompt_tokens = sum(len(ids) for ids, _, _ in prompts)
        self.metrics.running += 1
        self.metrics.prompt_tokens += prompt_tokens * request.sampling.n
        task = asyncio.current_task()
        self.in_flight.add(task)

        async def watch():
            while True:
                if (await receive())["type"] == "http.disconnect":
                    gone.set()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            if not request.stream:
                results = []
                for p, (ids, text, limit) in enumerate(prompts):
                    for i in range(request.sampling.n):
                        results.append(await self._generate(ids, request, limit, rng, gone))
                return await self._send_json(send, 200, self._final(
                    request, rid, created, model, prompts, results))
            return await self._stream(request, rid, created, model, prompts, rng, gone, send)
        except Disconnected:
            return 499
        except Exception as error:  # a bug or an engine failure: answer, log, keep serving
            log.exception("request %s failed", rid)
            body = protocol.error_body(f"internal error: {type(error).__name__}: {error}",
                                       "InternalServerError", 500)
            if not request.stream:
                return await self._send_json(send, 500, body)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": protocol.sse(body)
                            + protocol.SSE_DONE, "more_body": False})
            return 500
        finally:
            self.metrics.running -= 1
            self.in_flight.discard(task)
            watcher.cancel()

    async def _generate(self, prompt_ids, request: Request, limit: int, rng, gone,
                        emit=None) -> dict:
        """One choice: steps the engine until EOS, a stop token, a stop string or `limit`
        tokens. `emit(delta_text)` (streaming) gets text as it becomes safe to send."""
        sampling = request.sampling
        loop = asyncio.get_running_loop()
        steps = self.engine.generate(prompt_ids, sampling, rng)
        stream = TextStream(sampling.stop, sampling.include_stop_str_in_output)
        text_ids: list[int] = []
        logprobs: list[tuple[int, float, list]] = []
        finish, stop_reason, count = "length", None, 0
        eos = set() if sampling.ignore_eos else set(self.engine.eos_token_ids)
        started = last = time.monotonic()
        try:
            while count < limit:
                if gone.is_set():
                    raise Disconnected()
                token, logprob, top = await loop.run_in_executor(self.executor, next, steps)
                now = time.monotonic()
                self.metrics.token(now - last, first=count == 0)
                last = now
                count += 1
                self.metrics.generation_tokens += 1
                if sampling.logprobs is not None:
                    logprobs.append((token, logprob, top))
                if token in sampling.stop_token_ids:
                    finish, stop_reason = "stop", token
                    break
                if token in eos:
                    finish = "stop"
                    break
                text_ids.append(token)
                delta, stopped = stream.feed(self.engine.decode(text_ids))
                if delta and emit:
                    await emit(delta, count)
                if stopped:
                    finish, stop_reason = "stop", stream.stop_reason
                    break
        finally:
            close = getattr(steps, "close", None)
            if close:
                close()
        rest = stream.finish(self.engine.decode(text_ids))
        self.metrics.finished(finish, time.monotonic() - started, len(prompt_ids), count)
        return {"text": stream.final, "rest": rest, "finish_reason": finish,
                "stop_reason": stop_reason, "tokens": count, "logprobs": logprobs}

    def _logprobs(self, kind: str, entries: list, k: int) -> dict | None:
        token_str = self.engine.token_str
        if kind == "chat":
            def item(token, lp):
                text = token_str(token)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}
            return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top[:k]]}
                                for t, lp, top in entries], "refusal": None}
        tokens, offsets, offset = [], [], 0
        for t, _, _ in entries:
            tokens.append(token_str(t))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"text_offset": offsets, "token_logprobs": [lp for _, lp, _ in entries],
                "tokens": tokens,
                "top_logprobs": [{token_str(i): v for i, v in top[:k]} for _, _, top in entries]}

    def _final(self, request: Request, rid, created, model, prompts, results) -> dict:
        choices, n = [], request.sampling.n
        for index, result in enumerate(results):
            text = result["text"]
            lp = None if request.sampling.logprobs is None else \
                self._logprobs(request.kind, result["logprobs"], request.sampling.logprobs)
            if request.kind == "chat":
                choices.append(protocol.chat_choice(index, self.config.response_role, text,
                                                    result["finish_reason"],
                                                    result["stop_reason"], lp))
            else:
                if request.echo:
                    ids, prompt_text, _ = prompts[index // n]
                    text = (prompt_text if prompt_text is not None
                            else self.engine.decode(ids)) + text
                choices.append(protocol.completion_choice(index, text, result["finish_reason"],
                                                          result["stop_reason"], lp))
        prompt_tokens = sum(len(ids) for ids, _, _ in prompts)
        use = protocol.usage(prompt_tokens, sum(r["tokens"] for r in results))
        return protocol.response(request.kind, rid, created, model, choices, use)

    async def _stream(self, request: Request, rid, created, model, prompts, rng, gone,
                      send) -> int:
        kind, n = request.kind, request.sampling.n
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._headers(b"text/event-stream; charset=utf-8")
                    + [(b"cache-control", b"no-cache")]})
        with_usage = request.include_usage

        async def event(obj: dict) -> None:
            if gone.is_set():
                raise Disconnected()
            await send({"type": "http.response.body", "body": protocol.sse(obj),
                        "more_body": True})

        prompt_total = sum(len(ids) for ids, _, _ in prompts)
        generated = 0
        for p, (ids, prompt_text, limit) in enumerate(prompts):
            for i in range(n):
                index = p * n + i
                base = generated

                def running_usage(count):
                    if not request.continuous_usage:
                        return None
                    return protocol.usage(len(ids), count)

                if kind == "chat":
                    await event(protocol.chunk(kind, rid, created, model, [protocol.stream_choice(
                        kind, index, "", role=self.config.response_role)],
                        running_usage(0), with_usage))
                elif request.echo:
                    text = prompt_text if prompt_text is not None else self.engine.decode(ids)
                    await event(protocol.chunk(kind, rid, created, model, [
                        protocol.stream_choice(kind, index, text)], running_usage(0), with_usage))

                async def emit(delta: str, count: int, index=index) -> None:
                    await event(protocol.chunk(kind, rid, created, model, [
                        protocol.stream_choice(kind, index, delta)], running_usage(count),
                        with_usage))

                result = await self._generate(ids, request, limit, rng, gone, emit)
                generated = base + result["tokens"]
                await event(protocol.chunk(kind, rid, created, model, [protocol.stream_choice(
                    kind, index, result["rest"], result["finish_reason"], result["stop_reason"])],
                    running_usage(result["tokens"]), with_usage))
        if with_usage:
            await event(protocol.chunk(kind, rid, created, model, [],
                                       protocol.usage(prompt_total, generated), True))
        await send({"type": "http.response.body", "body": protocol.SSE_DONE, "more_body": False})
        return 200
