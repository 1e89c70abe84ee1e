"""Model weights (operations/weights.py): the pure planning, and the control machine's download
driven by the real huggingface_hub client against the lab's hub stand-in on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

# Before huggingface_hub can be imported anywhere in this process: loopback only, quiet.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from pyinfra.api import OperationError  # noqa: E402

from operations import weights, weights_cache, weights_plan  # noqa: E402

REV = "4eab0cd005a1f7148f5d417d86428a174a186129"
REPO = "gpufleet-lab/tiny-llama"


def entry(path, size, oid="a" * 40, lfs=None):
    return weights_plan.listing_entry(path, size, oid, lfs)


LISTING = [
    entry(".gitattributes", 10),
    entry("config.json", 100, "c" * 40),
    entry("model-00001.safetensors", 5000, "p" * 40, "1" * 64),
    entry("model-00002.safetensors", 6000, "q" * 40, "2" * 64),
    entry("original/consolidated.pth", 9000, "r" * 40, "3" * 64),
    entry("tokenizer.json", 300, "t" * 40),
]


# ------------------------------------------------------------------ pure logic


def test_select_files_uses_the_hubs_pattern_rules():
    paths = lambda **kw: [e["path"] for e in weights_plan.select_files(LISTING, **kw)]  # noqa: E731
    assert paths() == sorted(e["path"] for e in LISTING)
    assert paths(allow_patterns=["*.json", "*.safetensors"]) == [
        "config.json", "model-00001.safetensors", "model-00002.safetensors", "tokenizer.json"]
    # a trailing slash names a directory, as in huggingface_hub
    assert paths(ignore_patterns=["original/", ".git*"]) == [
        "config.json", "model-00001.safetensors", "model-00002.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("path", ["../etc/passwd", "/abs", "a/../b", "a\\b", "x\ny",
                                  ".gpufleet-manifest.json", "dir/"])
def test_select_files_refuses_paths_it_would_not_create(path):
    with pytest.raises(ValueError, match="will not create"):
        weights_plan.select_files([entry(path, 1)])


def test_files_to_fetch_refuses_an_empty_selection_or_a_bad_path_naming_the_model():
    assert len(weights_plan.files_to_fetch(LISTING, ["*.json"], None, "model tiny")) >= 2
    with pytest.raises(OperationError, match="^model tiny: no file of the revision matches"):
        weights_plan.files_to_fetch(LISTING, ["*.gguf"], None, "model tiny")
    with pytest.raises(OperationError, match="^model tiny: .*will not create"):
        weights_plan.files_to_fetch([entry("../etc/passwd", 1)], None, None, "model tiny")


@pytest.mark.parametrize("revision",
                         ["main", "4eab0cd0", "4EAB0CD005A1F7148F5D417D86428A174A186129"])
def test_revision_must_be_a_pinned_commit(revision):
    with pytest.raises(OperationError, match="40-hex commit"):
        weights_plan.check_model_spec("tiny", REPO, revision)


def _manifest(files, **over):
    data = weights_plan.build_manifest(REPO, REV, [], [], files, "2026-01-01T00:00:00Z", "http://hub")
    data.update(over)
    return data


def _with_sha(entries):
    return [dict(e, sha256=format(i, "064x")) for i, e in enumerate(entries)]


def _state(manifest=None, files=None, sha=None, staging=None, rejected=(), dir="present"):
    return {"dir": dir, "login_user": "ops", "avail_bytes": 10 * weights_plan.GIB,
            "manifest": manifest, "manifest_error": None, "files": files or {},
            "sha256": sha or {}, "staging": staging or {}, "rejected": list(rejected), "stale": []}


def _installed(entries, mode="0644", owner="0:0"):
    files = {".": {"type": "d", "size": 4096, "mode": "0755", "owner": "0:0"}}
    for e in entries:
        parts = e["path"].split("/")
        for depth in range(1, len(parts)):
            files["/".join(parts[:depth])] = {"type": "d", "size": 4096, "mode": "0755",
                                              "owner": "0:0"}
        files[e["path"]] = {"type": "f", "size": e["size"], "mode": mode, "owner": owner}
    for own in (weights_plan.MANIFEST_NAME, weights_plan.SUMS_NAME):
        files[own] = {"type": "f", "size": 1, "mode": "0644", "owner": "0:0"}
    return files


def test_an_intact_copy_has_no_problems_and_each_defect_is_named():
    files = _with_sha(LISTING)
    manifest = _manifest(files)
    installed = _installed(files)
    sha = {f["path"]: f["sha256"] for f in files}
    ok = _state(manifest, installed, sha)
    assert weights_plan.installed_problems(ok, REPO, REV, [], [], "sha256") == ([], [])

    truncated = dict(installed, **{"config.json": dict(installed["config.json"], size=1)})
    problems, _ = weights_plan.installed_problems(_state(manifest, truncated), REPO, REV, [], [], "size")
    assert problems == ["config.json has 1 bytes, the manifest says 100"]

    flipped = dict(sha, **{"tokenizer.json": "f" * 64})
    st = _state(manifest, installed, flipped)
    assert weights_plan.installed_problems(st, REPO, REV, [], [], "size") == ([], [])  # size: blind
    assert weights_plan.installed_problems(st, REPO, REV, [], [], "sha256")[0] == [
        "tokenizer.json does not match its sha256"]

    extra = dict(installed, **{"evil.safetensors": {"type": "f", "size": 1, "mode": "0644",
                                                    "owner": "0:0"}})
    assert weights_plan.installed_problems(_state(manifest, extra), REPO, REV, [], [], "size")[0] == [
        "unexpected file evil.safetensors"]
    link = dict(installed, **{"config.json": dict(installed["config.json"], type="l")})
    assert "config.json is not a plain file" in weights_plan.installed_problems(
        _state(manifest, link), REPO, REV, [], [], "size")[0]

    other = "b" * 40
    problems, _ = weights_plan.installed_problems(ok, REPO, other, [], [], "size")
    assert problems == [f"holds {REPO}@{REV[:12]}, wanted {REPO}@{other[:12]}"]
    assert weights_plan.installed_problems(ok, REPO, REV, ["*.json"], [], "size")[0] == [
        "the allow/ignore patterns changed"]

    loose = _installed(files, mode="0600", owner="1000:1000")
    problems, perms = weights_plan.installed_problems(_state(manifest, loose), REPO, REV, [], [], "size")
    assert problems == [] and "config.json is 1000:1000 0600" in perms


def test_plan_resumes_staging_links_what_the_host_has_and_sends_the_rest():
    old = _with_sha(LISTING)
    manifest = _manifest(old, revision="b" * 40)
    installed = _installed(old)
    # the new revision changes one shard and the config; the rest is byte-identical
    new = [dict(e) for e in LISTING]
    new[1] = entry("config.json", 101, "d" * 40)
    new[3] = entry("model-00002.safetensors", 6000, "q" * 40, "9" * 64)
    staging = {"tokenizer.json": {"type": "f", "size": 300, "mode": "0644", "owner": "1000:0"},
               "model-00002.safetensors": {"type": "f", "size": 17, "mode": "0644",
                                           "owner": "1000:0"},  # cut off mid-upload
               "leftover.bin": {"type": "f", "size": 5, "mode": "0644", "owner": "1000:0"}}
    plan = weights_plan.plan_host(_state(manifest, installed, staging=staging), new, "size")
    assert plan.keep == ["tokenizer.json"]
    assert plan.link == [(".gitattributes", ".gitattributes"),
                         ("model-00001.safetensors", "model-00001.safetensors"),
                         ("original/consolidated.pth", "original/consolidated.pth")]
    assert [e["path"] for e in plan.send] == ["config.json", "model-00002.safetensors"]
    assert plan.send_bytes == 6101
    assert plan.remove == ["leftover.bin"]
    assert plan.subdirs == ["original"]


def test_plan_never_links_a_file_the_last_verification_rejected():
    files = _with_sha(LISTING)
    state = _state(_manifest(files, revision="b" * 40), _installed(files),
                   rejected=["model-00001.safetensors"])
    plan = weights_plan.plan_host(state, LISTING, "size")
    assert "model-00001.safetensors" in [e["path"] for e in plan.send]
    # with sha256 verification a file whose hash differs from its manifest is not a source
    sha = {f["path"]: f["sha256"] for f in files}
    sha["original/consolidated.pth"] = "0" * 64
    plan = weights_plan.plan_host(_state(_manifest(files, revision="b" * 40), _installed(files), sha),
                             LISTING, "sha256")
    assert "original/consolidated.pth" in [e["path"] for e in plan.send]


def test_disk_refusal_names_the_numbers():
    assert weights_plan.disk_refusal("/opt/models", 10 * weights_plan.GIB, weights_plan.GIB, weights_plan.GIB) is None
    why = weights_plan.disk_refusal("/opt/models", weights_plan.GIB, 2 * weights_plan.GIB, weights_plan.GIB)
    assert why == ("not enough free disk on /opt/models: 1.0 GiB free, 2.0 GiB to write + "
                   "1.0 GiB margin")
    assert "could not read" in weights_plan.disk_refusal("/opt/models", None, 1, 0)


def test_token_comes_from_the_file_or_the_environment_and_is_scrubbed(tmp_path):
    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_secret123\n")
    assert weights_plan.read_token(str(token_file), {}) == "hf_secret123"
    assert weights_plan.read_token(None, {"HF_TOKEN": "hf_env"}) == "hf_env"
    assert weights_plan.read_token(None, {}) is False
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(OperationError, match="is empty"):
        weights_plan.read_token(str(tmp_path / "empty"), {})
    assert weights_plan.scrub("401 for hf_secret123", "hf_secret123") == "401 for ***"


def test_parse_model_state_reads_every_section():
    manifest = _manifest(_with_sha(LISTING[:2]))
    lines = ["#@state", "login_user=ops", "avail_kib=100", "dir=present", "#@manifest",
             *json.dumps(manifest, indent=2).splitlines(), "", "#@files",
             "d 4096 755 0:0 ", "f 10 644 0:0 .gitattributes", "#@sha256",
             f"{'a' * 64}  .gitattributes", "#@staging", "f 3 600 1000:1000 config.json",
             "#@rejected", "config.json", "#@stale", "tiny.old"]
    state = weights_plan.parse_model_state(lines)
    assert state["avail_bytes"] == 102400 and state["login_user"] == "ops"
    assert state["manifest"] == manifest
    assert state["files"]["."]["type"] == "d"
    assert state["files"][".gitattributes"] == {"type": "f", "size": 10, "mode": "0644",
                                                "owner": "0:0"}
    assert state["sha256"] == {".gitattributes": "a" * 64}
    assert state["staging"]["config.json"]["owner"] == "1000:1000"
    assert state["rejected"] == ["config.json"] and state["stale"] == ["tiny.old"]
    broken = weights_plan.parse_model_state(["#@state", "dir=present", "#@manifest", "{oops"])
    assert broken["manifest"] is None and broken["manifest_error"].startswith("invalid JSON")


def test_models_for_host_follows_groups():
    models = [{"name": "a", "groups": ["gpu_nodes"]}, {"name": "b", "groups": ["big"]},
              {"name": "c"}]
    assert [m["name"] for m in weights.models_for_host(models, ["prod", "gpu_nodes"])] == ["a", "c"]
    assert [m["name"] for m in weights.models_for_host(models, ["big"])] == ["b"]


# ------------------------------------------------------------------ the hub stand-in


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    from scripts.lab.hub import model

    root = tmp_path_factory.mktemp("hub")
    assert model.write_repo(root) == REV
    return root


@pytest.fixture
def hub(hub_root, monkeypatch):
    from scripts.lab.hub import server

    h = server.serve_in_thread(hub_root, token="hf_lab_token_0123456789")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield h
    h.shutdown()
    h.server_close()


@pytest.fixture(autouse=True)
def fresh_run(monkeypatch):
    """Each test is one pyinfra run: the per-run memory starts empty."""
    monkeypatch.setattr(weights_cache, "_LISTINGS", {})
    monkeypatch.setattr(weights_cache, "_FETCHED", {})
    monkeypatch.setattr(weights_cache, "LEDGER", weights_cache.Ledger())


def _stats(hub, reset=False):
    import urllib.request

    req = urllib.request.Request(hub.base_url + ("/_lab/stats/reset" if reset else "/_lab/stats"),
                                 data=b"{}" if reset else None, method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _fault(hub, **body):
    import urllib.request

    req = urllib.request.Request(hub.base_url + "/_lab/faults", data=json.dumps(body).encode(),
                                 method="POST")
    urllib.request.urlopen(req, timeout=10).close()


def _request(tmp_path, hub, token_file, **over):
    return dict({"name": "tiny", "repo_id": REPO, "revision": REV, "endpoint": hub.base_url,
                 "cache_dir": str(tmp_path / "cache"), "allow_patterns": [],
                 "ignore_patterns": [], "token_file": str(token_file), "margin_bytes": 0}, **over)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "hf-token"
    path.write_text("hf_lab_token_0123456789\n")
    path.chmod(0o600)
    return path


def test_download_once_verify_and_manifest_then_nothing_the_next_run(tmp_path, hub, token_file,
                                                                     monkeypatch):
    from scripts.lab.hub import model

    files = model.build_files()
    request = _request(tmp_path, hub, token_file)
    outcome = weights_cache.fetch_to_cache(request)
    total = sum(map(len, files.values()))
    assert outcome["hub_bytes"] == total == outcome["bytes"]
    assert _stats(hub)["total_bytes"] == total

    manifest = json.loads(Path(outcome["manifest"]).read_text())
    assert manifest["repo_id"] == REPO and manifest["revision"] == REV
    assert {f["path"]: f["size"] for f in manifest["files"]} == {
        p: len(b) for p, b in files.items()}
    import hashlib

    for f in manifest["files"]:
        assert f["sha256"] == hashlib.sha256(files[f["path"]]).hexdigest()
    sums = Path(outcome["sums"]).read_text()
    assert sums.count("\n") == len(files)
    layout = weights_cache.cache_layout(request["cache_dir"], REPO, REV, [], [])
    subprocess.run(["sha256sum", "--quiet", "-c", str(outcome["sums"])], cwd=layout.files,
                   check=True)
    # plain files, no cache symlinks
    assert not any(p.is_symlink() for p in layout.files.rglob("*"))

    # the other hosts of the same run: no request at all
    _stats(hub, reset=True)
    again = weights_cache.fetch_to_cache(request)
    assert again["hub_bytes"] == 0
    assert _stats(hub)["requests"] == 1  # the reset itself

    # the next run (fresh process memory): the cache is verified, the hub is not read
    monkeypatch.setattr(weights_cache, "_LISTINGS", {})
    monkeypatch.setattr(weights_cache, "_FETCHED", {})
    _stats(hub, reset=True)
    assert weights_cache.fetch_to_cache(request)["hub_bytes"] == 0
    assert _stats(hub)["total_bytes"] == 0
    assert json.loads(Path(outcome["manifest"]).read_text())["verified_at"] == manifest[
        "verified_at"]


def test_with_a_seeder_the_control_machine_reads_only_the_small_files(tmp_path, hub, token_file):
    """weights_source "seeder": LFS files come from the hub to a host; the manifest still names
    every file with the sha256 the host will be checked against (the hub's own LFS oid)."""
    import hashlib

    from scripts.lab.hub import model

    files = model.build_files()
    outcome = weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file, lfs_on_hosts=True))
    small = sum(len(b) for p, b in files.items() if p != "model.safetensors")
    assert outcome["hub_bytes"] == small == _stats(hub)["total_bytes"]
    layout = weights_cache.cache_layout(str(tmp_path / "cache"), REPO, REV, [], [])
    assert not (layout.files / "model.safetensors").exists()
    manifest = json.loads(Path(outcome["manifest"]).read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        p: hashlib.sha256(b).hexdigest() for p, b in files.items()}


