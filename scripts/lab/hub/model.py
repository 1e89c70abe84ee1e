"""The lab's tiny model: a real-layout Llama causal LM made from nothing (LAB STAND-IN, no model).

`build_files()` returns the repository's files as bytes, the same bytes on every run and machine:
no network, no torch, no numpy. The weights come from a seeded splitmix64 stream, so they are
noise: the model runs for real (every shape and name is that of `transformers`' LlamaForCausalLM)
but what it says is gibberish. The tokenizer is byte-level BPE with no merges (a byte, a token).

    files = build_files()                  # {"config.json": b"...", "model.safetensors": ...}
    revision = commit_sha(files)           # 40 hex, a real git commit id of these files
    write_repo(root)                       # root/gpufleet-lab/tiny-llama/<revision>/..., refs/main
    python3 -m scripts.lab.hub.model ROOT  # the same, prints the repo id and revision
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from array import array
from pathlib import Path

from . import gitobjects

REPO_ID = "gpufleet-lab/tiny-llama"
# commit_sha(build_files()): the revision lab data pins. A test holds it; change both together.
EXPECTED_REVISION = "4eab0cd005a1f7148f5d417d86428a174a186129"
COMMIT_MESSAGE = "gpu-fleet lab stand-in model (random weights, not a real model)"
COMMIT_TIMESTAMP = 1767225600  # 2026-01-01T00:00:00Z, fixed so the revision depends on content only
SEED = 20260101

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention, as current Llama checkpoints: 2 query heads per KV head
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 176
MAX_POSITIONS = 256
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
INIT_STD = 0.02

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
BYTE_TOKENS = 256
NAMED_SPECIALS = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
VOCAB_SIZE = 320  # 256 bytes + 64 special tokens (named, then reserved), padded as Llama 3 does
BOS_ID, EOS_ID, PAD_ID = BYTE_TOKENS, BYTE_TOKENS + 1, BYTE_TOKENS + 2
EOT_ID = BYTE_TOKENS + 5
TRANSFORMERS_VERSION = "4.57.1"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def special_tokens() -> list[str]:
    """The 64 special tokens, ids 256..319: the named ones, then <|reserved_special_token_N|>."""
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(VOCAB_SIZE - BYTE_TOKENS - len(NAMED_SPECIALS))]
    return NAMED_SPECIALS + reserved


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def config() -> dict:
    """config.json of transformers' LlamaForCausalLM at this size."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, EOT_ID],
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": PAD_ID,
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_EPS,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def generation_config() -> dict:
    return {
        "_from_model_config": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, EOT_ID],
        "pad_token_id": PAD_ID,
        "transformers_version": TRANSFORMERS_VERSION,
    }


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every weight of LlamaForCausalLM with this config, by its state-dict name, in model order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, HIDDEN)}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB_SIZE, HIDDEN)
    return shapes


_MASK64 = (1 << 64) - 1


def splitmix64(seed: int, count: int) -> list[int]:
    """`count` outputs of the splitmix64 generator started at `seed` (a fully specified PRNG)."""
    out = []
    state = seed & _MASK64
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(z ^ (z >> 31))
    return out


def tensor_values(name: str, shape: tuple[int, ...]) -> array:
    """float32 values of a tensor: norms 1.0; matrices uniform, std INIT_STD, seeded by name."""
    count = math.prod(shape)
    if name.endswith("norm.weight"):
        return array("f", [1.0] * count)
    seed = SEED ^ int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    half_width = INIT_STD * math.sqrt(3.0)  # uniform(-a, a) has std a / sqrt(3)
    scale = 2.0 * half_width / float(1 << 53)
    return array("f", [(r >> 11) * scale - half_width for r in splitmix64(seed, count)])


def safetensors_bytes(tensors: dict[str, tuple[tuple[int, ...], array]],
                      metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of float32 tensors: u64 LE header size, JSON header, LE data."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        shape, values = tensors[name]
        if len(values) != math.prod(shape):
            raise ValueError(f"{name}: {len(values)} values for shape {shape}")
        data = array("f", values)
        if sys.byteorder != "little":
            data.byteswap()
        raw = data.tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read_safetensors(blob: bytes) -> tuple[dict, dict[str, tuple[list[int], array]]]:
    """Parse a float32 safetensors file: (metadata, {name: (shape, values)}); checks the layout."""
    (size,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + size])
    metadata = header.pop("__metadata__", {})
    data = memoryview(blob)[8 + size:]
    tensors = {}
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, stop = info["data_offsets"]
        if info["dtype"] != "F32" or begin != end or stop - begin != 4 * math.prod(info["shape"]):
            raise ValueError(f"bad safetensors entry {name}: {info}")
        values = array("f")
        values.frombytes(bytes(data[begin:stop]))
        if sys.byteorder != "little":
            values.byteswap()
        tensors[name] = (info["shape"], values)
        end = stop
    if end != len(data):
        raise ValueError(f"safetensors data is {len(data)} bytes, header covers {end}")
    return metadata, tensors


