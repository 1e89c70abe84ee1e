"""Model weights on the control machine: the Hub's listing of a pinned revision, one download
per run into the cache (`weights_cache_dir`) with the real huggingface_hub client, verified
against the Hub's own hashes, and the ledger of bytes from the Hub and to each host that the
phase reports at its end. Shared by every host's operation in the run (a lock per model
selection): the Hub is read once, whatever the fleet's size.

    outcome = fetch_to_cache(request)      # {"files_dir": ..., "manifest": ..., "hub_bytes": ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra import logger
from pyinfra.api import OperationError

from operations.weights_plan import (
    build_manifest, disk_refusal, files_to_fetch, hub_hash, human_bytes, listing_entry,
    read_token, render_sums, rev12, scrub, selection_key,
)


# --- The control machine: hub listing, download once per run, verification -----------------


@dataclass
class CacheLayout:
    root: Path  # <cache>/<repo_id>/<revision>
    selection: str

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def tree(self) -> Path:
        return self.root / "tree.json"

    @property
    def verified(self) -> Path:
        return self.root / "verified.json"

    @property
    def manifest(self) -> Path:
        return self.root / f"manifest-{self.selection}.json"

    @property
    def sums(self) -> Path:
        return self.root / f"sha256sums-{self.selection}"


def cache_layout(cache_dir: str, repo_id: str, revision: str, allow, ignore) -> CacheLayout:
    root = Path(cache_dir).expanduser() / repo_id / revision
    return CacheLayout(root, selection_key(repo_id, revision, allow, ignore))


def _hf():
    """The real client, imported on first use with telemetry off (no registry fetch from
    huggingface.co behind the configured endpoint's back) and no progress bars in pyinfra's
    output. An operator's own HF_HUB_DISABLE_TELEMETRY wins."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import huggingface_hub
        from huggingface_hub.utils import disable_progress_bars
    except ImportError as error:  # pragma: no cover - the environment is wrong
        raise OperationError(
            f"huggingface_hub is not installed on the control machine ({error}): install the "
            "pinned dependencies of pyproject.toml"
        ) from None
    disable_progress_bars()
    return huggingface_hub


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# One run, one process: listings and download outcomes are shared by every host.
_RUN_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple, threading.Lock] = {}
_LISTINGS: dict[tuple, list[dict[str, Any]]] = {}
_FETCHED: dict[tuple, dict[str, Any]] = {}


@dataclass
class Ledger:
    """Bytes moved by this run: from the hub (per model) and over the LAN (per host)."""

    hub: dict[str, int] = field(default_factory=dict)
    lan: dict[str, int] = field(default_factory=dict)
    lan_files: dict[str, int] = field(default_factory=dict)
    peers: dict[str, int] = field(default_factory=dict)  # bytes each host served to other hosts

    def record_chain(self, name: str, from_control: int = 0, served: int = 0, files: int = 0,
                     from_hub: int = 0, model: str = "") -> None:
        """A host's part in a chain (operations/weights_chain.py): bytes the control machine sent
        it (the head's one copy, else 0), bytes it sent on to other hosts, and bytes it read from
        the Hub itself (weights_source "seeder")."""
        with _RUN_LOCK:
            if from_control:
                self.lan[name] = self.lan.get(name, 0) + from_control
                self.lan_files[name] = self.lan_files.get(name, 0) + files
            if served:
                self.peers[name] = self.peers.get(name, 0) + served
            if from_hub:  # weights_source "seeder": a host read these from the Hub itself
                self.hub[model] = self.hub.get(model, 0) + from_hub

    def summary(self, hosts: list[str]) -> str:
        hub_total = sum(self.hub.values())
        per_model = ", ".join(f"{m} {human_bytes(b)}" for m, b in sorted(self.hub.items()))
        per_host = ", ".join(
            f"{h} {human_bytes(self.lan.get(h, 0))} ({self.lan_files.get(h, 0)} files)"
            for h in hosts
        )
        return (
            f"Model weights: hub bytes {hub_total} ({human_bytes(hub_total)}"
            f"{': ' + per_model if per_model else ''}); LAN bytes {sum(self.lan.values())}"
            f" ({per_host or 'no hosts'})"
            + (f"; between hosts {sum(self.peers.values())} ("
               + ", ".join(f"{h} {human_bytes(b)}" for h, b in sorted(self.peers.items())) + ")"
               if self.peers else "")
        )


LEDGER = Ledger()


def _key_lock(key: tuple) -> threading.Lock:
    with _RUN_LOCK:
        return _KEY_LOCKS.setdefault(key, threading.Lock())


