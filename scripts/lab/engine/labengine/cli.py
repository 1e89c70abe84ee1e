"""The command line, as vLLM's image runs it: `vllm serve MODEL [flags]` (standard library only).

Honoured: MODEL (or --model), --served-model-name NAME..., --host, --port, --api-key (or the
environment variable VLLM_API_KEY), --max-model-len, --tokenizer, --chat-template,
--response-role, --uvicorn-log-level. vLLM 0.11.0's other flags (vllm_flags.py, extracted from
its sources) are accepted and ignored, one log line each. Any other flag is refused as vLLM's
argparse refuses it ("vllm serve: error: unrecognized arguments: ...", exit 2), so a flag vLLM
does not have fails in the lab. Flags may be written --flag value, --flag=value, or with
underscores (--max_model_len), as vLLM allows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import VERSION
from .vllm_flags import BOOL_FLAGS, VALUE_FLAGS

USAGE = "usage: vllm serve MODEL [--served-model-name NAME] [--host HOST] [--port PORT] " \
        "[--api-key KEY | env VLLM_API_KEY] [--max-model-len N] [vLLM's other flags, ignored]"

# name -> (attribute, kind): "value" takes one word, "multi" one or more, "flag" none.
HONOURED = {
    "--model": ("model", "value"),
    "--served-model-name": ("served_model_names", "multi"),
    "--host": ("host", "value"),
    "--port": ("port", "value"),
    "--api-key": ("api_key", "value"),
    "--max-model-len": ("max_model_len", "value"),
    "--tokenizer": ("tokenizer", "value"),
    "--chat-template": ("chat_template", "value"),
    "--response-role": ("response_role", "value"),
    "--uvicorn-log-level": ("uvicorn_log_level", "value"),
}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class UsageError(Exception):
    """The command line cannot be served; the message says why (exit status 2)."""


@dataclass
class ServeConfig:
    model: str = ""
    served_model_names: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    api_key_source: str = ""  # "--api-key", "VLLM_API_KEY" or "" (none: no auth, as vLLM)
    max_model_len: int | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    response_role: str = "assistant"
    uvicorn_log_level: str = "info"
    ignored: list[str] = field(default_factory=list)   # "--flag value" as given, for the log

    @property
    def served_name(self) -> str:
        """The first served name: what responses carry as "model"."""
        return self.served_model_names[0]

    def log_lines(self) -> list[tuple[str, str]]:
        """(level, message) to log at startup; never the API key itself."""
        lines = [("info", f"serving {self.model!r} as {', '.join(self.served_model_names)} on "
                          f"{self.host}:{self.port}; API key: "
                          f"{'required (' + self.api_key_source + ')' if self.api_key else 'none'}")]
        for flag in self.ignored:
            lines.append(("info", f"ignoring {flag}: a GPU-only or vLLM scheduler setting, "
                                  "meaningless for the lab CPU engine"))
        return lines


def parse_int(name: str, text: str, minimum: int = 1) -> int:
    """An integer flag value; vLLM's human-readable forms 8k (x1000) and 8K (x1024) too."""
    multiplier = 1
    if text[-1:] in ("k", "m", "K", "M"):
        multiplier = {"k": 1000, "m": 1000 ** 2, "K": 1024, "M": 1024 ** 2}[text[-1]]
        text = text[:-1]
    try:
        value = int(float(text) * multiplier) if multiplier != 1 else int(text)
    except ValueError:
        raise UsageError(f"argument {name}: invalid int value: {text!r}") from None
    if value < minimum:
        raise UsageError(f"argument {name}: must be at least {minimum}, got {value}")
    return value


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    """Words -> (word, value given with '=' or None); flag names normalised (_ -> -)."""
    out = []
    for word in argv:
        if word.startswith("-") and len(word) > 1 and not _is_number(word):
            name, eq, value = word.partition("=")
            if name.startswith("--"):
                name = "--" + name[2:].replace("_", "-")
            out.append((name, value if eq else None))
        else:
            out.append((word, None))
    return out


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _is_flag(word: str) -> bool:
    return word.startswith("-") and len(word) > 1 and not _is_number(word)