def test_the_phase_summary_adds_what_hosts_sent_each_other_and_read_from_the_hub():
    ledger = weights_cache.Ledger()
    ledger.record_chain("node-1", from_control=0, served=100, from_hub=100, model="tiny")
    ledger.record_chain("node-2", from_control=0, served=0)
    assert ledger.summary(["node-1", "node-2"]) == (
        "Model weights: hub bytes 100 (100 B: tiny 100 B); LAN bytes 0 (node-1 0 B (0 files), "
        "node-2 0 B (0 files)); between hosts 100 (node-1 100 B)")


def test_a_corrupted_byte_from_the_hub_is_caught_and_fetched_again(tmp_path, hub, token_file):
    _fault(hub, mode="corrupt", file="model.safetensors", times=1)
    outcome = weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file))
    stats = _stats(hub)
    assert stats["faults"].get("corrupt") == 1
    size = stats["files"][f"{REPO}/model.safetensors"]
    assert size == 2 * 535904  # sent twice: once corrupted, once good
    assert outcome["hub_bytes"] >= 535904


def test_corruption_every_time_fails_without_leaving_the_bad_file(tmp_path, hub, token_file):
    _fault(hub, mode="corrupt", file="config.json", times=5)
    with pytest.raises(OperationError, match="does not match the hub's own hash"):
        weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file))
    layout = weights_cache.cache_layout(str(tmp_path / "cache"), REPO, REV, [], [])
    assert not (layout.files / "config.json").exists()
    # the other hosts of this run fail at once, without asking the hub again
    before = _stats(hub)["requests"]
    with pytest.raises(OperationError, match="failed earlier in this run"):
        weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file))
    assert _stats(hub)["requests"] == before + 1  # this stats request only


