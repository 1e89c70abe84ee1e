"""vLLM's OpenAI-compatible API shapes (standard library only; jinja2 for chat templates).

    validate_completion(body, served_names, default_model) -> Request
    validate_chat(body, ...)                               -> Request
    error_body(...), completion_response(...), chunk builders, sse(obj), SSE_DONE
    TextStream(stops): stop strings and incremental text for streaming
    render_chat_template(template, messages, ...)           -> prompt text
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

MAX_N = 16
MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
SSE_DONE = b"data: [DONE]\n\n"


class APIError(Exception):
    """An error answer: HTTP status, OpenAI error type, message, offending parameter."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict:
        return error_body(self.message, self.err_type, self.status, self.param)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict:
    """vLLM 0.11's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


UNAUTHORIZED = {"error": "Unauthorized"}  # what vLLM's API-key middleware answers, with 401


@dataclass
class Sampling:
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0           # 0 (or vLLM's -1): no top-k
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None   # None: none; k: the chosen token's and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class Request:
    kind: str                          # "completion" or "chat"
    model: str
    sampling: Sampling
    prompts: list = field(default_factory=list)          # completion: str or list[int] each
    messages: list[dict] = field(default_factory=list)   # chat: {"role", "content": str}
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    add_generation_prompt: bool = True
    chat_template_kwargs: dict = field(default_factory=dict)


# --- Validation ------------------------------------------------------------------------------


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "BadRequestError", param)


def _number(body: dict, name: str, default, kind=float, minimum=None, maximum=None,
            exclusive_minimum=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not (isinstance(value, int) or float(value).is_integer())):
        raise _bad(f"{name}: expected {'an integer' if kind is int else 'a number'}, "
                   f"got {json.dumps(value)}", name)
    value = kind(value)
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise _bad(f"{name} must be {'greater than' if exclusive_minimum else 'at least'} "
                   f"{minimum}, got {value}.", name)
    if maximum is not None and value > maximum:
        raise _bad(f"{name} must be at most {maximum}, got {value}.", name)
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{name}: expected a boolean, got {json.dumps(value)}", name)
    return value


def _model(body: dict, served_names: list[str]) -> str:
    """The requested model: absent means the first served name (vLLM); another name is 404."""
    model = body.get("model")
    if model is None or model == "":
        return served_names[0]
    if not isinstance(model, str):
        raise _bad("model: expected a string", "model")
    if model not in served_names:
        raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return model


def _sampling(body: dict, default_max_tokens: int | None, max_tokens_names: tuple[str, ...]) -> Sampling:
    s = Sampling()
    s.max_tokens = default_max_tokens
    for name in max_tokens_names:
        if body.get(name) is not None:
            s.max_tokens = _number(body, name, None, int, minimum=1)
            break
    s.temperature = _number(body, "temperature", 1.0, float, minimum=0.0)
    s.top_p = _number(body, "top_p", 1.0, float, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    top_k = _number(body, "top_k", 0, int, minimum=-1)
    s.top_k = 0 if top_k in (-1, 0) else top_k
    s.seed = _number(body, "seed", None, int)
    s.n = _number(body, "n", 1, int, minimum=1, maximum=MAX_N)
    stop = body.get("stop")
    if stop is None:
        s.stop = []
    elif isinstance(stop, str):
        s.stop = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        s.stop = [x for x in stop if x]
    else:
        raise _bad("stop: expected a string or a list of strings", "stop")
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                for i in ids):
            raise _bad("stop_token_ids: expected a list of integers", "stop_token_ids")
        s.stop_token_ids = list(ids)
    s.ignore_eos = _bool(body, "ignore_eos")
    s.include_stop_str_in_output = _bool(body, "include_stop_str_in_output")
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, 0.0, float, minimum=-2.0, maximum=2.0)
    _number(body, "repetition_penalty", 1.0, float, minimum=0.0, exclusive_minimum=True)
    return s


def _stream_options(body: dict, request: Request) -> None:
    request.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return
    if not request.stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    if not isinstance(options, dict):
        raise _bad("stream_options: expected an object", "stream_options")
    request.include_usage = bool(options.get("include_usage"))
    request.continuous_usage = bool(options.get("continuous_usage_stats"))


def _is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and \
        all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def validate_completion(body: object, served_names: list[str]) -> Request:
    """POST /v1/completions body -> Request; APIError (400, or 404 for another model)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _model(body, served_names)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif _is_token_list(prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p)
                                                     for p in prompt):
        prompts = [p if isinstance(p, str) else list(p) for p in prompt]
    else:
        raise _bad("prompt: expected a string, a list of strings, a list of token ids or a "
                   "list of lists of token ids", "prompt")
    sampling = _sampling(body, 16, ("max_tokens",))
    logprobs = body.get("logprobs")
    if logprobs is not None:
        sampling.logprobs = _number(body, "logprobs", None, int, minimum=0, maximum=MAX_LOGPROBS)
    request = Request("completion", model, sampling, prompts=prompts)
    request.echo = _bool(body, "echo")
    if body.get("suffix"):
        raise _bad("suffix is not currently supported", "suffix")
    _stream_options(body, request)
    return request


