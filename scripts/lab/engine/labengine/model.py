"""A Llama-family causal LM forward pass in numpy, read straight from safetensors.

RMSNorm, rotary position embeddings (rope_theta from config.json; linear and llama3 scaling),
grouped-query attention with a KV cache, SwiGLU MLP, tied or untied lm_head, as transformers'
LlamaForCausalLM computes them (float32 throughout; F16 and BF16 weights are widened).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import gguf
from .formats import ModelFormatError, llama_shape, read_json, read_safetensors_index, weight_files


def load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as a float32 array (the header parsed by formats.py,
    the data read with np.frombuffer)."""
    tensors = {}
    for path in weight_files(model_dir):
        index = read_safetensors_index(path)
        blob = path.read_bytes()
        for name, info in index.items():
            raw = blob[info.begin:info.end]
            if info.dtype == "F32":
                array = np.frombuffer(raw, dtype="<f4")
            elif info.dtype == "F16":
                array = np.frombuffer(raw, dtype="<f2").astype(np.float32)
            elif info.dtype == "F64":
                array = np.frombuffer(raw, dtype="<f8").astype(np.float32)
            else:  # BF16: the upper half of a float32
                array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            tensors[name] = np.ascontiguousarray(array.reshape(info.shape), dtype=np.float32)
    return tensors


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