def test_an_interrupted_download_resumes(tmp_path, hub, token_file, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    _fault(hub, mode="drop", file="model.safetensors", times=1)
    outcome = weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file))
    log = [e for e in _stats(hub)["log"] if e["path"].endswith("model.safetensors")
           and e["method"] == "GET"]
    assert any(e["status"] == 206 for e in log), log  # the client resumed with Range
    assert outcome["files"] == 8


def test_the_token_never_reaches_logs_or_errors(tmp_path, hub, token_file, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file))
    # a wrong token: the client's 401 error is reported, the token is not
    bad = tmp_path / "bad-token"
    bad.write_text("hf_wrong_token_987654\n")
    weights_cache._LISTINGS.clear()
    weights_cache._FETCHED.clear()
    with pytest.raises(OperationError) as error:
        weights_cache.fetch_to_cache(_request(tmp_path, hub, bad, cache_dir=str(tmp_path / "c2")))
    assert "401" in str(error.value) or "Invalid credentials" in str(error.value)
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, str(error.value)):
        assert "hf_lab_token_0123456789" not in text
        assert "hf_wrong_token_987654" not in text
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert b"hf_lab_token" not in path.read_bytes(), path


def test_refuses_when_the_control_cache_lacks_space(tmp_path, hub, token_file):
    with pytest.raises(OperationError, match="not enough free disk on the control machine"):
        weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file), free_bytes=lambda p: 1000)
    assert _stats(hub)["total_bytes"] == 0


