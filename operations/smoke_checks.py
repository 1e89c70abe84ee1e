"""The smoke tests' HTTP checks and their data: one endpoint (`Target`) in, `CheckResult`s out.
operations/smoke.py finds the targets and reports; scripts/smoke.py and scripts/loadtest.py use
the same checks.

An engine task is reached through the gateway, pinned to it by name (X-Gpufleet-Pin, the
operator's key only): engine ports admit only the gateway nodes (operations/engine_ports.py), and
only the gateway holds the engines' internal key. The "auth" check of an engine task is the
reverse: a request straight to its port, without a key, must be refused (connection refused by
the engine firewall, or 401 from the engine's own key), never served.

TLS: with stack_gateway_tls_cert_file set, the gateway is https://; its certificate is verified
against stack_gateway_ca_file (or the system's CAs) and, when stack_gateway_tls_server_name is
set, for that name (sent as SNI) rather than the node address dialled. Never unverified.
"""

from __future__ import annotations

import functools
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from operations import engines

HEALTH_REQUEST_TIMEOUT_S = 10.0
# A completion on a cold engine (first request after load) may take a while.
COMPLETION_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 15.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0
# A hard cap on attempts, whatever the deadline: the health loop is bounded twice.
HEALTH_MAX_ATTEMPTS = 400
COMPLETION_PROMPT = "Say hello in three words."
COMPLETION_MAX_TOKENS = 8

PASS, FAIL, NA, SKIPPED = "pass", "FAIL", "n/a", "skipped"


# --- Data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One endpoint to check: the gateway on one address, or one engine task."""

    name: str  # "gateway@node-1", "engine tiny-llama@node-2"
    url: str  # base URL, no trailing slash
    kind: str  # "gateway" | "engine"
    node: str  # the Swarm node's hostname
    host: str  # the inventory host it runs on (node label gpufleet.host, else the hostname)
    service: str
    models: tuple[str, ...]  # the served names requests name here
    engine: str = "vllm"  # "vllm" | "tgi" | "ollama" | "gateway"
    # What /v1/models lists here, exactly, when it differs from `models`: TGI lists its
    # --model-id, Ollama `name:tag` (operations/engines.listed_model_ids).
    listed: tuple[str, ...] = ()
    # Sent with every request here (an engine task: the pin header naming it).
    headers: tuple[tuple[str, str], ...] = ()
    # An engine task's own port, which must refuse a request without a key ("auth").
    direct_url: str = ""
    # The name the gateway's certificate is verified for (SNI), when not the address dialled.
    server_name: str | None = None
    # An engine target's Swarm task and the state the manager last reported for it: a failed
    # health check on a task still "starting" says so (Swarm's replacement for a task that
    # stopped may land on another node, and that is the one then named).
    task: str = ""
    task_state: str = ""

    def request_headers(self, key: str | None) -> dict[str, str]:
        return {**dict(self.headers), **({"Authorization": f"Bearer {key}"} if key else {})}

    @property
    def extensions(self) -> dict[str, str]:
        return {"sni_hostname": self.server_name} if self.server_name else {}

    @property
    def auth_probe(self) -> tuple[str, str]:
        """A request refused without the key here (TGI's /v1/models is open; Ollama has no key
        of its own: its /v1/models answers whoever reaches the port)."""
        if self.engine == "gateway":
            return ("GET", "/v1/models")
        return engines.auth_probe(self.engine) or ("GET", "/v1/models")


@dataclass
class CheckResult:
    endpoint: str
    url: str
    check: str  # "health", "models", "completion <model>", "auth", "tasks"
    result: str  # pass | FAIL | n/a | skipped
    detail: str = ""
    latency_ms: float | None = None

    @property
    def failed(self) -> bool:
        return self.result == FAIL

    def failure_line(self) -> str:
        where = f"{self.endpoint} ({self.url})" if self.url else self.endpoint
        return f"{where}: {self.check} failed: {self.detail}"


@dataclass
class SmokeReport:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(result.failed for result in self.results)

    def failures(self) -> list[str]:
        return [result.failure_line() for result in self.results if result.failed]


# --- Checks ---------------------------------------------------------------------------------


def read_api_key(path: str | None) -> str | None:
    """The API key, stripped, from the control machine's file; None when no file is set."""
    if path is None:
        return None
    return Path(path).expanduser().read_text(encoding="utf-8").strip()


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000.0, 1)