def load_gguf_tensors(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json keys, tensors by transformers' name) of a llama GGUF file of F32 tensors
    (gguf.py reads the header; the Q/K rows are put back in transformers' order)."""
    metadata, infos = gguf.read_header(path)
    config = gguf.llama_config(metadata)
    config["tie_word_embeddings"] = "output.weight" not in infos
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for info in infos.values():
        if info.ggml_type != gguf.GGML_TYPE_F32:
            raise ModelFormatError(f"{path}: tensor {info.name} has ggml type {info.ggml_type}; "
                                   "the lab stand-in reads F32 GGUF files only")
        count = int(np.prod(info.shape))
        array = np.frombuffer(blob, dtype="<f4", count=count, offset=info.offset)
        array = np.array(array.reshape(info.shape), dtype=np.float32)
        name = gguf.hf_name(info.name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if name.endswith("q_proj.weight") \
                else config["num_key_value_heads"]
            order = gguf.permute_rows(list(range(array.shape[0])), heads, inverse=True)
            array = np.ascontiguousarray(array[order])
        tensors[name] = array
    return config, tensors


class Llama:
    def __init__(self, model_dir: Path | None = None, config: dict | None = None,
                 tensors: dict[str, np.ndarray] | None = None):
        """From a transformers checkpoint directory, or from config + tensors (a GGUF file)."""
        if model_dir is not None:
            model_dir = Path(model_dir)
            config, tensors = read_json(model_dir / "config.json"), load_tensors(model_dir)
        self.config = config
        self.shape = s = llama_shape(self.config)
        t = tensors

        def take(name: str, shape: tuple[int, ...] | None = None, required: bool = True):
            if name not in t:
                if required:
                    raise ModelFormatError(f"{model_dir}: tensor {name} is missing")
                return None
            if shape is not None and t[name].shape != shape:
                raise ModelFormatError(f"{name}: shape {t[name].shape}, config says {shape}")
            return t[name]

        q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.embed = take("model.embed_tokens.weight", (s.vocab, s.hidden))
        self.layers = []
        for n in range(s.layers):
            p = f"model.layers.{n}."
            layer = {
                # Stored transposed once, so a forward step is x @ W.
                "q": take(p + "self_attn.q_proj.weight", (q_dim, s.hidden)).T.copy(),
                "k": take(p + "self_attn.k_proj.weight", (kv_dim, s.hidden)).T.copy(),
                "v": take(p + "self_attn.v_proj.weight", (kv_dim, s.hidden)).T.copy(),
                "o": take(p + "self_attn.o_proj.weight", (s.hidden, q_dim)).T.copy(),
                "gate": take(p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)).T.copy(),
                "up": take(p + "mlp.up_proj.weight", (s.intermediate, s.hidden)).T.copy(),
                "down": take(p + "mlp.down_proj.weight", (s.hidden, s.intermediate)).T.copy(),
                "ln_in": take(p + "input_layernorm.weight", (s.hidden,)),
                "ln_post": take(p + "post_attention_layernorm.weight", (s.hidden,)),
            }
            for proj in ("q", "k", "v", "o"):
                layer[proj + "_bias"] = take(p + f"self_attn.{proj}_proj.bias", required=False)
            for proj in ("gate", "up", "down"):
                layer[proj + "_bias"] = take(p + f"mlp.{proj}_proj.bias", required=False)
            self.layers.append(layer)
        self.norm = take("model.norm.weight", (s.hidden,))
        lm_head = take("lm_head.weight", (s.vocab, s.hidden), required=False)
        if lm_head is None:
            if not s.tie_word_embeddings:
                raise ModelFormatError(f"{model_dir}: lm_head.weight missing and "
                                       "tie_word_embeddings is false")
            lm_head = self.embed
        self.lm_head = lm_head.T.copy()
        self.inv_freq = rope_inv_freq(s.head_dim, s.rope_theta, s.rope_scaling)
        self.max_positions = s.max_positions
        self.num_parameters = sum(int(a.size) for a in t.values())

    def new_cache(self) -> list:
        return [[None, None] for _ in self.layers]

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        variance = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(variance + self.shape.rms_eps)) * weight

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    @staticmethod
    def _linear(x, weight, bias):
        y = x @ weight
        return y + bias if bias is not None else y

    def forward(self, ids: list[int], cache: list, start: int) -> np.ndarray:
        """Logits (float32, vocab) after the last of `ids`, which sit at positions start...;
        `cache` (from new_cache) holds the keys and values of positions before `start`."""
        s = self.shape
        steps = len(ids)
        x = self.embed[np.asarray(ids, dtype=np.int64)]                       # (T, H)
        positions = np.arange(start, start + steps, dtype=np.float64)
        freqs = np.outer(positions, self.inv_freq)                            # (T, d/2)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos = np.cos(emb).astype(np.float32)[:, None, :]                      # (T, 1, d)
        sin = np.sin(emb).astype(np.float32)[:, None, :]
        group = s.heads // s.kv_heads
        total = start + steps
        # Causal mask: query t (position start+t) sees keys 0..start+t.
        mask = np.triu(np.full((steps, total), -np.inf, dtype=np.float32), k=start + 1)
        scale = 1.0 / math.sqrt(s.head_dim)
        for layer, kv in zip(self.layers, cache):
            h = self._rms(x, layer["ln_in"])
            q = self._linear(h, layer["q"], layer["q_bias"]).reshape(steps, s.heads, s.head_dim)
            k = self._linear(h, layer["k"], layer["k_bias"]).reshape(steps, s.kv_heads, s.head_dim)
            v = self._linear(h, layer["v"], layer["v_bias"]).reshape(steps, s.kv_heads, s.head_dim)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            keys = k if kv[0] is None else np.concatenate([kv[0], k], axis=0)    # (S, kvH, d)
            values = v if kv[1] is None else np.concatenate([kv[1], v], axis=0)
            kv[0], kv[1] = keys, values
            if group > 1:
                keys = np.repeat(keys, group, axis=1)
                values = np.repeat(values, group, axis=1)
            scores = np.einsum("thd,shd->hts", q, keys) * scale + mask              # (H, T, S)
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            attended = np.einsum("hts,shd->thd", weights, values).reshape(steps, -1)
            x = x + self._linear(attended, layer["o"], layer["o_bias"])
            h = self._rms(x, layer["ln_post"])
            gate = self._linear(h, layer["gate"], layer["gate_bias"])
            up = self._linear(h, layer["up"], layer["up_bias"])
            x = x + self._linear(gate / (1.0 + np.exp(-gate)) * up, layer["down"],
                                 layer["down_bias"])
        last = self._rms(x[-1:], self.norm)
        return (last @ self.lm_head)[0].astype(np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int,
           rng: np.random.Generator) -> int:
    """The next token: argmax when temperature is 0 (greedy), else a draw from the
    temperature-scaled distribution, cut to the top k and the top-p nucleus."""
    if temperature < 1e-5:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z < cut, -np.inf, z)
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < top_p   # the smallest prefix reaching top_p
        keep[0] = True
        nucleus = np.zeros_like(probs)
        nucleus[order[keep]] = probs[order[keep]]
        probs = nucleus / nucleus.sum()
    return int(rng.choice(probs.size, p=probs))
