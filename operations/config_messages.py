"""How a refused configuration reads: each pydantic error of operations/config.py's model turned
into one line naming the key, the value and what would be accepted.

    lines = problem_lines(data, validation_error, Settings.model_fields)
    # [("models", "key 'models[0].revision' = 'main': expected a pinned 40-hex commit ...")]
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError


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
    if kind in ("driver_not_on_branch", "duplicate_model_name", "serving_clash", "rule"):
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
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$": "a directory name of letters, digits, '.', '_' or '-'",
    r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$": "a Hub repo id such as 'meta-llama/Llama-3.1-8B-Instruct'",
    r"^[0-9a-f]{40}$": "a pinned 40-hex commit (not a branch or tag)",
}


def _path(loc: tuple) -> str:
    """models[0].revision"""
    return str(loc[0]) + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])


def problem_lines(data: dict[str, Any], error: ValidationError,
                  known_keys) -> list[tuple[str, str]]:
    """(key, "key 'k' = value: what would be accepted") per problem. pydantic reports a union
    (e.g. "auto" | bool) once per member: those are folded into one line per key. Inside a
    list or dict value (models) each problem gets its own line with its path. A cross-key rule
    has no location: it names its key in the error's context."""
    expectations: dict[str, list[str]] = {}
    found = []
    for item in error.errors():
        about = item.get("ctx", {}).get("key")
        loc = item["loc"] or (about or "?",)
        entry_rule = item["type"] == "rule" and item["loc"] and about  # models[0]'s own rule
        if entry_rule:
            loc = (*loc, about)
        key = str(loc[0])
        nested = len(loc) > 1 and isinstance(data.get(key), (list, tuple, dict))
        if item["type"] == "extra_forbidden":
            if nested:
                found.append((key, f"unknown key '{_path(loc)}' = {item['input']!r}: "
                                   "see 'models' in README.md for the keys of an entry"))
                continue
            close = difflib.get_close_matches(key, known_keys, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see the keys in README.md"
            found.append((key, f"unknown key '{key}' = {data[key]!r}: {hint}"))
        elif nested:
            value = item.get("input")
            if entry_rule and isinstance(value, dict):  # the entry: show the key it is about
                value = value.get(about)
            found.append((key, f"key '{_path(loc)}' = {value!r}: {_describe_expectation(item)}"))
        else:
            expectations.setdefault(key, []).append(_describe_expectation(item))
    for key, described in expectations.items():
        value = data.get(key, "<missing>")
        if len(described) > 1:
            described = ["expected " + " or ".join(d.removeprefix("expected ") for d in described)]
        found.append((key, f"key '{key}' = {value!r}: {described[0]}"))
    return found
