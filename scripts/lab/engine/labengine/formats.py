"""Reading a Hugging Face model directory without numpy: the safetensors header, config.json,
generation_config.json, tokenizer_config.json (standard library only)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
MAX_HEADER = 100 * 1024 * 1024


class ModelFormatError(Exception):
    """The model directory cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int   # absolute byte offsets in the file
    end: int


def parse_safetensors_header(head: bytes, file_size: int) -> tuple[dict[str, TensorInfo], dict]:
    """`head`: at least the first 8 + header-length bytes of a safetensors file of `file_size`
    bytes -> ({name: TensorInfo with absolute offsets}, metadata). Checks every entry lies
    inside the file, has a supported dtype and the byte length its shape says."""
    if len(head) < 8:
        raise ModelFormatError("safetensors: file shorter than 8 bytes")
    (size,) = struct.unpack_from("<Q", head, 0)
    if size > MAX_HEADER or 8 + size > len(head) or 8 + size > file_size:
        raise ModelFormatError(f"safetensors: header length {size} does not fit the file")
    try:
        header = json.loads(head[8:8 + size])
    except ValueError as error:
        raise ModelFormatError(f"safetensors: header is not JSON: {error}") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + size
    tensors = {}
    for name, info in header.items():
        dtype, shape = info.get("dtype"), tuple(info.get("shape") or ())
        begin, end = info.get("data_offsets", (None, None))
        if dtype not in DTYPE_SIZES:
            raise ModelFormatError(f"safetensors: {name}: dtype {dtype} is not supported "
                                   f"(supported: {', '.join(DTYPE_SIZES)})")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise ModelFormatError(f"safetensors: {name}: bad data_offsets {begin}, {end}")
        if end - begin != DTYPE_SIZES[dtype] * math.prod(shape):
            raise ModelFormatError(f"safetensors: {name}: {end - begin} bytes for {dtype} {shape}")
        if data_start + end > file_size:
            raise ModelFormatError(f"safetensors: {name}: data runs past the end of the file")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    return tensors, metadata


def read_safetensors_index(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, read from its header only."""
    path = Path(path)
    with path.open("rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ModelFormatError(f"{path}: not a safetensors file")
        (size,) = struct.unpack("<Q", first)
        head = first + f.read(min(size, MAX_HEADER))
    return parse_safetensors_header(head, path.stat().st_size)[0]


def weight_files(model_dir: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    raise ModelFormatError(f"{model_dir}: no model.safetensors (or index); only safetensors "
                           "checkpoints are supported")


def read_json(path: Path, required: bool = True) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        if required:
            raise ModelFormatError(f"{path}: missing") from None
        return {}
    except ValueError as error:
        raise ModelFormatError(f"{path}: not JSON: {error}") from None


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool


def llama_shape(config: dict) -> LlamaShape:
    """config.json of a Llama-family causal LM -> LlamaShape; ModelFormatError for another
    architecture or a rope scaling this engine does not implement."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ModelFormatError(f"config.json: model_type {model_type!r}: the lab engine runs "
                               "Llama-shaped models only")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        shape = LlamaShape(
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings") or 2048),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=config.get("rope_scaling") or None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFormatError(f"config.json: {error}") from None
    if shape.heads % shape.kv_heads:
        raise ModelFormatError(f"config.json: {shape.heads} heads are not a multiple of "
                               f"{shape.kv_heads} key/value heads")
    scaling = shape.rope_scaling
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in ("linear", "llama3",
                                                                             "default"):
        raise ModelFormatError(f"config.json: rope_scaling {scaling} is not implemented")
    if config.get("sliding_window") and config.get("use_sliding_window", True) \
            and model_type == "mistral":
        raise ModelFormatError("config.json: sliding-window attention is not implemented")
    return shape


def eos_token_ids(config: dict, generation_config: dict, tokenizer_eos: int | None) -> set[int]:
    """Every id that ends a generation: generation_config's, config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (generation_config.get("eos_token_id"), config.get("eos_token_id"),
                   tokenizer_eos):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return ids


def token_text(token: object) -> str | None:
    """tokenizer_config.json's bos_token / eos_token: a string or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None
