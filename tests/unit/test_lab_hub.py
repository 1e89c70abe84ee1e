"""The lab's Hugging Face Hub stand-in (scripts/lab/hub): the tiny model, and the server driven by
the real `huggingface_hub` client on 127.0.0.1.

The client tests need huggingface_hub (pinned in pyproject.toml): without it they FAIL with a
message, they do not skip. All client traffic goes to a hub on loopback: HF_ENDPOINT and the
client's import-time constants point at it, so nothing reaches huggingface.co.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scripts.lab.hub import gitobjects, model, server, service

# Before huggingface_hub can be imported (it reads these once): loopback only, quiet.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)

REPO = model.REPO_ID
PINNED_CLIENT = "huggingface_hub==2.4.0"


# ------------------------------------------------------------------ the model

@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return model.build_files()


def test_model_is_deterministic_and_has_the_pinned_revision(files):
    again = model.build_files()
    assert again == files
    assert model.commit_sha(files) == model.EXPECTED_REVISION
    changed = dict(files, **{"config.json": files["config.json"] + b" "})
    assert model.commit_sha(changed) != model.EXPECTED_REVISION


def test_model_repository_is_small_and_says_it_is_a_stand_in(files):
    assert set(files) == {".gitattributes", "README.md", "config.json", "generation_config.json",
                          "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                          "tokenizer_config.json"}
    assert sum(map(len, files.values())) < 4 * 1024 * 1024
    card = files["README.md"].decode()
    assert "LAB STAND-IN" in card and "not from huggingface.co" in card


def test_safetensors_parses_back_with_the_llama_names_and_shapes_of_config(files):
    blob = files["model.safetensors"]
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert header_len % 8 == 0 and (8 + header_len) % 8 == 0
    metadata, tensors = model.read_safetensors(blob)
    assert metadata == {"format": "pt"}

    cfg = json.loads(files["config.json"])
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg["head_dim"]
    assert head_dim * cfg["num_attention_heads"] == h
    kv = cfg["num_key_value_heads"] * head_dim
    expected = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h],
                "lm_head.weight": [vocab, h]}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        expected.update({
            p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
        })
    assert {name: shape for name, (shape, _) in tensors.items()} == expected

    assert set(tensors["model.norm.weight"][1]) == {1.0}
    values = tensors["model.layers.1.mlp.down_proj.weight"][1]
    assert all(math.isfinite(v) and abs(v) < 0.035 for v in values)
    std = math.sqrt(sum(v * v for v in values) / len(values))
    assert 0.018 < std < 0.022
    assert tensors["lm_head.weight"][1] != tensors["model.embed_tokens.weight"][1]  # untied


def test_read_safetensors_rejects_a_header_that_does_not_cover_the_data(files):
    with pytest.raises(ValueError):
        model.read_safetensors(files["model.safetensors"] + b"\0\0\0\0")


def test_tokenizer_is_byte_level_and_consistent_with_config(files):
    cfg = json.loads(files["config.json"])
    tok = json.loads(files["tokenizer.json"])
    assert tok["model"]["type"] == "BPE" and tok["pre_tokenizer"]["type"] == "ByteLevel"
    vocab = tok["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(256)) and len(set(vocab)) == 256
    assert vocab["A"] == ord("A") and vocab["Ġ"] == ord(" ")  # GPT-2's byte alphabet
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    assert sorted(added) == list(range(256, cfg["vocab_size"]))
    tcfg = json.loads(files["tokenizer_config.json"])
    assert added[cfg["bos_token_id"]] == tcfg["bos_token"] == "<|begin_of_text|>"
    assert added[cfg["eos_token_id"][0]] == tcfg["eos_token"]
    assert added[cfg["pad_token_id"]] == tcfg["pad_token"]
    gen = json.loads(files["generation_config.json"])
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_write_repo_lays_out_revision_and_main_ref(tmp_path, files):
    rev = model.write_repo(tmp_path, files)
    assert (tmp_path / REPO / "refs" / "main").read_text() == rev
    assert (tmp_path / REPO / rev / "model.safetensors").read_bytes() == files["model.safetensors"]
    mtime = (tmp_path / REPO / rev / "config.json").stat().st_mtime_ns
    assert model.write_repo(tmp_path, files) == rev
    assert (tmp_path / REPO / rev / "config.json").stat().st_mtime_ns == mtime  # not rewritten


# ------------------------------------------------------------------ git naming

def test_git_ids_match_git():
    # `printf 'hello\n' | git hash-object --stdin`
    assert gitobjects.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    # a real `git commit` of a.txt="hello\n", d/b="x", author/committer "gpufleet lab
    # <lab@gpufleet.invalid>" at @1767225600 +0000, message "msg"
    assert gitobjects.commit_sha1({"a.txt": b"hello\n", "d/b": b"x"}, "msg", 1767225600) == \
        "d5f5d6f5aaeb033e19bd02e7d354ec2ed90b6844"


def test_lfs_by_gitattributes_and_pointer_format():
    patterns = gitobjects.lfs_patterns(gitobjects.HF_GITATTRIBUTES + "# *.json filter=lfs\n")
    assert gitobjects.is_lfs("model.safetensors", patterns)
    assert gitobjects.is_lfs("sub/dir/x.bin", patterns)
    assert not gitobjects.is_lfs("config.json", patterns)
    pointer = gitobjects.lfs_pointer(b"abc")
    assert pointer == (b"version https://git-lfs.github.com/spec/v1\noid sha256:"
                       + hashlib.sha256(b"abc").hexdigest().encode() + b"\nsize 3\n")
    entry = gitobjects.file_entry("w.bin", b"abc", lfs=True)
    assert entry["oid"] == gitobjects.git_blob_sha1(pointer)
    assert entry["lfs"] == {"oid": hashlib.sha256(b"abc").hexdigest(), "size": 3,
                            "pointerSize": len(pointer)}


# ------------------------------------------------------------------ server pure logic

@pytest.mark.parametrize("header,expected", [
    (None, None), ("bytes=0-9", (0, 9)), ("bytes=5-", (5, 99)), ("bytes=-10", (90, 99)),
    ("bytes=90-500", (90, 99)), ("bytes=100-", "unsatisfiable"), ("bytes=-0", "unsatisfiable"),
    ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=9-3", "unsatisfiable"),
])
def test_parse_range(header, expected):
    assert server.parse_range(header, 100) == expected


@pytest.mark.parametrize("path,expected", [
    ("/api/models/org/name/revision/main", ("info", "org/name", "main", "")),
    ("/api/models/org/name", ("info", "org/name", None, "")),
    ("/api/models/gpt2/revision/refs%2Fpr%2F1", ("info", "gpt2", "refs/pr/1", "")),
    ("/api/models/org/name/tree/abc?recursive=True", ("tree", "org/name", "abc", "")),
    ("/api/models/org/name/tree/main/sub/dir", ("tree", "org/name", "main", "sub/dir")),
    ("/api/models/org/name/paths-info/main", ("paths-info", "org/name", "main", "")),
    ("/org/name/resolve/main/sub/w.bin", ("resolve", "org/name", "main", "sub/w.bin")),
    ("/gpt2/resolve/main/config.json", ("resolve", "gpt2", "main", "config.json")),
    ("/org/name/resolve/main/a%20b.json", ("resolve", "org/name", "main", "a b.json")),
    ("/nothing/here", ("unknown", "", None, "")),
])
def test_parse_route(path, expected):
    r = server.parse_route(path)
    assert (r.kind, r.repo_id, r.revision, r.path) == expected


def test_faults_match_and_run_out():
    faults = [server.Fault.from_json({"mode": "drop", "file": "w.bin", "times": 2}),
              server.Fault.from_json({"mode": "500"})]
    assert server.take_fault(faults, "resolve", "HEAD", "w.bin").mode == "500"  # drop needs a GET
    assert faults == [faults[0]]
    assert server.take_fault(faults, "resolve", "GET", "other") is None
    assert server.take_fault(faults, "resolve", "GET", "w.bin").mode == "drop"
    assert server.take_fault(faults, "resolve", "GET", "w.bin").mode == "drop"
    assert faults == []
    for bad in ({"mode": "explode"}, {"mode": "429", "times": 0}, {"mode": "500", "x": 1},
                {"mode": "429", "method": "PUT"}, []):
        with pytest.raises(ValueError):
            server.Fault.from_json(bad)


def test_tree_listing_lists_directories_and_recursion(tmp_path):
    infos = {p: server.describe_file(p, c, p.endswith(".bin"), tmp_path / p)
             for p, c in {"a.json": b"{}", "d/w.bin": b"123", "d/e/f.txt": b"f"}.items()}
    top = server.tree_listing(infos, "", recursive=False)
    assert [(e["type"], e["path"]) for e in top] == [("directory", "d"), ("file", "a.json")]
    deep = server.tree_listing(infos, "", recursive=True)
    assert [e["path"] for e in deep] == ["d", "d/e", "a.json", "d/e/f.txt", "d/w.bin"]
    assert deep[-1]["lfs"]["oid"] == hashlib.sha256(b"123").hexdigest()
    assert server.tree_listing(infos, "nope", recursive=True) is None


# ------------------------------------------------------------------ the real client

@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, files) -> Path:
    root = tmp_path_factory.mktemp("hub")
    model.write_repo(root, files)
    return root


@pytest.fixture
def hf(monkeypatch):
    """The real huggingface_hub client; a failure (not a skip) when it is missing."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as e:  # pragma: no cover - the environment is wrong
        pytest.fail(f"huggingface_hub is not installed ({e}): it is pinned in pyproject.toml "
                    f"({PINNED_CLIENT}); install the pinned dependencies "
                    "(scripts/lab.py bootstrap)",
                    pytrace=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return huggingface_hub


def _start(monkeypatch, hf, root: Path, token: str | None = None) -> server.HubServer:
    hub = server.serve_in_thread(root, token=token)
    # Everything the client derives from HF_ENDPOINT at import time goes to this hub too.
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", hub.base_url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.base_url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
    # The client fetches an "agent harness" registry from the endpoint once per process and caches
    # it under HF_HOME: fetch it from this hub, cache it in the test's directory.
    from huggingface_hub.utils import _detect_agent
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(root.parent / "harnesses.json"))
    monkeypatch.setattr(_detect_agent, "_registry", None)
    return hub


