"""The lab's tiny model as a GGUF repository (LAB STAND-IN), as GGUF repos on the Hub are laid
out (one .gguf file per quantisation, a model card): what an Ollama model of the lab imports.

The same weights and tokenizer as scripts/lab/hub/model.py, converted as llama.cpp's
convert_hf_to_gguf.py converts a Llama checkpoint (tensor names, Q/K row permutation, metadata
keys; F32, no quantisation), written by the stand-in engine's own GGUF module. No numpy.

    files = build_files()        # {".gitattributes": ..., "README.md": ..., GGUF_FILE: ...}
    write_repo(root)             # root/gpufleet-lab/tiny-llama-GGUF/<revision>/...
"""

from __future__ import annotations

import sys
from array import array
from pathlib import Path

from . import gitobjects, model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engine"))
from labengine import gguf  # noqa: E402  (the stand-in engine's reader and writer)

REPO_ID = "gpufleet-lab/tiny-llama-GGUF"
GGUF_FILE = "tiny-llama-F32.gguf"
COMMIT_MESSAGE = "gpu-fleet lab stand-in model, GGUF (random weights, not a real model)"


def metadata() -> dict[str, object]:
    """llama.cpp's keys for a Llama GGUF (gguf-py/gguf/constants.py Keys)."""
    byte_chars = model.bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(model.BYTE_TOKENS)] + model.special_tokens()
    types = [gguf.TOKEN_TYPE_NORMAL] * model.BYTE_TOKENS + \
        [gguf.TOKEN_TYPE_CONTROL] * (model.VOCAB_SIZE - model.BYTE_TOKENS)
    return {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": "gpufleet lab tiny-llama (LAB STAND-IN, random weights)",
        "general.file_type": gguf.FILE_TYPE_ALL_F32,
        "llama.block_count": model.LAYERS,
        "llama.context_length": model.MAX_POSITIONS,
        "llama.embedding_length": model.HIDDEN,
        "llama.feed_forward_length": model.INTERMEDIATE,
        "llama.attention.head_count": model.HEADS,
        "llama.attention.head_count_kv": model.KV_HEADS,
        "llama.rope.freq_base": model.ROPE_THETA,
        "llama.attention.layer_norm_rms_epsilon": model.RMS_EPS,
        "llama.rope.dimension_count": model.HEAD_DIM,
        "llama.vocab_size": model.VOCAB_SIZE,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": model.BOS_ID,
        "tokenizer.ggml.eos_token_id": model.EOS_ID,
        "tokenizer.ggml.eot_token_id": model.EOT_ID,
        "tokenizer.ggml.padding_token_id": model.PAD_ID,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": model.CHAT_TEMPLATE,
    }


def gguf_bytes() -> bytes:
    tensors = {}
    for name, shape in model.tensor_shapes().items():
        values = model.tensor_values(name, shape)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = model.HEADS if name.endswith("q_proj.weight") else model.KV_HEADS
            width = shape[1]
            rows = [values[i * width:(i + 1) * width] for i in range(shape[0])]
            values = array("f")
            for row in gguf.permute_rows(rows, heads):
                values.extend(row)
        if sys.byteorder != "little":  # pragma: no cover - GGUF is little-endian
            values.byteswap()
        tensors[gguf.gguf_name(name)] = (shape, values.tobytes())
    return gguf.write(metadata(), tensors)


def model_card() -> str:
    return f"""---
license: apache-2.0
library_name: gguf
base_model: {model.REPO_ID}
tags:
- gpu-fleet-lab
- lab-stand-in
- random-weights
- gguf
---

# {REPO_ID}: LAB STAND-IN, not a real model, not from huggingface.co

`{GGUF_FILE}`: {model.REPO_ID} (random weights) converted to GGUF as llama.cpp's
convert_hf_to_gguf.py would (F32, no quantisation), for the lab's Ollama stand-in.
"""


def build_files() -> dict[str, bytes]:
    return {
        ".gitattributes": gitobjects.HF_GITATTRIBUTES.encode(),
        "README.md": model_card().encode(),
        GGUF_FILE: gguf_bytes(),
    }


def write_repo(root: Path) -> str:
    """The repository under root for the hub server; returns its revision."""
    files = build_files()
    return model.write_repo(root, files, repo_id=REPO_ID)