def remote_listing(
    endpoint: str, repo_id: str, revision: str, token_file: str | None, cache_dir: str
) -> list[dict[str, Any]]:
    """Every file of a pinned revision (path, size, git blob id, LFS sha256): from this run's
    memory, else the control cache (a commit's tree never changes), else one hub request."""
    key = (endpoint, repo_id, revision)
    if key in _LISTINGS:
        return _LISTINGS[key]
    layout = cache_layout(cache_dir, repo_id, revision, None, None)
    if layout.tree.exists():
        try:
            listing = json.loads(layout.tree.read_text(encoding="utf-8"))["files"]
            _LISTINGS[key] = listing
            return listing
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry: ask the hub again
    hf = _hf()
    token = read_token(token_file)
    try:
        api = hf.HfApi(endpoint=endpoint, token=token)
        items = api.list_repo_tree(repo_id, revision=revision, recursive=True, token=token)
        listing = [
            listing_entry(i.path, i.size, i.blob_id, i.lfs.sha256 if i.lfs else None)
            for i in items
            if isinstance(i, hf.hf_api.RepoFile)
        ]
    except Exception as error:  # the client's errors: not found, auth, HTTP, network
        raise OperationError(
            f"cannot list {repo_id}@{rev12(revision)} on {endpoint}: "
            f"{scrub(_one_line(error), token)}"
        ) from None
    _LISTINGS[key] = listing
    return listing


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return " ".join(text.split())[:400]


def _bytes_on_disk(files_dir: Path, wanted: list[dict[str, Any]]) -> int:
    """Bytes of the wanted files already on disk (whole files of the right size, and partial
    downloads the client resumes)."""
    total = 0
    for entry in wanted:
        path = files_dir / entry["path"]
        if path.is_file() and path.stat().st_size == entry["size"]:
            total += entry["size"]
            continue
        partial_dir = files_dir / ".cache" / "huggingface" / "download" / posixpath.dirname(
            entry["path"]
        )
        if partial_dir.is_dir():
            for partial in partial_dir.glob("*.incomplete"):
                total += min(partial.stat().st_size, entry["size"])
    return min(total, sum(e["size"] for e in wanted))


def _hash_file(path: Path, entry: dict[str, Any]) -> tuple[str, str | None]:
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {entry['size']}\0".encode()) if not entry.get("lfs_sha256") else None
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            sha256.update(chunk)
            if git is not None:
                git.update(chunk)
    return sha256.hexdigest(), git.hexdigest() if git else None


def verify_cache_files(
    files_dir: Path, wanted: list[dict[str, Any]], verified: dict[str, Any]
) -> tuple[dict[str, str], list[str]]:
    """Check each wanted file in the control cache against the hub's hash. Returns
    ({path: sha256} of the good ones, [bad paths]). `verified` ({path: [size, mtime_ns,
    sha256]}) skips files hashed before and untouched since; it is updated in place."""
    good, bad = {}, []
    for entry in wanted:
        path = files_dir / entry["path"]
        if path.is_symlink() or not path.is_file():
            bad.append(entry["path"])
            continue
        st = path.stat()
        if st.st_size != entry["size"]:
            bad.append(entry["path"])
            continue
        seen = verified.get(entry["path"])
        if seen and seen[:2] == [st.st_size, st.st_mtime_ns] and seen[3:] == [hub_hash(entry)]:
            good[entry["path"]] = seen[2]
            continue
        sha256, git = _hash_file(path, entry)
        ok = sha256 == entry["lfs_sha256"] if entry.get("lfs_sha256") else git == entry["git_oid"]
        if ok:
            good[entry["path"]] = sha256
            verified[entry["path"]] = [st.st_size, st.st_mtime_ns, sha256, hub_hash(entry)]
        else:
            verified.pop(entry["path"], None)
            bad.append(entry["path"])
    return good, bad


def _forget_download(files_dir: Path, path: str) -> None:
    """Remove a bad file and the client's record of it, so that it is downloaded again."""
    (files_dir / path).unlink(missing_ok=True)
    meta = files_dir / ".cache" / "huggingface" / "download" / (path + ".metadata")
    meta.unlink(missing_ok=True)


