"""The lab's stack stand-ins (scripts/lab/engine, scripts/lab/gateway): the pure parts, in the
project venv (no numpy, no tokenizers, no Docker). The engine's ASGI app is driven here with a
fake engine that "generates" a fixed text byte by byte; the real forward pass is proven in
tests/lab/test_lab_images.py against the built image."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import re

import pytest

from scripts.lab import engine as engine_image
from scripts.lab import gateway, services
from scripts.lab.engine.labengine import STAND_IN, VERSION, cli, formats, protocol
from scripts.lab.engine.labengine.app import EngineApp
from scripts.lab.hub import model as hub_model

REPO = Path(__file__).resolve().parents[2]
STACK_ARGS = ["/models/tiny-llama", "--served-model-name", "tiny-llama", "--host", "0.0.0.0",
              "--port", "8000", "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9"]


# ------------------------------------------------------------------ the command line


def test_the_stacks_command_line_parses_with_the_key_from_the_environment():
    config = cli.parse_serve(STACK_ARGS + ["--max-model-len", "128"],
                             {"VLLM_API_KEY": "sk-env", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"})
    assert (config.model, config.served_model_names, config.host, config.port) == \
        ("/models/tiny-llama", ["tiny-llama"], "0.0.0.0", 8000)
    assert config.max_model_len == 128
    assert (config.api_key, config.api_key_source) == ("sk-env", "VLLM_API_KEY")
    assert config.ignored == ["--tensor-parallel-size 1", "--gpu-memory-utilization 0.9"]
    command, parsed = cli.parse_command(["serve", *STACK_ARGS], {})
    assert command == "serve" and parsed.api_key is None  # no key: no auth, as vLLM


def test_api_key_flag_wins_and_no_log_line_carries_a_key():
    config = cli.parse_serve([*STACK_ARGS, "--api-key", "sk-flag"], {"VLLM_API_KEY": "sk-env"})
    assert (config.api_key, config.api_key_source) == ("sk-flag", "--api-key")
    text = "\n".join(line for _, line in config.log_lines())
    assert "sk-flag" not in text and "sk-env" not in text and "required (--api-key)" in text


def test_gpu_flags_are_ignored_with_a_log_line_and_flags_vllm_lacks_are_refused():
    config = cli.parse_serve(
        ["/m", "--dtype", "bfloat16", "--enforce-eager", "--trust-remote-code",
         "--disable-log-requests", "--enable-prefix-caching", "--max_num_seqs=8",
         "--no-enable-prefix-caching", "-tp", "2"], {})
    assert config.ignored == ["--dtype bfloat16", "--enforce-eager", "--trust-remote-code",
                              "--disable-log-requests", "--enable-prefix-caching",
                              "--max-num-seqs 8", "--no-enable-prefix-caching", "-tp 2"]
    levels = [level for level, _ in config.log_lines()]
    assert levels.count("info") == 9
    # vLLM 0.11.0's argparse refuses what it does not have (issue 25: a wrong flag fails in the
    # lab): an invented flag, a flag of another engine, a flag vLLM removed, an extra word.
    for argv, refused in ((["/m", "--frobnicate", "7"], "--frobnicate 7"),
                          (["/m", "--num-shard", "2"], "--num-shard 2"),
                          (["/m", "--max-seq-len-to-capture", "8192"], "--max-seq-len-to-capture 8192"),
                          (["/m", "extra"], "extra")):
        with pytest.raises(cli.UsageError, match="vllm serve: error: unrecognized arguments: "
                                                 + re.escape(refused)):
            cli.parse_serve(argv, {})


@pytest.mark.parametrize("argv, expected", [
    (["/m", "--max-model-len=100"], 100),
    (["/m", "--max_model_len", "2k"], 2000),
    (["/m", "--max-model-len", "2K"], 2048),
    (["/m"], None),
])
def test_max_model_len_forms(argv, expected):
    assert cli.parse_serve(argv, {}).max_model_len == expected


@pytest.mark.parametrize("argv, message", [
    ([], "model"),
    (["--port", "8000"], "model"),
    (["/m", "--port", "eighty"], "invalid int"),
    (["/m", "--port", "70000"], "not a TCP port"),
    (["/m", "--max-model-len", "0"], "at least 1"),
    (["/m", "--served-model-name"], "expected a value"),
    (["vllm", "serve", "/m"], "ENTRYPOINT"),
])
def test_command_lines_that_cannot_be_served(argv, message):
    with pytest.raises(cli.UsageError, match=message):
        cli.parse_serve(argv, {})


def test_only_serve_and_version_exist():
    assert cli.parse_command(["--version"], {}) == ("version", VERSION)
    with pytest.raises(cli.UsageError, match="only `vllm serve`"):
        cli.parse_command(["bench", "x"], {})


def test_several_served_names():
    config = cli.parse_serve(["/m", "--served-model-name", "a", "b", "--port", "9"], {})
    assert config.served_model_names == ["a", "b"] and config.served_name == "a"


# ------------------------------------------------------------------ requests


def test_completion_defaults_are_vllms():
    request = protocol.validate_completion({"prompt": "hi"}, ["tiny-llama"])
    s = request.sampling
    assert request.model == "tiny-llama" and request.prompts == ["hi"]
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.n, s.stop, s.seed) == \
        (16, 1.0, 1.0, 0, 1, [], None)
    assert not request.stream and not request.include_usage


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
])
def test_bad_completion_requests_are_400_naming_the_parameter(body, param):
    with pytest.raises(protocol.APIError) as caught:
        protocol.validate_completion(body, ["tiny-llama"])
    assert caught.value.status == 400 and caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_another_model_is_404_with_vllms_error_shape():
    with pytest.raises(protocol.APIError) as caught:
        protocol.validate_chat({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
                               ["tiny-llama"])
    assert caught.value.status == 404
    assert caught.value.body() == {"error": {"message": "The model `gpt-4` does not exist.",
                                             "type": "NotFoundError", "param": "model",
                                             "code": 404}}


def test_prompt_forms_and_stops():
    r = protocol.validate_completion({"prompt": ["a", [1, 2]], "stop": ["x", ""]}, ["m"])
    assert r.prompts == ["a", [1, 2]] and r.sampling.stop == ["x"]
    assert protocol.validate_completion({"prompt": [5, 6], "stop": "y"}, ["m"]).prompts == [[5, 6]]
    assert protocol.validate_completion({"prompt": "p", "stop": "y"}, ["m"]).sampling.stop == ["y"]


def test_chat_request_flattens_text_parts_and_leaves_max_tokens_to_the_context():
    r = protocol.validate_chat({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 7, "stream": True, "stream_options": {"include_usage": True}},
        ["m"])
    assert [m["content"] for m in r.messages] == ["be brief", "a\nb"]
    assert r.sampling.max_tokens == 7 and r.stream and r.include_usage
    assert protocol.validate_chat({"messages": [{"role": "user", "content": "x"}]},
                                  ["m"]).sampling.max_tokens is None
    for bad in ([], [{"role": "robot", "content": "x"}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]):
        with pytest.raises(protocol.APIError):
            protocol.validate_chat({"messages": bad}, ["m"])


def test_context_length_checks():
    assert protocol.check_length(10, None, 64) == 54
    assert protocol.check_length(10, 54, 64) == 54
    with pytest.raises(protocol.APIError, match="maximum context length is 64 tokens"):
        protocol.check_length(10, 55, 64)
    with pytest.raises(protocol.APIError, match="your request has 64 input tokens"):
        protocol.check_length(64, 1, 64)


# ------------------------------------------------------------------ SSE and stop strings


def test_sse_framing():
    event = protocol.sse({"text": "é\n"})
    assert event == 'data: {"text":"é\\n"}\n\n'.encode()
    raw = event + protocol.sse({"a": 1}) + protocol.SSE_DONE
    assert protocol.parse_sse(raw) == [{"text": "é\n"}, {"a": 1}, "[DONE]"]
    with pytest.raises(ValueError):
        protocol.parse_sse(b"event: x\n\n")


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_before_it():
    stream = protocol.TextStream(["END"])
    sent = []
    for text in ["a", "ab", "abE", "abEN", "abENx", "abENxE", "abENxEN", "abENxEND", "abENxENDz"]:
        delta, stopped = stream.feed(text)
        sent.append(delta)
        if stopped:
            break
    assert "".join(sent) == "abENx" and stopped and stream.stop_reason == "END"
    assert stream.final == "abENx"
    keep = protocol.TextStream(["END"], include_stop=True)
    keep.feed("xEND")
    assert keep.final == "xEND"


def test_text_stream_waits_for_a_whole_utf8_character_and_flushes_at_the_end():
    stream = protocol.TextStream([])
    assert stream.feed("a\ufffd") == ("a", False)
    assert stream.feed("aé") == ("é", False)
    assert stream.feed("aé\ufffd") == ("", False)
    assert stream.finish("aé\ufffd") == "\ufffd" and stream.final == "aé\ufffd"


def test_chat_template_of_the_lab_model_renders_as_transformers_does():
    config = json.loads(hub_model.build_files()["tokenizer_config.json"])
    text = protocol.render_chat_template(config["chat_template"],
                                         [{"role": "user", "content": "hi"}], True,
                                         config["bos_token"], config["eos_token"])
    # transformers 5.17's apply_chat_template(..., tokenize=False) on the same files.
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(protocol.APIError, match="chat template: nope"):
        protocol.render_chat_template("{{ raise_exception('nope') }}", [], True)


# ------------------------------------------------------------------ the model files


def test_safetensors_header_and_config_of_the_lab_model():
    files = hub_model.build_files()
    blob = files["model.safetensors"]
    (size,) = struct.unpack("<Q", blob[:8])
    tensors, metadata = formats.parse_safetensors_header(blob[:8 + size], len(blob))
    assert metadata == {"format": "pt"}
    assert {name: info.shape for name, info in tensors.items()} == hub_model.tensor_shapes()
    assert max(info.end for info in tensors.values()) == len(blob)
    shape = formats.llama_shape(json.loads(files["config.json"]))
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim,
            shape.vocab, shape.rope_theta, shape.tie_word_embeddings) == \
        (64, 2, 4, 2, 16, 320, 10000.0, False)
    assert formats.eos_token_ids(json.loads(files["config.json"]),
                                 json.loads(files["generation_config.json"]), 257) == {257, 261}


def test_broken_safetensors_are_refused_with_the_reason():
    files = hub_model.build_files()
    blob = files["model.safetensors"]
    (size,) = struct.unpack("<Q", blob[:8])
    with pytest.raises(formats.ModelFormatError, match="past the end"):
        formats.parse_safetensors_header(blob[:8 + size], len(blob) - 4)
    header = json.loads(blob[8:8 + size])
    header["model.norm.weight"]["dtype"] = "I8"
    text = json.dumps(header).encode()
    with pytest.raises(formats.ModelFormatError, match="dtype I8"):
        formats.parse_safetensors_header(struct.pack("<Q", len(text)) + text, 10 ** 6)
    with pytest.raises(formats.ModelFormatError, match="Llama-shaped"):
        formats.llama_shape({"model_type": "gpt2"})


# ------------------------------------------------------------------ the ASGI app (fake engine)

BOS, EOS = 256, 257
SCRIPT = "Hello, world! This is the end."


class FakeEngine:
    """Byte tokens; 'generates' SCRIPT after any prompt, then EOS."""
    model_path, max_model_len, vocab_size, eos_token_ids = "/models/m", 64, 320, {EOS}

    def encode(self, text, add_special_tokens):
        return ([BOS] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def token_str(self, token):
        return self.decode([token])

    def chat_prompt(self, messages, add_generation_prompt, **kwargs):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def new_rng(self, seed):
        return seed

    def generate(self, prompt_ids, sampling, rng):
        for byte in SCRIPT.encode():
            yield byte, -0.5, [(byte, -0.5)]
        while True:
            yield EOS, -0.1, [(EOS, -0.1)]


def make_app(key: str | None = "sk-test") -> EngineApp:
    config = cli.parse_serve(["/models/m", "--served-model-name", "tiny"],
                             {"VLLM_API_KEY": key} if key else {})
    return EngineApp(config, FakeEngine(), workers=1, hostname="task-1")


def call(app, method, path, body=None, key="sk-test", headers=()):
    """(status, headers, body) of one request through the ASGI interface."""
    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    hdrs = list(headers) + ([(b"authorization", f"Bearer {key}".encode())] if key else [])
    sent = []

    async def run():
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        await app({"type": "http", "method": method, "path": path, "headers": hdrs},
                  receive, send)

    asyncio.run(run())
    start = sent[0]
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent[1:]))


def test_health_is_open_empty_and_every_answer_says_stand_in_and_task():
    app = make_app()
    status, headers, body = call(app, "GET", "/health", key=None)
    assert (status, body) == (200, b"")
    assert headers["x-lab-stand-in"] == STAND_IN == "gpufleet lab CPU engine"
    assert headers["x-engine-task"] == "task-1"
    assert call(app, "GET", "/version", key=None)[0] == 200
    status, headers, body = call(app, "GET", "/metrics", key=None)
    assert status == 200 and b"vllm:generation_tokens_total" in body
    app.ready = False
    assert call(app, "GET", "/health", key=None)[0] == 503


@pytest.mark.parametrize("headers", [(), ((b"authorization", b"Bearer wrong"),),
                                     ((b"authorization", b"Basic sk-test"),),
                                     ((b"authorization", b"sk-test"),)])
def test_v1_without_the_key_is_401_unauthorized(headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing")):
        status, _, body = call(make_app(), method, path, {"prompt": "x"}, key=None,
                               headers=headers)
        assert status == 401 and json.loads(body) == {"error": "Unauthorized"}


def test_no_key_configured_means_open_and_scheme_is_case_insensitive():
    assert call(make_app(key=None), "GET", "/v1/models", key=None)[0] == 200
    assert call(make_app(), "GET", "/v1/models", key=None,
                headers=[(b"authorization", b"bearer sk-test")])[0] == 200


def test_models_list_shape():
    status, _, body = call(make_app(), "GET", "/v1/models")
    data = json.loads(body)
    assert status == 200 and data["object"] == "list"
    (card,) = data["data"]
    assert {k: card[k] for k in ("id", "object", "owned_by", "root", "max_model_len")} == \
        {"id": "tiny", "object": "model", "owned_by": "vllm", "root": "/models/m",
         "max_model_len": 64}


def test_completion_length_stop_and_usage():
    app = make_app()
    status, _, body = call(app, "POST", "/v1/completions",
                           {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0})
    out = json.loads(body)
    assert status == 200 and out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["choices"][0]["text"] == "Hello" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9,
                            "prompt_tokens_details": None}
    out = json.loads(call(app, "POST", "/v1/completions",
                          {"prompt": "abc", "max_tokens": 40, "stop": ["world"]})[2])
    choice = out["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == \
        ("Hello, ", "stop", "world")
    out = json.loads(call(app, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 50})[2])
    choice = out["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == \
        (SCRIPT, "stop", None)
    assert out["usage"]["completion_tokens"] == len(SCRIPT) + 1  # EOS counts, as in vLLM
    out = json.loads(call(app, "POST", "/v1/completions",
                          {"prompt": "abc", "max_tokens": 3, "n": 2, "echo": True})[2])
    assert [c["text"] for c in out["choices"]] == ["abcHel", "abcHel"]
    assert [c["index"] for c in out["choices"]] == [0, 1]
    metrics = call(app, "GET", "/metrics", key=None)[2].decode()
    assert 'vllm:request_success_total{engine="0",model_name="tiny",finished_reason="stop"} 2' in metrics
    # 5 choices finished (2 stop, 3 length): vLLM's histograms count each, with every token
    assert "vllm:e2e_request_latency_seconds_count{engine=\"0\",model_name=\"tiny\"} 5" in metrics
    assert "vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"tiny\"} 5" in metrics
    itl = re.search(r'vllm:inter_token_latency_seconds_count\{engine="0",model_name="tiny"\} (\d+)', metrics)
    generated = re.search(r'vllm:generation_tokens_total\{engine="0",model_name="tiny"\} (\d+)', metrics)
    # every token after a choice's first is one inter-token interval
    assert int(itl.group(1)) == int(generated.group(1)) - 5, (itl.group(1), generated.group(1))


def test_completion_logprobs_shape():
    out = json.loads(call(make_app(), "POST", "/v1/completions",
                          {"prompt": "a", "max_tokens": 2, "logprobs": 1})[2])
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e"] and lp["token_logprobs"] == [-0.5, -0.5]
    assert lp["top_logprobs"] == [{"H": -0.5}, {"e": -0.5}] and lp["text_offset"] == [0, 1]


def test_streamed_completion_is_sse_ending_with_done_and_usage():
    status, headers, body = call(make_app(), "POST", "/v1/completions", {
        "prompt": "abc", "max_tokens": 12, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = protocol.parse_sse(body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello, world"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_streamed_chat_starts_with_the_role_and_stops_at_a_stop_string():
    status, _, body = call(make_app(), "POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stop": "This"})
    events = protocol.parse_sse(body)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello, world! "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == "This"
    assert "usage" not in chunks[0]


def test_chat_answer_shape_and_default_max_tokens_is_the_rest_of_the_context():
    status, _, body = call(make_app(), "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}]})
    out = json.loads(body)
    assert status == 200 and out["object"] == "chat.completion"
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == SCRIPT
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["prompt_tokens"] == len("<user>hi<assistant>")


def test_request_errors():
    app = make_app()
    status, _, body = call(app, "POST", "/v1/completions", {"model": "other", "prompt": "x"})
    assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
    status, _, body = call(app, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, body = call(app, "POST", "/v1/completions", {"prompt": "x" * 70})
    assert status == 400 and "maximum context length" in json.loads(body)["error"]["message"]
    status, _, body = call(app, "POST", "/v1/completions", {"prompt": [999]})
    assert status == 400 and "out of vocabulary" in json.loads(body)["error"]["message"]
    assert call(app, "GET", "/v1/completions")[0] == 405
    assert call(app, "GET", "/nothing", key=None)[0] == 404


# ------------------------------------------------------------------ structure and recipes


def test_pure_modules_import_neither_numpy_nor_tokenizers():
    code = ("import sys\n"
            "import scripts.lab.engine, scripts.lab.gateway\n"
            "from scripts.lab.engine.labengine import app, cli, formats, protocol\n"
            "bad = sorted({'numpy', 'tokenizers', 'uvicorn'} & set(sys.modules))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_engine_recipe_is_pinned_non_root_and_says_it_is_a_stand_in():
    files = [str(p) for p in engine_image.recipe_files()]
    assert {"Dockerfile", ".dockerignore", "requirements.txt", "labengine/app.py",
            "labengine/model.py", "labengine/__main__.py"} <= set(files)
    assert not any("__pycache__" in f for f in files)
    requirements = [line for line in
                    (engine_image.ENGINE_DIR / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert requirements and all("==" in line for line in requirements)
    dockerfile = (engine_image.ENGINE_DIR / "Dockerfile").read_text()
    assert "USER engine" in dockerfile and 'ENTRYPOINT ["vllm", "serve"]' in dockerfile
    assert "LAB STAND-IN" in dockerfile.split("org.opencontainers.image.description=")[1]
    # Dependencies before code.
    assert dockerfile.index("COPY --from=venv") < dockerfile.index("COPY labengine")


def test_gateway_recipe_is_laid_out_like_the_official_image():
    dockerfile = gateway.render_dockerfile()
    assert dockerfile.startswith("# gpu-fleet lab gateway: LAB STAND-IN")
    for line in ("STOPSIGNAL SIGUSR1", "USER haproxy", 'ENTRYPOINT ["docker-entrypoint.sh"]',
                 'CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]'):
        assert line in dockerfile
    assert "LAB STAND-IN" in dockerfile.split("org.opencontainers.image.description=")[1]
    assert "set -- haproxy -W -db" in gateway.ENTRYPOINT


def test_settings_point_the_stack_at_the_pushed_images():
    assert services.pushed_name("lab/vllm-openai", "gpufleet-lab-engine:0123456789ab") == \
        "lab/vllm-openai:0123456789ab"
    settings = services.stack_image_settings("172.29.1.4:5000/lab/vllm-openai:abc",
                                             "172.29.1.4:5000/lab/haproxy:def")
    assert settings == {"stack_engine_images": {"vllm": "172.29.1.4:5000/lab/vllm-openai:abc"},
                        "stack_gateway_image": "172.29.1.4:5000/lab/haproxy:def"}


def test_a_client_that_goes_away_stops_its_generation():
    app = make_app()
    steps = []

    class Counting(FakeEngine):
        def generate(self, prompt_ids, sampling, rng):
            for token in super().generate(prompt_ids, sampling, rng):
                steps.append(token)
                time.sleep(0.005)  # a forward step takes time
                yield token

    app.engine = Counting()
    sent = []

    async def run():
        messages = [{"type": "http.request", "more_body": False, "body": json.dumps(
            {"prompt": "x", "max_tokens": 30, "stream": True, "ignore_eos": True}).encode()}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app({"type": "http", "method": "POST", "path": "/v1/completions",
                   "headers": [(b"authorization", b"Bearer sk-test")]}, receive, send)

    asyncio.run(run())
    assert 0 < len(steps) < 30
    assert not any(m.get("body", b"").endswith(protocol.SSE_DONE) for m in sent)
    assert app.metrics.running == 0


def test_histograms_are_cumulative_with_vllms_buckets():
    from scripts.lab.engine.labengine import metrics as lm

    assert lm.one_two_five(100) == (1, 2, 5, 10, 20, 50, 100)  # vLLM's build_1_2_5_buckets doc
    histogram = lm.Histogram("vllm:x_seconds", "x.", (0.1, 1.0))
    for value in (0.05, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.render('model_name="m"')[2:] == [
        'vllm:x_seconds_bucket{model_name="m",le="0.1"} 1',
        'vllm:x_seconds_bucket{model_name="m",le="1.0"} 2',
        'vllm:x_seconds_bucket{model_name="m",le="+Inf"} 3',
        'vllm:x_seconds_sum{model_name="m"} 3.55',
        'vllm:x_seconds_count{model_name="m"} 3']