def message_text(content, index: int) -> str:
    """A message's content as text: a string, or the text parts of a list joined by newlines
    (vLLM's "string" content format); other parts (images, audio) are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text") \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{index}].content: part type {kind!r} is not supported by "
                           "this text-only model", "messages")
        return "\n".join(texts)
    raise _bad(f"messages[{index}].content: expected a string or a list of parts", "messages")


def validate_chat(body: object, served_names: list[str]) -> Request:
    """POST /v1/chat/completions body -> Request; APIError (400, or 404 for another model).
    max_tokens left None means "up to the context length" (vLLM's default for chat)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _model(body, served_names)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: expected a non-empty list of messages", "messages")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{index}]: expected an object with a role among "
                       f"{', '.join(CHAT_ROLES)}", "messages")
        clean.append({**message, "content": message_text(message.get("content"), index)})
    sampling = _sampling(body, None, ("max_completion_tokens", "max_tokens"))
    if _bool(body, "logprobs"):
        sampling.logprobs = _number(body, "top_logprobs", 0, int, minimum=0, maximum=MAX_LOGPROBS)
    elif body.get("top_logprobs"):
        raise _bad("top_logprobs requires logprobs to be true", "top_logprobs")
    request = Request("chat", model, sampling, messages=clean)
    request.add_generation_prompt = _bool(body, "add_generation_prompt", True)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs: expected an object", "chat_template_kwargs")
    request.chat_template_kwargs = kwargs or {}
    if body.get("tools"):
        raise _bad("tools are not supported by the lab CPU engine", "tools")
    _stream_options(body, request)
    return request


def check_length(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """The number of tokens a request may generate; APIError when it cannot fit (vLLM's
    messages)."""
    if prompt_len >= max_model_len:
        raise _bad(f"This model's maximum context length is {max_model_len} tokens. However, "
                   f"your request has {prompt_len} input tokens. Please reduce the length of the "
                   "input messages.", "messages")
    if max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise _bad(f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                   f"model's maximum context length is {max_model_len} tokens and your request "
                   f"has {prompt_len} input tokens ({max_tokens} > {max_model_len} - "
                   f"{prompt_len}).", "max_tokens")
    return max_tokens


# --- Responses -------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      stop_reason=None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason, "prompt_logprobs": None}


def chat_choice(index: int, role: str, text: str, finish_reason: str | None, stop_reason=None,
                logprobs: dict | None = None) -> dict:
    return {"index": index,
            "message": {"role": role, "content": text, "refusal": None, "annotations": None,
                        "audio": None, "function_call": None, "tool_calls": [],
                        "reasoning_content": None},
            "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}


def response(kind: str, rid: str, created: int, model: str, choices: list[dict],
             use: dict) -> dict:
    body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": choices,
            "service_tier": None, "system_fingerprint": None, "usage": use,
            "prompt_logprobs": None, "kv_transfer_params": None}
    return body


def chunk(kind: str, rid: str, created: int, model: str, choices: list[dict],
          use: dict | None = None, with_usage: bool = False) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": choices}
    if with_usage or use is not None:
        body["usage"] = use
    return body


def stream_choice(kind: str, index: int, delta_text: str | None, finish_reason: str | None = None,
                  stop_reason=None, role: str | None = None, logprobs: dict | None = None) -> dict:
    if kind == "chat":
        delta: dict = {}
        if role is not None:
            delta["role"] = role
        if delta_text is not None:
            delta["content"] = delta_text
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return choice
    return {"index": index, "text": delta_text or "", "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def sse(obj: dict) -> bytes:
    """One server-sent event: `data: <compact JSON>` and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() \
        + b"\n\n"


def parse_sse(raw: bytes) -> list:
    """The events of an SSE body (for tests and clients): JSON objects, and "[DONE]"."""
    events = []
    for block in raw.decode().split("\n\n"):
        block = block.strip()
        if not block:
            continue
        if not block.startswith("data: "):
            raise ValueError(f"not an SSE data event: {block[:80]!r}")
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def models_list(served_names: list[str], root: str, max_model_len: int, created: int) -> dict:
    data = []
    for name in served_names:
        data.append({
            "id": name, "object": "model", "created": created, "owned_by": "vllm",
            "root": root, "parent": None, "max_model_len": max_model_len,
            "permission": [{
                "id": "modelperm-" + uuid.uuid4().hex, "object": "model_permission",
                "created": created, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None,
                "is_blocking": False,
            }],
        })
    return {"object": "list", "data": data}


def now() -> int:
    return int(time.time())


# --- Stop strings and incremental text -------------------------------------------------------


class TextStream:
    """Text of a growing generation, with stop strings: feed the whole decoded text after each
    token; get back the part that is safe to send and whether a stop string ended it.

    Streaming holds back the last len(longest stop) - 1 characters (a stop string may be
    arriving) and a trailing U+FFFD (an incomplete UTF-8 character, as bytes arrive one token
    at a time)."""

    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = ""
        self.final: str | None = None
        self.stop_reason: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """(new text safe to send, stopped by a stop string)."""
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            position, stop = min(hits)
            self.final = text[:position + (len(stop) if self.include_stop else 0)]
            self.stop_reason = stop
            return self._advance(self.final), True
        safe = text[:len(text) - self.hold] if self.hold else text
        while safe.endswith("\ufffd"):
            safe = safe[:-1]
        return self._advance(safe), False

    def finish(self, text: str) -> str:
        """The rest, at the end of the generation (length, EOS, a stop token)."""
        if self.final is None:
            self.final = text
        return self._advance(self.final)

    def _advance(self, target: str) -> str:
        if not target.startswith(self.sent) or len(target) <= len(self.sent):
            return ""
        delta = target[len(self.sent):]
        self.sent = target
        return delta


# --- Chat template ---------------------------------------------------------------------------


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         bos_token: str | None = None, eos_token: str | None = None,
                         **kwargs) -> str:
    """The prompt text of a chat, rendered as transformers does: jinja2's immutable sandbox,
    trim_blocks and lstrip_blocks, `raise_exception` and a `tojson` that keeps non-ASCII."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)
    except TemplateError as error:
        raise _bad(f"chat template: {error}", "messages") from None