def fetch_to_cache(request: dict[str, Any], free_bytes=None) -> dict[str, Any]:
    """Make the control cache hold the verified files, manifest and sha256sums of one model
    selection; download what is missing with the real client (resuming partial files). Once
    per run and selection, under a lock: other hosts wait and reuse the outcome, a failure
    included. Returns {"hub_bytes", "files", "bytes", "manifest", "sums"}."""
    key = (
        request["cache_dir"], request["repo_id"], request["revision"],
        json.dumps([request.get("allow_patterns"), request.get("ignore_patterns")]),
        bool(request.get("lfs_on_hosts")),
    )
    with _key_lock(key):
        if key in _FETCHED:
            outcome = _FETCHED[key]
            if "error" in outcome:
                raise OperationError(outcome["error"] + " (failed earlier in this run)")
            return dict(outcome, hub_bytes=0)
        try:
            outcome = _fetch_to_cache(request, free_bytes or _free_bytes)
        except OperationError as error:
            _FETCHED[key] = {"error": str(error)}
            raise
        _FETCHED[key] = outcome
        return outcome


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _fetch_to_cache(request: dict[str, Any], free_bytes) -> dict[str, Any]:
    repo_id, revision = request["repo_id"], request["revision"]
    allow, ignore = request.get("allow_patterns"), request.get("ignore_patterns")
    endpoint, cache_dir = request["endpoint"], request["cache_dir"]
    layout = cache_layout(cache_dir, repo_id, revision, allow, ignore)
    listing = remote_listing(endpoint, repo_id, revision, request.get("token_file"), cache_dir)
    wanted = files_to_fetch(listing, allow, ignore, f"{repo_id}@{rev12(revision)}")
    _write_json_atomic(layout.tree, {"repo_id": repo_id, "revision": revision, "files": listing})

    # weights_source = "seeder": the large (LFS) files come from the Hub to the chain's first
    # host, not here; the Hub's own sha256 of each is what the hosts check it against.
    on_hosts = [e for e in wanted if e.get("lfs_sha256")] if request.get("lfs_on_hosts") else []
    local_only = [e for e in wanted if e not in on_hosts]
    verified: dict[str, Any] = {}
    if layout.verified.exists():
        try:
            verified = json.loads(layout.verified.read_text(encoding="utf-8"))
        except ValueError:
            verified = {}
    good, bad = verify_cache_files(layout.files, local_only, verified)
    total = sum(e["size"] for e in wanted)
    hub_bytes = 0
    for attempt in range(2):
        if not bad:
            break
        if attempt:  # a second try for files whose content did not match: fetch them afresh
            for path in bad:
                _forget_download(layout.files, path)
        todo = [e for e in local_only if e["path"] in bad]
        before = _bytes_on_disk(layout.files, local_only)
        missing = sum(e["size"] for e in todo) - _bytes_on_disk(layout.files, todo)
        refusal = disk_refusal(
            f"the control machine's weights cache {layout.root}",
            free_bytes(layout.root),
            missing,
            int(request.get("margin_bytes", 0)),
        )
        if refusal:
            raise OperationError(refusal)
        token = read_token(request.get("token_file"))
        hf = _hf()
        logger.info(
            f"Model weights: downloading {len(todo)} file(s), {human_bytes(missing)} of "
            f"{repo_id}@{rev12(revision)} from {endpoint} into {layout.files}"
        )
        try:
            hf.snapshot_download(
                repo_id,
                revision=revision,
                local_dir=str(layout.files),
                allow_patterns=([e["path"] for e in local_only] if on_hosts else allow or None),
                ignore_patterns=None if on_hosts else ignore or None,
                endpoint=endpoint,
                token=token,
            )
        except Exception as error:  # the client's errors: not found, auth, HTTP, network, disk
            raise OperationError(
                f"download of {repo_id}@{rev12(revision)} from {endpoint} failed: "
                f"{scrub(_one_line(error), token)}; run again to resume"
            ) from None
        hub_bytes += max(_bytes_on_disk(layout.files, local_only) - before, 0)
        good, bad = verify_cache_files(layout.files, local_only, verified)
        _write_json_atomic(layout.verified, verified)
    if bad:
        for path in bad:
            _forget_download(layout.files, path)
        raise OperationError(
            f"{repo_id}@{rev12(revision)}: the hub sent {', '.join(bad)} twice with content "
            "that does not match the hub's own hash; removed from the cache, nothing was installed"
        )
    _write_json_atomic(layout.verified, verified)

    good.update({e["path"]: e["lfs_sha256"] for e in on_hosts})
    files = [dict(e, sha256=good[e["path"]]) for e in wanted]
    existing = None
    if layout.manifest.exists():
        try:
            existing = json.loads(layout.manifest.read_text(encoding="utf-8"))
        except ValueError:
            existing = None
    verified_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = build_manifest(repo_id, revision, allow, ignore, files, verified_at, endpoint)
    if existing and {k: v for k, v in existing.items() if k not in ("verified_at", "endpoint")} == {
        k: v for k, v in manifest.items() if k not in ("verified_at", "endpoint")
    }:
        manifest = existing  # same content: keep the first verification time
    else:
        _write_json_atomic(layout.manifest, manifest)
    _write_text_atomic(layout.sums, render_sums(manifest))
    return {
        "hub_bytes": hub_bytes,
        "files": len(files),
        "bytes": total,
        "manifest": str(layout.manifest),
        "sums": str(layout.sums),
    }


def fetch_command(state, host, request):
    """FunctionCommand body: fetch into the control cache once per run; never raises into
    pyinfra (a traceback would be noise): logs one line and fails this host."""
    try:
        outcome = fetch_to_cache(request)
    except OperationError as error:
        host.log_styled(f"Model weights: {error}", fg="red", log_func=logger.error)
        return False
    name = request["name"]
    if outcome["hub_bytes"]:
        LEDGER.hub[name] = LEDGER.hub.get(name, 0) + outcome["hub_bytes"]
        host.log_styled(
            f"Model weights: {name}: {human_bytes(outcome['hub_bytes'])} read from the hub into "
            f"the control cache, {outcome['files']} files verified against the hub's hashes",
            log_func=logger.info,
        )
    return True


def record_transfer(state, host, name, sent_bytes, sent_files):
    LEDGER.lan[host.name] = LEDGER.lan.get(host.name, 0) + sent_bytes
    LEDGER.lan_files[host.name] = LEDGER.lan_files.get(host.name, 0) + sent_files
    host.log_styled(
        f"Model weights: {name}: sent {sent_files} file(s), {human_bytes(sent_bytes)} over the LAN",
        log_func=logger.info,
    )
    return True