def tokenizer_json() -> dict:
    """tokenizer.json in the `tokenizers` format: byte-level BPE, no merges, Llama-3 specials."""
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    added = [
        {"id": BYTE_TOKENS + i, "content": tok, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, tok in enumerate(special_tokens())
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}},
        },
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": [],
        },
    }


def tokenizer_config() -> dict:
    return {
        "added_tokens_decoder": {
            str(BYTE_TOKENS + i): {"content": tok, "lstrip": False, "normalized": False,
                                   "rstrip": False, "single_word": False, "special": True}
            for i, tok in enumerate(special_tokens())
        },
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POSITIONS,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}


def model_card(num_params: int, weights_size: int) -> str:
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- gpu-fleet-lab
- lab-stand-in
- random-weights
---

# {REPO_ID}: LAB STAND-IN, not a real model, not from huggingface.co

This repository exists only in the gpu-fleet lab: it is generated by `scripts/lab/hub/model.py`
and served by the lab's stand-in for the Hugging Face Hub. Its weights are seeded random noise
(splitmix64, seed {SEED}): a serving engine loads and runs it for real, and it answers gibberish.

| | |
|---|---|
| architecture | `LlamaForCausalLM`, transformers' names and shapes |
| size | hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads ({KV_HEADS} KV heads, \
head_dim {HEAD_DIM}), MLP {INTERMEDIATE}, SiLU, RMSNorm eps {RMS_EPS}, RoPE theta {ROPE_THETA} |
| context | {MAX_POSITIONS} positions |
| vocabulary | {VOCAB_SIZE}: the 256 bytes (byte-level BPE, no merges), then special tokens \
(`{BOS}` {BOS_ID}, `{EOS}` {EOS_ID}, `{PAD}` {PAD_ID}, `<|eot_id|>` {EOT_ID}, reserved) |
| weights | {num_params} float32 parameters, `model.safetensors` {weights_size} bytes, \
untied `lm_head` |
"""


def build_files() -> dict[str, bytes]:
    """Every file of the repository, by path: deterministic bytes."""
    shapes = tensor_shapes()
    tensors = {name: (shape, tensor_values(name, shape)) for name, shape in shapes.items()}
    weights = safetensors_bytes(tensors, {"format": "pt"})

    def as_json(obj: dict) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()

    return {
        ".gitattributes": gitobjects.HF_GITATTRIBUTES.encode(),
        "README.md": model_card(sum(math.prod(s) for s in shapes.values()), len(weights)).encode(),
        "config.json": as_json(config()),
        "generation_config.json": as_json(generation_config()),
        "model.safetensors": weights,
        "special_tokens_map.json": as_json(special_tokens_map()),
        "tokenizer.json": as_json(tokenizer_json()),
        "tokenizer_config.json": as_json(tokenizer_config()),
    }


def commit_sha(files: dict[str, bytes]) -> str:
    """The repository's revision: the git commit id of these files (fixed author, date, message)."""
    return gitobjects.commit_sha1(files, COMMIT_MESSAGE, COMMIT_TIMESTAMP)


def write_repo(root: Path, files: dict[str, bytes] | None = None, repo_id: str = REPO_ID,
               branch: str = "main") -> str:
    """Lay the repository out for the hub server: root/<repo_id>/<revision>/<files>, and
    root/<repo_id>/refs/<branch> holding the revision. Returns the revision. Rewrites nothing
    that is already there with the same bytes."""
    files = build_files() if files is None else files
    revision = commit_sha(files)
    base = Path(root) / repo_id
    for path, content in files.items():
        _write_if_changed(base / revision / path, content)
    _write_if_changed(base / "refs" / branch, revision.encode())
    return revision


def _write_if_changed(path: Path, content: bytes) -> None:
    if path.is_file() and path.read_bytes() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m scripts.lab.hub.model ROOT")
    print(REPO_ID, write_repo(Path(sys.argv[1])))
