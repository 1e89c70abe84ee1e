"""The engine app.py drives: the model directory's tokenizer (the `tokenizers` library, from
tokenizer.json), its chat template (tokenizer_config.json, rendered with jinja2) and the numpy
forward pass (model.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import formats, protocol
from .cli import ServeConfig
from .model import Llama, log_softmax, sample

log = logging.getLogger("labengine")


def gguf_tokenizer_json(metadata: dict) -> dict:
    """tokenizer.json (the `tokenizers` format) for a GGUF's "gpt2" (byte-level BPE) tokenizer:
    tokens, merges, control tokens as special added tokens, BOS prepended when add_bos_token."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise formats.ModelFormatError("only GGUF files with a byte-level BPE tokenizer "
                                       "(tokenizer.ggml.model 'gpt2') are read by the stand-in")
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    special = [i for i, kind in enumerate(types) if kind == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    config = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in special],
        "pre_tokenizer": byte_level, "decoder": dict(byte_level), "post_processor": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokens)},
                  "merges": list(metadata.get("tokenizer.ggml.merges") or [])},
    }
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        config["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tokens[bos], "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos],
                                             "tokens": [tokens[bos]]}},
        }
    return config


class Engine:
    @classmethod
    def from_gguf(cls, path: Path, chat_template: str | None = None,
                  max_model_len: int | None = None) -> "Engine":
        """An engine over a llama GGUF file (what the Ollama stand-in loads from its store):
        weights, tokenizer, special tokens and, unless given, the chat template from it."""
        import json

        from . import gguf
        from .model import load_gguf_tensors

        started = time.monotonic()
        metadata, _ = gguf.read_header(Path(path))
        model_config, tensors = load_gguf_tensors(Path(path))
        self = cls.__new__(cls)
        self.model = Llama(config=model_config, tensors=tensors)
        self.model_path = str(path)
        self.tokenizer = Tokenizer.from_str(json.dumps(gguf_tokenizer_json(metadata)))
        tokens = metadata.get("tokenizer.ggml.tokens") or []

        def token(key):
            index = metadata.get(key)
            return tokens[index] if isinstance(index, int) and index < len(tokens) else None

        self.bos_token, self.eos_token = token("tokenizer.ggml.bos_token_id"), \
            token("tokenizer.ggml.eos_token_id")
        self.chat_template = chat_template or metadata.get("tokenizer.chat_template")
        self.eos_token_ids = {metadata[k] for k in ("tokenizer.ggml.eos_token_id",
                                                     "tokenizer.ggml.eot_token_id")
                              if isinstance(metadata.get(k), int)}
        self.vocab_size = self.model.shape.vocab
        self.max_model_len = min(max_model_len or self.model.max_positions,
                                 self.model.max_positions)
        log.info("loaded %s (GGUF): %d parameters, %d layers, vocabulary %d, context %d, in %.2fs",
                 path, self.model.num_parameters, self.model.shape.layers, self.vocab_size,
                 self.max_model_len, time.monotonic() - started)
        return self

    def __init__(self, config: ServeConfig):
        started = time.monotonic()
        model_dir = Path(config.model)
        if not (model_dir / "config.json").is_file():
            raise formats.ModelFormatError(
                f"{model_dir}: no config.json; the lab engine loads a local model directory "
                "(the weights phase puts it under models_dir), never from a hub")
        tokenizer_dir = Path(config.tokenizer) if config.tokenizer else model_dir
        self.model = Llama(model_dir)
        self.model_path = config.model
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        tok_config = formats.read_json(tokenizer_dir / "tokenizer_config.json", required=False)
        self.bos_token = formats.token_text(tok_config.get("bos_token"))
        self.eos_token = formats.token_text(tok_config.get("eos_token"))
        self.chat_template = self._chat_template(config.chat_template, tok_config, tokenizer_dir)
        eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids = formats.eos_token_ids(
            self.model.config, formats.read_json(model_dir / "generation_config.json",
                                                 required=False), eos_id)
        self.vocab_size = self.model.shape.vocab
        derived = self.model.max_positions
        if config.max_model_len is not None and config.max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({config.max_model_len}) is greater "
                             f"than the derived max_model_len (max_position_embeddings="
                             f"{derived} in model's config.json).")
        self.max_model_len = config.max_model_len or derived
        log.info("loaded %s: %d parameters, %d layers, vocabulary %d, max_model_len %d, "
                 "eos ids %s, in %.2fs", model_dir, self.model.num_parameters,
                 self.model.shape.layers, self.vocab_size, self.max_model_len,
                 sorted(self.eos_token_ids), time.monotonic() - started)

    @staticmethod
    def _chat_template(option: str | None, tok_config: dict, tokenizer_dir: Path) -> str | None:
        if option:
            path = Path(option)
            return path.read_text() if path.is_file() else option
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja = tokenizer_dir / "chat_template.jinja"
        if not template and jinja.is_file():
            template = jinja.read_text()
        return template or None

    # --- What app.py calls -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_str(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
        if not self.chat_template:
            raise protocol.APIError(400, "As of transformers v4.44, default chat template is no "
                                         "longer allowed, so you must provide a chat template if "
                                         "the tokenizer does not define one.")
        return protocol.render_chat_template(self.chat_template, messages, add_generation_prompt,
                                             self.bos_token, self.eos_token, **kwargs)

    def new_rng(self, seed: int | None) -> np.random.Generator:
        return np.random.default_rng(seed)

    def generate(self, prompt_ids: list[int], sampling: protocol.Sampling,
                 rng: np.random.Generator):
        """Yields (token, its logprob, top-k [(token, logprob)]) one forward step at a time:
        the prompt in one pass, then one token a pass, keys and values cached."""
        cache = self.model.new_cache()
        logits = self.model.forward(prompt_ids, cache, 0)
        position = len(prompt_ids)
        while True:
            token = sample(logits, sampling.temperature, sampling.top_p, sampling.top_k, rng)
            logprob, top = 0.0, []
            if sampling.logprobs is not None:
                lps = log_softmax(logits)
                logprob = float(lps[token])
                if sampling.logprobs:
                    best = np.argsort(-lps, kind="stable")[:sampling.logprobs]
                    top = [(int(i), float(lps[i])) for i in best]
            yield token, logprob, top
            logits = self.model.forward([token], cache, position)
            position += 1