@pytest.fixture
def hub(monkeypatch, hf, hub_root):
    h = _start(monkeypatch, hf, hub_root)
    yield h
    h.shutdown()
    h.server_close()


def _lab(hub: server.HubServer, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(hub.base_url + path, data=data,
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _download(hf, hub, local_dir: Path, tmp_path: Path, **kw) -> Path:
    return Path(hf.snapshot_download(REPO, revision=kw.pop("revision", "main"), local_dir=local_dir,
                                     cache_dir=tmp_path / "cache", endpoint=hub.base_url,
                                     token=kw.pop("token", False), **kw))


def test_snapshot_download_fetches_every_file_then_nothing_the_second_time(hf, hub, tmp_path,
                                                                          files):
    out = _download(hf, hub, tmp_path / "w", tmp_path)
    for name, content in files.items():
        assert (out / name).read_bytes() == content, name
    stats = _lab(hub, "/_lab/stats")
    assert stats["total_bytes"] == sum(map(len, files.values()))
    assert stats["files"][f"{REPO}/model.safetensors"] == len(files["model.safetensors"])
    assert stats["clients"]["127.0.0.1"]["bytes"] == stats["total_bytes"]
    assert all(e["path"].startswith(("/api/", f"/{REPO}/resolve/")) for e in stats["log"])

    _lab(hub, "/_lab/stats/reset", {})
    _download(hf, hub, tmp_path / "w", tmp_path)
    again = _lab(hub, "/_lab/stats")
    assert again["total_bytes"] == 0 and again["files"] == {}
    # an exact revision needs no request at all
    _lab(hub, "/_lab/stats/reset", {})
    _download(hf, hub, tmp_path / "w", tmp_path, revision=model.EXPECTED_REVISION)
    assert [e["path"] for e in _lab(hub, "/_lab/stats")["log"]] == ["/_lab/stats/reset"]


def test_allow_patterns_and_hf_hub_download(hf, hub, tmp_path, files):
    out = _download(hf, hub, tmp_path / "w", tmp_path, allow_patterns=["*.json"])
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        n for n in files if n.endswith(".json"))
    path = hf.hf_hub_download(REPO, "model.safetensors", revision=model.EXPECTED_REVISION,
                              cache_dir=tmp_path / "cache", endpoint=hub.base_url, token=False)
    assert Path(path).read_bytes() == files["model.safetensors"]


def test_dropped_connection_resumes_with_range(monkeypatch, hf, hub, tmp_path, files):
    # The client resumes from what it has written, in DOWNLOAD_CHUNK_SIZE pieces (10 MiB in 2.4.0:
    # a drop within the first 10 MiB restarts at 0). Smaller pieces show the Range resume here.
    monkeypatch.setattr(hf.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    size = len(files["model.safetensors"])
    _lab(hub, "/_lab/faults", {"mode": "drop", "file": "model.safetensors", "times": 1})
    out = _download(hf, hub, tmp_path / "w", tmp_path, allow_patterns=["model.safetensors"])
    assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]
    stats = _lab(hub, "/_lab/stats")
    gets = [e for e in stats["log"] if e["method"] == "GET" and e["path"].endswith(".safetensors")]
    assert [(e["status"], e["bytes"]) for e in gets[:1]] == [(200, size // 2)]
    assert len(gets) == 2 and gets[1]["status"] == 206
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= size // 2 and gets[1]["bytes"] == size - resumed_at
    assert stats["faults"] == {"drop": 1}


def test_500_on_a_file_surfaces_as_the_clients_http_error(hf, hub, tmp_path):
    _lab(hub, "/_lab/faults", {"mode": "500", "file": "model.safetensors", "method": "GET"})
    with pytest.raises(hf.errors.HfHubHTTPError) as err:
        _download(hf, hub, tmp_path / "w", tmp_path, allow_patterns=["model.safetensors"])
    assert err.value.response.status_code == 500
    assert not (tmp_path / "w" / "model.safetensors").exists()


def test_429_on_the_api_surfaces_and_429_on_a_file_is_retried_after_retry_after(hf, hub, tmp_path,
                                                                               files):
    _lab(hub, "/_lab/faults", {"mode": "429"})  # the first hub request: the revision lookup
    with pytest.raises(hf.errors.LocalEntryNotFoundError) as err:
        _download(hf, hub, tmp_path / "w", tmp_path)
    cause = err.value.__cause__
    assert isinstance(cause, hf.errors.HfHubHTTPError) and cause.response.status_code == 429
    assert cause.response.headers["Retry-After"] == "1"

    _lab(hub, "/_lab/faults", {"mode": "429", "file": "config.json", "method": "GET",
                               "retry_after": 0})
    out = _download(hf, hub, tmp_path / "w2", tmp_path, allow_patterns=["config.json"])
    assert (out / "config.json").read_bytes() == files["config.json"]
    gets = [e["status"] for e in _lab(hub, "/_lab/stats")["log"]
            if e["method"] == "GET" and e["path"].endswith("/config.json")]
    assert gets == [429, 200]


def test_a_corrupted_byte_is_caught_by_sha256_against_the_lfs_oid(hf, hub, tmp_path, files):
    _lab(hub, "/_lab/faults", {"mode": "corrupt", "file": "model.safetensors"})
    out = _download(hf, hub, tmp_path / "w", tmp_path, allow_patterns=["model.safetensors"])
    got = (out / "model.safetensors").read_bytes()
    assert len(got) == len(files["model.safetensors"]) and got != files["model.safetensors"]

    api = hf.HfApi(endpoint=hub.base_url, token=False)
    [info] = api.get_paths_info(REPO, ["model.safetensors"], revision="main")
    assert info.lfs.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert hashlib.sha256(got).hexdigest() != info.lfs.sha256
    report = api.verify_repo_checksums(REPO, revision="main", local_dir=out)
    assert [m["path"] for m in report.mismatches] == ["model.safetensors"]


def test_unknown_revision_and_repo_raise_the_clients_errors(hf, hub, tmp_path):
    with pytest.raises(hf.errors.RevisionNotFoundError):
        _download(hf, hub, tmp_path / "w", tmp_path, revision="no-such-branch")
    with pytest.raises(hf.errors.RepositoryNotFoundError):
        hf.snapshot_download("gpufleet-lab/no-such-model", local_dir=tmp_path / "x",
                             cache_dir=tmp_path / "cache", endpoint=hub.base_url, token=False)
    with pytest.raises(hf.errors.RemoteEntryNotFoundError):
        hf.hf_hub_download(REPO, "nope.json", revision="main", local_dir=tmp_path / "y",
                           endpoint=hub.base_url, token=False)


def test_token_is_required_when_configured(monkeypatch, hf, hub_root, tmp_path, files):
    hub = _start(monkeypatch, hf, hub_root, token="lab-token-123")
    try:
        with pytest.raises(hf.errors.HfHubHTTPError) as wrong:
            _download(hf, hub, tmp_path / "a", tmp_path, token="not-the-token")
        assert wrong.value.response.status_code == 401
        with pytest.raises(hf.errors.RepositoryNotFoundError) as missing:
            _download(hf, hub, tmp_path / "b", tmp_path, token=False)
        assert missing.value.response.status_code == 401
        out = _download(hf, hub, tmp_path / "c", tmp_path, token="lab-token-123")
        assert (out / "config.json").read_bytes() == files["config.json"]
    finally:
        hub.shutdown()
        hub.server_close()


def test_every_response_says_it_is_a_stand_in(hub_root):
    hub = server.serve_in_thread(hub_root)
    try:
        _check_stand_in_headers(hub)
    finally:
        hub.shutdown()
        hub.server_close()


def _check_stand_in_headers(hub: server.HubServer) -> None:
    with urllib.request.urlopen(hub.base_url + "/", timeout=10) as r:
        assert r.headers["X-Lab-Stand-In"] == "gpu-fleet lab hub, not huggingface.co"
        assert "not huggingface.co" in r.headers["Server"]
        assert b"not huggingface.co" in r.read()
    for path in ("nope", "..%2F..%2F..%2Fetc%2Fpasswd", "../refs/main"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(hub.base_url + f"/{REPO}/resolve/main/{path}", timeout=10)
        assert err.value.code == 404 and err.value.headers["X-Lab-Stand-In"]
        assert err.value.headers["X-Error-Code"] == "EntryNotFound"



# ------------------------------------------------------------------ the hub's image


def test_hub_image_is_the_shared_base_with_python3():
    lines = service.render_dockerfile().splitlines()
    assert "ARG BASE" in lines and "FROM ${BASE}" in lines
    assert " && apt-get install -y --no-install-recommends python3 \\" in lines
    # The server runs as `python3 -m scripts.lab.hub.server` from the mounted code.
    assert "WORKDIR /opt/gpufleet" in lines
    assert service.IN_CONTAINER_CODE == "/opt/gpufleet/scripts/lab/hub"
    # Shared by every lab and purged with the lab's image cache (images.lab_images).
    assert service.IMAGE_NAME == "gpufleet-lab-hub"
    assert service.container_name("gpulab") == "gpulab-hub"
