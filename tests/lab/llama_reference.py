"""An independent reference for the lab engine's forward pass: the lab's tiny Llama in pure
Python (float64 lists, no numpy), from the bytes scripts/lab/hub/model.py writes, read with that
module's own safetensors reader. Written from transformers' LlamaForCausalLM: RMSNorm, rotate-
half RoPE, grouped-query attention, SwiGLU, untied lm_head. Slow (about 0.1 s a token) but
plenty for a dozen tokens. Tokenization: the lab model's byte-level vocabulary (a byte is a
token) with its special tokens matched as whole strings."""

from __future__ import annotations

import json
import math
import operator
import re

from scripts.lab.hub import model as hub


class Reference:
    def __init__(self, files: dict[str, bytes]):
        self.config = json.loads(files["config.json"])
        _, tensors = hub.read_safetensors(files["model.safetensors"])
        c = self.config
        self.hidden, self.heads = c["hidden_size"], c["num_attention_heads"]
        self.kv_heads, self.head_dim = c["num_key_value_heads"], c["head_dim"]
        self.eps, self.theta = c["rms_norm_eps"], c["rope_theta"]

        def rows(name):
            shape, values = tensors[name]
            values = list(values)
            if len(shape) == 1:
                return values
            return [values[r * shape[1]:(r + 1) * shape[1]] for r in range(shape[0])]

        self.embed = rows("model.embed_tokens.weight")
        self.layers = []
        for n in range(c["num_hidden_layers"]):
            p = f"model.layers.{n}."
            self.layers.append({k: rows(p + name) for k, name in (
                ("q", "self_attn.q_proj.weight"), ("k", "self_attn.k_proj.weight"),
                ("v", "self_attn.v_proj.weight"), ("o", "self_attn.o_proj.weight"),
                ("gate", "mlp.gate_proj.weight"), ("up", "mlp.up_proj.weight"),
                ("down", "mlp.down_proj.weight"), ("ln1", "input_layernorm.weight"),
                ("ln2", "post_attention_layernorm.weight"))})
        self.norm = rows("model.norm.weight")
        self.lm_head = rows("lm_head.weight")
        tok_config = json.loads(files["tokenizer_config.json"])
        self.specials = {entry["content"]: int(i)
                         for i, entry in tok_config["added_tokens_decoder"].items()}
        self.chat_template = tok_config["chat_template"]
        self.bos, self.eos = tok_config["bos_token"], tok_config["eos_token"]
        generation = json.loads(files["generation_config.json"])
        self.eos_ids = set(generation["eos_token_id"])

    # --- tokens --------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool) -> list[int]:
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len,
                                                               reverse=True)) + ")"
        ids = [self.specials[self.bos]] if add_bos else []
        for piece in re.split(pattern, text):
            ids += [self.specials[piece]] if piece in self.specials else list(piece.encode())
        return ids

    @staticmethod
    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    # --- the forward pass ----------------------------------------------------------------

    @staticmethod
    def _matvec(matrix, x):
        return [sum(map(operator.mul, row, x)) for row in matrix]

    def _rms(self, x, weight):
        scale = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + self.eps)
        return [v * scale * w for v, w in zip(x, weight)]

    def _rope(self, vec, position):
        half = self.head_dim // 2
        out = list(vec)
        for i in range(half):
            angle = position / (self.theta ** (2 * i / self.head_dim))
            cos, sin = math.cos(angle), math.sin(angle)
            a, b = vec[i], vec[i + half]
            out[i], out[i + half] = a * cos - b * sin, b * cos + a * sin
        return out

    def step(self, token: int, position: int, cache: list) -> list[float]:
        """Logits after `token` at `position`; `cache` (a list per layer) grows by one."""
        d, group = self.head_dim, self.heads // self.kv_heads
        x = list(self.embed[token])
        for layer, kv in zip(self.layers, cache):
            h = self._rms(x, layer["ln1"])
            q, k, v = (self._matvec(layer[n], h) for n in ("q", "k", "v"))
            qs = [self._rope(q[i * d:(i + 1) * d], position) for i in range(self.heads)]
            ks = [self._rope(k[i * d:(i + 1) * d], position) for i in range(self.kv_heads)]
            vs = [v[i * d:(i + 1) * d] for i in range(self.kv_heads)]
            kv.append((ks, vs))
            attended = []
            for head in range(self.heads):
                g = head // group
                scores = [sum(map(operator.mul, qs[head], keys[g])) / math.sqrt(d)
                          for keys, _ in kv]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                attended += [sum(w * values[g][j] for w, (_, values) in zip(weights, kv)) / total
                             for j in range(d)]
            x = [a + b for a, b in zip(x, self._matvec(layer["o"], attended))]
            h = self._rms(x, layer["ln2"])
            gate, up = self._matvec(layer["gate"], h), self._matvec(layer["up"], h)
            act = [g / (1.0 + math.exp(-g)) * u for g, u in zip(gate, up)]
            x = [a + b for a, b in zip(x, self._matvec(layer["down"], act))]
        return self._matvec(self.lm_head, self._rms(x, self.norm))

    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy continuation (stops after an EOS id, which is included, as vLLM counts it)
        and each chosen token's log-probability."""
        cache = [[] for _ in self.layers]
        for position, token in enumerate(prompt):
            logits = self.step(token, position, cache)
        out, logprobs = [], []
        for _ in range(max_tokens):
            best = max(range(len(logits)), key=logits.__getitem__)
            top = max(logits)
            logprobs.append(logits[best] - top - math.log(sum(math.exp(v - top) for v in logits)))
            out.append(best)
            if best in self.eos_ids:
                break
            logits = self.step(best, len(prompt) + len(out) - 1, cache)
        return out, logprobs
