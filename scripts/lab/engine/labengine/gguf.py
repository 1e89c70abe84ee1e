"""GGUF files, as llama.cpp writes them and Ollama imports them (standard library only).

The lab writes its tiny model as a GGUF file for the Ollama stand-in (scripts/lab/hub/gguf_repo.py),
and the stand-in reads it back. The layout is GGUF version 3 (ggml-org/llama.cpp
ggml/include/gguf.h, gguf-py/gguf/constants.py): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count, the key/values, the tensor infos (name, dims innermost first, ggml type,
offset), then the tensor data aligned to `general.alignment` (32). Only F32 tensors are written
or read here (file type ALL_F32): the stand-in is no quantiser.

The Llama tensors carry llama.cpp's names (token_embd, blk.N.attn_q, ...) and its Q/K row
permutation (convert_hf_to_gguf.py LlamaModel.permute): GGUF's llama rotary embedding pairs
neighbouring dimensions, transformers' pairs the two halves. `hf_tensors()` undoes both, so the
forward pass of model.py runs on what it reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32
GGML_TYPE_F32 = 0
FILE_TYPE_ALL_F32 = 0
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3

# Value types (gguf.h enum gguf_type).
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
           BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


class GGUFError(Exception):
    """Not a GGUF file this reader can use; the message says why."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]   # numpy order (outermost first)
    ggml_type: int
    offset: int              # absolute, in the file


# --- Writing -----------------------------------------------------------------------------------

def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _typed(value) -> tuple[int, bytes]:
    """(gguf type, encoded value): bool, int (u32, or i64 when negative/large), float (f32), str,
    and lists of one of those (the type of the first element)."""
    if isinstance(value, bool):
        return BOOL, struct.pack("<?", value)
    if isinstance(value, int):
        if 0 <= value < 2 ** 32:
            return U32, struct.pack("<I", value)
        return I64, struct.pack("<q", value)
    if isinstance(value, float):
        return F32, struct.pack("<f", value)
    if isinstance(value, str):
        return STRING, _string(value)
    if isinstance(value, list):
        kinds = [_typed(item) for item in value]
        kind = kinds[0][0] if kinds else STRING
        if any(k != kind for k, _ in kinds):
            raise GGUFError("an array's elements must share one type")
        return ARRAY, struct.pack("<IQ", kind, len(value)) + b"".join(b for _, b in kinds)
    raise GGUFError(f"cannot write {type(value).__name__} values")


def write(metadata: dict[str, object], tensors: dict[str, tuple[tuple[int, ...], bytes]]) -> bytes:
    """A GGUF v3 file: `metadata` key/values in order, then F32 `tensors` (numpy shape, little-
    endian float32 bytes) in order."""
    head = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        kind, data = _typed(value)
        head += [_string(key), struct.pack("<I", kind), data]
    offset, blobs = 0, []
    for name, (shape, data) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        if len(data) != 4 * count:
            raise GGUFError(f"{name}: {len(data)} bytes for shape {shape}")
        head += [_string(name), struct.pack("<I", len(shape)),
                 struct.pack(f"<{len(shape)}Q", *reversed(shape)),
                 struct.pack("<IQ", GGML_TYPE_F32, offset)]
        blobs.append(data)
        pad = -len(data) % ALIGNMENT
        blobs.append(b"\0" * pad)
        offset += len(data) + pad
    header = b"".join(head)
    header += b"\0" * (-len(header) % ALIGNMENT)
    return header + b"".join(blobs)


# --- Reading -----------------------------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise GGUFError("truncated header")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.data):
            raise GGUFError("truncated string")
        text = self.data[self.pos:self.pos + length].decode("utf-8", "replace")
        self.pos += length
        return text

    def value(self, kind: int):
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            inner, count = self.take("<IQ")
            return [self.value(inner) for _ in range(count)]
        raise GGUFError(f"unknown value type {kind}")


def read_header(path: Path, max_header: int = 64 * 1024 * 1024) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors by name) of a GGUF file; the tensor data is not read."""
    with open(path, "rb") as handle:
        data = handle.read(max_header)
    reader = _Reader(data)
    if reader.take("4s") != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
    version, tensor_count, kv_count = reader.take("<IQQ")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} (2 or 3 expected)")
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.take("<I"))
    infos = []
    for _ in range(tensor_count):
        name = reader.string()
        dims = reader.take("<I")
        shape = tuple(reversed([reader.take("<Q") for _ in range(dims)]))
        ggml_type, offset = reader.take("<IQ")
        infos.append((name, shape, ggml_type, offset))
    alignment = int(metadata.get("general.alignment", ALIGNMENT))
    start = reader.pos + (-reader.pos % alignment)
    return metadata, {name: Tensor(name, shape, kind, start + offset)
                      for name, shape, kind, offset in infos}


# --- The Llama mapping ---------------------------------------------------------------------------

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    prefix, _, rest = hf_name.partition(".layers.")
    index, _, leaf = rest.partition(".")
    if prefix != "model" or leaf not in LAYER_HF_TO_GGUF:
        raise GGUFError(f"no GGUF name for tensor {hf_name}")
    return f"blk.{index}.{LAYER_HF_TO_GGUF[leaf]}"


def hf_name(name: str) -> str:
    for hf, gg in HF_TO_GGUF.items():
        if gg == name:
            return hf
    block, index, leaf = (name.split(".", 2) + ["", ""])[:3]
    for hf_leaf, gg_leaf in LAYER_HF_TO_GGUF.items():
        if block == "blk" and gg_leaf == leaf:
            return f"model.layers.{index}.{hf_leaf}"
    raise GGUFError(f"tensor {name} is not one of a Llama model's")


def permute_rows(rows: list, heads: int, inverse: bool = False) -> list:
    """llama.cpp's Q/K permutation of a weight's rows (one entry per output row): within each
    head, row order [0, half, 1, half+1, ...] <- transformers' [0, 1, ..., half-1, half, ...].
    `inverse` undoes it."""
    per_head = len(rows) // heads
    half = per_head // 2
    out = []
    for head in range(heads):
        block = rows[head * per_head:(head + 1) * per_head]
        if inverse:  # GGUF interleaved -> halves
            out += block[0::2] + block[1::2]
        else:        # halves -> interleaved
            for i in range(half):
                out += [block[i], block[half + i]]
    return out


def llama_config(metadata: dict) -> dict:
    """config.json keys of transformers' Llama from a llama GGUF's metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"architecture {arch!r}: this stand-in runs 'llama' GGUF files only")

    def key(name, default=None):
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise GGUFError(f"llama.{name} missing from the GGUF metadata")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("rope.dimension_count", hidden // heads)),
        "intermediate_size": int(key("feed_forward_length")),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": int(metadata.get("llama.vocab_size") or len(tokens)),
        "tie_word_embeddings": False, "rope_scaling": None, "hidden_act": "silu",
    }