def _why(error: Exception) -> str:
    """An exception in a few words (httpx messages name the URL, never a header)."""
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:200]


def check_health(client: httpx.Client, target: Target, deadline_s: float,
                 sleep: Callable[[float], None] = time.sleep, key: str | None = None) -> CheckResult:
    """GET /health (Ollama: /api/version) until it answers 200 or the deadline passes, with a
    doubling pause (0.5 s up to 5 s) between attempts: a model may still be loading."""
    path = engines.health_path(target.engine)
    end = time.monotonic() + deadline_s
    pause, last = BACKOFF_FIRST_S, "no attempt"
    for attempt in range(1, HEALTH_MAX_ATTEMPTS + 1):
        start = time.monotonic()
        timeout = max(0.5, min(HEALTH_REQUEST_TIMEOUT_S, end - start))
        try:
            response = client.get(target.url + path, timeout=timeout,
                                  headers=target.request_headers(key), extensions=target.extensions)
            if response.status_code == 200:
                return CheckResult(target.name, target.url, "health", PASS,
                                   f"200 after {attempt} attempt(s)", _ms(start))
            if response.status_code in (401, 403):  # the key is refused: waiting changes nothing
                return CheckResult(target.name, target.url, "health", FAIL,
                                   f"HTTP {response.status_code} from {path} (the key is refused)",
                                   _ms(start))
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = _why(error)
        latency = _ms(start)
        if time.monotonic() + pause > end:
            break
        sleep(pause)
        pause = min(pause * 2, BACKOFF_MAX_S)
    return CheckResult(target.name, target.url, "health", FAIL,
                       f"no 200 from {path} within {deadline_s:g}s after {attempt} attempt(s) "
                       f"(last: {last}){_task_not_running(target)}", latency)


def _task_not_running(target: Target) -> str:
    """What a failed health check adds when the stack listed the task as not running yet."""
    if target.task and target.task_state and target.task_state != "running":
        return f"; task {target.task} was {target.task_state}"
    return ""


def check_models(client: httpx.Client, target: Target, key: str | None) -> CheckResult:
    """/v1/models lists exactly the served names the configuration promises here."""
    start = time.monotonic()
    try:
        response = client.get(target.url + "/v1/models", headers=target.request_headers(key),
                              timeout=REQUEST_TIMEOUT_S, extensions=target.extensions)
    except httpx.HTTPError as error:
        return CheckResult(target.name, target.url, "models", FAIL, _why(error), _ms(start))
    latency = _ms(start)
    if response.status_code != 200:
        return CheckResult(target.name, target.url, "models", FAIL,
                           f"HTTP {response.status_code} (expected 200)", latency)
    try:
        listed = sorted({item["id"] for item in response.json()["data"]})
    except (ValueError, KeyError, TypeError):
        return CheckResult(target.name, target.url, "models", FAIL,
                           "not an OpenAI model list", latency)
    wanted = sorted(set(target.listed or target.models))
    if listed != wanted:
        extra = sorted(set(listed) - set(wanted))
        missing = sorted(set(wanted) - set(listed))
        words = []
        if missing:
            words.append(f"missing {', '.join(missing)}")
        if extra:
            words.append(f"unexpected {', '.join(extra)}")
        return CheckResult(target.name, target.url, "models", FAIL,
                           f"{'; '.join(words)} (listed: {', '.join(listed) or 'none'})", latency)
    return CheckResult(target.name, target.url, "models", PASS, ", ".join(listed), latency)


def completion_tokens(body: dict[str, Any]) -> int:
    """Tokens in a chat completion: usage.completion_tokens, else 1 when it has content."""
    usage = body.get("usage") or {}
    if isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    choices = body.get("choices") or [{}]
    message = choices[0].get("message") or {}
    return 1 if (message.get("content") or choices[0].get("text")) else 0