def parse_serve(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    """The arguments after `vllm serve` (and the environment) -> ServeConfig; UsageError when
    they cannot be served."""
    environ = os.environ if environ is None else environ
    config = ServeConfig()
    given: dict[str, object] = {}
    words = _split(argv)
    unrecognized: list[str] = []
    i = 0
    while i < len(words):
        word, inline = words[i]
        i += 1
        if not _is_flag(word):
            if "model" in given:
                unrecognized.append(word)
            else:
                given["model"] = word
            continue
        if word in ("-h", "--help"):
            raise UsageError(USAGE)
        if word in HONOURED:
            attribute, kind = HONOURED[word]
            values = [] if inline is None else [inline]
            if inline is None:
                while i < len(words) and not _is_flag(words[i][0]):
                    values.append(words[i][0])
                    i += 1
                    if kind == "value":
                        break
            if not values:
                raise UsageError(f"argument {word}: expected a value")
            given[attribute] = values if kind == "multi" else values[0]
        elif word in BOOL_FLAGS:
            config.ignored.append(word if inline is None else f"{word}={inline}")
        elif word in VALUE_FLAGS:
            value = inline
            if value is None and i < len(words) and not _is_flag(words[i][0]):
                value = words[i][0]
                i += 1
            config.ignored.append(word if value is None else f"{word} {value}")
        else:
            unrecognized.append(word if inline is None else f"{word}={inline}")

    if given.get("model") == "vllm" and argv[1:2] == ["serve"]:
        raise UsageError("`vllm serve vllm serve ...`: this image's ENTRYPOINT is already "
                         "[\"vllm\", \"serve\"], as vllm/vllm-openai's is; give the container "
                         "only the model and the flags (or override the entrypoint)")
    if unrecognized:
        raise UsageError(f"vllm serve: error: unrecognized arguments: {' '.join(unrecognized)}")
    if not given.get("model"):
        raise UsageError("the model (a directory with config.json) is required\n" + USAGE)
    config.model = str(given["model"])
    config.served_model_names = list(given.get("served_model_names") or [config.model])
    config.host = str(given.get("host") or "0.0.0.0")
    if "port" in given:
        config.port = parse_int("--port", str(given["port"]))
        if config.port > 65535:
            raise UsageError(f"argument --port: {config.port} is not a TCP port")
    if "max_model_len" in given:
        text = str(given["max_model_len"])
        config.max_model_len = None if text in ("-1", "auto") else parse_int("--max-model-len", text)
    for attribute in ("tokenizer", "chat_template"):
        if attribute in given:
            setattr(config, attribute, str(given[attribute]))
    config.response_role = str(given.get("response_role") or "assistant")
    level = str(given.get("uvicorn_log_level") or "info").lower()
    if level not in LOG_LEVELS:
        raise UsageError(f"argument --uvicorn-log-level: expected one of {', '.join(LOG_LEVELS)}")
    config.uvicorn_log_level = level
    # vLLM: `args.api_key or envs.VLLM_API_KEY`; HF_TOKEN and HF_HUB_OFFLINE mean nothing here.
    if given.get("api_key"):
        config.api_key, config.api_key_source = str(given["api_key"]), "--api-key"
    elif environ.get("VLLM_API_KEY"):
        config.api_key, config.api_key_source = environ["VLLM_API_KEY"], "VLLM_API_KEY"
    return config


def parse_command(argv: list[str], environ: dict[str, str] | None = None) -> tuple[str, object]:
    """`vllm ARGS...` -> ("serve", ServeConfig) or ("version", text); UsageError otherwise."""
    if argv[:1] in (["--version"], ["-v"]):
        return "version", VERSION
    if not argv or argv[0] in ("-h", "--help"):
        raise UsageError(USAGE)
    if argv[0] != "serve":
        raise UsageError(f"vllm {argv[0]}: only `vllm serve` exists in the lab CPU engine\n{USAGE}")
    return "serve", parse_serve(argv[1:], environ)
