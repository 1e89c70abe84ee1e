"""A tiny OpenAI-style server on 127.0.0.1 for unit tests: /health, /v1/models and
/v1/chat/completions (plain, or streamed as SSE with usage in the last chunk), Bearer key.

    with FakeOpenAI(models=["tiny-llama"], key="sk-x") as server:
        httpx.get(server.url + "/health")
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, models=("tiny-llama",), key="sk-test", tokens=4, token_delay_s=0.0,
                 fail_every=0, cut_streams=False, dead_pins=(), error_streams=False):
        self.models, self.key, self.tokens = list(models), key, tokens
        self.token_delay_s, self.fail_every = token_delay_s, fail_every
        self.cut_streams = cut_streams  # streams end cleanly but before `data: [DONE]`
        # Streams end with vLLM's error event, then [DONE] (a request aborted after its 200).
        self.error_streams = error_streams
        self.requests = 0
        # Pinned engine tasks that are down: a gateway answers 503 for them, as HAProxy does.
        self.dead_pins = set(dead_pins)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body=None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self):
                return self.headers.get("Authorization") == f"Bearer {fake.key}"

            def _dead_pin(self):
                return self.headers.get("X-Gpufleet-Pin") in fake.dead_pins

            def do_GET(self):
                if self._dead_pin():
                    return self._send(503, {"error": "no server is available"})
                if self.path == "/health":
                    return self._send(200)
                if not self._authorised():
                    return self._send(401, {"error": "unauthorised"})
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list",
                                            "data": [{"id": m} for m in fake.models]})
                return self._send(404)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self._dead_pin():
                    return self._send(503, {"error": "no server is available"})
                if not self._authorised():
                    return self._send(401, {"error": "unauthorised"})
                if self.path != "/v1/chat/completions" or body.get("model") not in fake.models:
                    return self._send(404)
                with fake._lock:
                    fake.requests += 1
                    failing = fake.fail_every and fake.requests % fake.fail_every == 0
                if failing:
                    return self._send(503, {"error": "overloaded"})
                if not body.get("stream"):
                    time.sleep(fake.token_delay_s * fake.tokens)
                    return self._send(200, {
                        "choices": [{"message": {"content": "hi " * fake.tokens}}],
                        "usage": {"completion_tokens": fake.tokens}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(fake.tokens):
                    time.sleep(fake.token_delay_s)
                    chunk = {"choices": [{"delta": {"content": "hi "}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                if fake.cut_streams:  # an engine that went away mid-stream
                    self.close_connection = True
                    return
                if fake.error_streams:
                    error = {"error": {"object": "error", "message": "engine shut down",
                                       "type": "InternalServerError", "code": 500}}
                    self.wfile.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                    self.wfile.flush()
                    self.close_connection = True
                    return
                usage = {"choices": [], "usage": {"completion_tokens": fake.tokens}}
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()
                self.close_connection = True

        return Handler