def check_completion(client: httpx.Client, target: Target, key: str | None,
                     model: str) -> CheckResult:
    """One short chat completion of `model` returns at least one token."""
    check = f"completion {model}"
    body = {"model": model, "messages": [{"role": "user", "content": COMPLETION_PROMPT}],
            "max_tokens": COMPLETION_MAX_TOKENS, "temperature": 0}
    start = time.monotonic()
    try:
        response = client.post(target.url + "/v1/chat/completions", json=body,
                               headers=target.request_headers(key), timeout=COMPLETION_TIMEOUT_S,
                               extensions=target.extensions)
    except httpx.HTTPError as error:
        return CheckResult(target.name, target.url, check, FAIL, _why(error), _ms(start))
    latency = _ms(start)
    if response.status_code != 200:
        return CheckResult(target.name, target.url, check, FAIL,
                           f"HTTP {response.status_code} (expected 200)", latency)
    try:
        tokens = completion_tokens(response.json())
    except (ValueError, AttributeError, IndexError, TypeError):
        return CheckResult(target.name, target.url, check, FAIL, "not a chat completion", latency)
    if tokens < 1:
        return CheckResult(target.name, target.url, check, FAIL, "no token returned", latency)
    return CheckResult(target.name, target.url, check, PASS, f"{tokens} token(s)", latency)


def check_auth(client: httpx.Client, target: Target) -> CheckResult:
    """Without a key, refused: the gateway answers 401 (/v1/models); an engine task's own port
    refuses the connection (engine firewall) or answers 401 (its internal key: vLLM's
    /v1/models, TGI's chat completions), and never serves (Ollama has no key: only the firewall
    keeps it from answering). An engine's result names its own port in the detail."""
    method, path = target.auth_probe
    url = target.direct_url or target.url
    where = f"{url}: " if target.direct_url else ""
    start = time.monotonic()

    def result(outcome: str, detail: str, latency: float | None = None) -> CheckResult:
        return CheckResult(target.name, target.url, "auth", outcome, where + detail,
                           _ms(start) if latency is None else latency)

    try:
        response = client.request(method, url + path, timeout=REQUEST_TIMEOUT_S,
                                  json={} if method == "POST" else None,
                                  extensions={} if target.direct_url else target.extensions)
    except httpx.ConnectError as error:
        if target.direct_url:
            return result(PASS, f"closed to this machine ({_why(error)[:60]})")
        return result(FAIL, _why(error))
    except httpx.HTTPError as error:
        return result(FAIL, _why(error))
    if response.status_code != 401:
        return result(FAIL, f"HTTP {response.status_code} from {method} {path} without a key "
                            "(expected 401, or the port closed to this machine)")
    return result(PASS, f"401 without a key ({path})")


def check_target(client: httpx.Client, target: Target, key: str | None, deadline_s: float,
                 sleep: Callable[[float], None] = time.sleep) -> list[CheckResult]:
    """Every check of one endpoint; after a failed health check the others are skipped."""
    health = check_health(client, target, deadline_s, sleep=sleep, key=key)
    later = ["models", *(f"completion {m}" for m in target.models), "auth"]
    if health.failed:
        return [health, *(CheckResult(target.name, target.url, check, SKIPPED, "health failed")
                          for check in later)]
    results = [health, check_models(client, target, key)]
    results += [check_completion(client, target, key, model) for model in target.models]
    results.append(check_auth(client, target))
    return results


@functools.lru_cache(maxsize=4)
def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """One verifying TLS context per CA file (None: httpx's default, certifi's bundle) for every
    host's checks: building one loads the bundle (~20 ms of CPU), which every host of a run would
    otherwise do again."""
    if ca_file:
        return ssl.create_default_context(cafile=str(Path(ca_file).expanduser()))
    return httpx.create_ssl_context()


def run_checks(targets: list[Target], key: str | None, deadline_s: float,
               client: httpx.Client | None = None, parallel: int = 8,
               ca_file: str | None = None) -> list[CheckResult]:
    """Check every target (in threads: a dead endpoint waits out its deadline alone); results
    in target order."""
    from concurrent.futures import ThreadPoolExecutor

    if not targets:
        return []
    own = client is None
    client = client or httpx.Client(follow_redirects=False, verify=tls_context(ca_file))
    try:
        if parallel <= 1 or len(targets) <= 1:
            return [r for t in targets for r in check_target(client, t, key, deadline_s)]
        with ThreadPoolExecutor(max_workers=min(parallel, len(targets))) as pool:
            done = list(pool.map(lambda t: check_target(client, t, key, deadline_s), targets))
        return [r for results in done for r in results]
    finally:
        if own:
            client.close()