def test_the_listing_for_planning_comes_from_the_hub_once_then_from_the_cache(tmp_path, hub,
                                                                               token_file):
    listing = weights_cache.remote_listing(hub.base_url, REPO, REV, str(token_file),
                                     str(tmp_path / "cache"))
    lfs = {e["path"]: e["lfs_sha256"] for e in listing}
    assert lfs["model.safetensors"] and not lfs["config.json"]
    weights_cache.fetch_to_cache(_request(tmp_path, hub, token_file))
    weights_cache._LISTINGS.clear()
    _stats(hub, reset=True)
    assert weights_cache.remote_listing("http://127.0.0.1:9", REPO, REV, None,
                                  str(tmp_path / "cache")) == listing
    assert _stats(hub)["requests"] == 1


def test_the_phase_summary_names_hub_and_lan_bytes_per_host():
    ledger = weights_cache.Ledger(hub={"tiny": 569911}, lan={"node-1": 569911}, lan_files={"node-1": 8})
    assert ledger.summary(["node-1", "node-2"]) == (
        "Model weights: hub bytes 569911 (556.6 KiB: tiny 556.6 KiB); LAN bytes 569911 "
        "(node-1 556.6 KiB (8 files), node-2 0 B (0 files))")


# ------------------------------------------------------------------ the host's finalize script


def _stage(models: Path, files: dict[str, bytes], sums_from: dict[str, bytes]) -> Path:
    import hashlib

    stage = Path(weights_plan.staging_dir(str(models), "tiny", REV))
    stage.mkdir(parents=True)
    for path, data in files.items():
        (stage / path).parent.mkdir(parents=True, exist_ok=True)
        (stage / path).write_bytes(data)
    (stage / weights_plan.SUMS_NAME).write_text("".join(
        f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, data in sums_from.items()))
    (stage / weights_plan.MANIFEST_NAME).write_text("{}")
    return stage


def _run_finalize(models: Path, stale=()) -> subprocess.CompletedProcess:
    command = weights._finalize_command(str(models), "tiny", REV, list(stale)).get_raw_value()
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the script chowns to root, as it does under sudo")
def test_finalize_swaps_a_verified_copy_in_and_keeps_the_old_one_on_a_mismatch(tmp_path):
    models = tmp_path / "models"
    live = models / "tiny"
    live.mkdir(parents=True)
    (live / "config.json").write_text("old")
    good = {"config.json": b"new", "sub/w.bin": b"weights"}

    # a byte changed in transit: the live copy stays, the bad file leaves staging and is named
    stage = _stage(models, dict(good, **{"sub/w.bin": b"weightz"}), good)
    result = _run_finalize(models)
    assert result.returncode != 0 and "sub/w.bin" in result.stderr
    assert (live / "config.json").read_text() == "old"
    assert (stage / weights_plan.REJECTED_NAME).read_text() == "sub/w.bin\n"
    assert not (stage / "sub/w.bin").exists() and (stage / "config.json").exists()

    # the next run re-sent it: verified, swapped in, root-owned 0644/0755, old copy and stale gone
    (stage / "sub/w.bin").write_bytes(b"weights")
    stale = models / ".staging" / "tiny-0123456789ab"
    stale.mkdir()
    result = _run_finalize(models, ["tiny-0123456789ab"])
    assert result.returncode == 0, result.stderr
    assert (live / "config.json").read_text() == "new"
    assert (live / "sub/w.bin").read_bytes() == b"weights"
    assert not (live / weights_plan.REJECTED_NAME).exists()
    assert oct((live / "sub/w.bin").stat().st_mode & 0o777) == "0o644"
    assert oct((live / "sub").stat().st_mode & 0o777) == "0o755"
    assert not stage.exists() and not stale.exists()
    assert sorted(p.name for p in (models / ".staging").iterdir()) == []
