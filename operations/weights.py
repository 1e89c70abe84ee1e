"""Model weights: every model a host serves is a verified, plain-file copy at
<models_dir>/<name>/ before any engine starts; never downloaded at container start.

Once per fleet, not once per host: the control machine (where pyinfra runs) downloads a pinned
revision once per run with the real `huggingface_hub` client into its cache
(`weights_cache_dir`), verifies every file against the hub's own hashes (LFS sha256, or the git
blob sha1 of small files), and writes the manifest. Each host then receives over SSH only the
files it lacks, into <models_dir>/.staging/<name>-<rev12>/ (owned by the deploy user, so SFTP
writes there directly: no copy through /tmp), checks them with `sha256sum -c`, and the staging
directory replaces the model directory (the older good copy is moved aside only once the new one
is verified, then removed). Files a host already holds (an older revision, a staging directory
left by an interrupted run) are hard-linked or kept, never sent again.

The HF token (env HF_TOKEN, or the file named by `hf_token_file` on the control machine) is read
in-process on the control machine only, at the moment the hub is asked: it is never an argument
of an operation or a command, never printed, never written anywhere, never sent to a host.

On every host: <models_dir>/<name>/.gpufleet-manifest.json (repo, revision, patterns, files with
sizes, sha256 and hub hashes, time of verification) and .gpufleet-sha256sums (`sha256sum -c`).
A host whose manifest names the wanted repo, revision and patterns, and whose files match it
(sizes, or sha256 with `weights_verify = "sha256"`), is done: no hub request, no transfer.

Remote commands on a run that changes nothing: one `ModelState` read per model and host, once
while planning and once while executing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra import host, logger
from pyinfra.api import (
    FactBase,
    FileUploadCommand,
    FunctionCommand,
    OperationError,
    QuoteString,
    StringCommand,
    deploy,
    operation,
)
from pyinfra.api.state import BaseStateCallback

from operations.phase import explain, fails_only_this_host

MANIFEST_NAME = ".gpufleet-manifest.json"
SUMS_NAME = ".gpufleet-sha256sums"
REJECTED_NAME = ".gpufleet-rejected"
OWN_FILES = (MANIFEST_NAME, SUMS_NAME, REJECTED_NAME)
STAGING_DIR = ".staging"
MANIFEST_FORMAT = 1

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
GIB = 1024**3
DEFAULT_ENDPOINT = "https://huggingface.co"
VERIFY_MODES = ("size", "sha256")


# --- Pure logic -----------------------------------------------------------------------------


def rev12(revision: str) -> str:
    return revision[:12]


def staging_dir(models_dir: str, name: str, revision: str) -> str:
    return posixpath.join(models_dir, STAGING_DIR, f"{name}-{rev12(revision)}")


def old_dir(models_dir: str, name: str) -> str:
    return posixpath.join(models_dir, STAGING_DIR, f"{name}.old")


def check_model_spec(name: str, repo_id: str, revision: str) -> None:
    """Refuse what cannot be deployed safely (config.py validates the same, earlier)."""
    if not NAME_RE.match(name or ""):
        raise OperationError(
            f"model name {name!r}: expected letters, digits, '.', '_' or '-' (a directory name)"
        )
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$", repo_id or ""):
        raise OperationError(f"model {name}: repo_id {repo_id!r} is not 'owner/name'")
    if not COMMIT_RE.match(revision or ""):
        raise OperationError(
            f"model {name}: revision {revision!r} is not a 40-hex commit id; pin the commit "
            "(a branch such as 'main' moves, and every host must hold the same bytes)"
        )


def safe_repo_path(path: str) -> bool:
    """A hub path we are willing to create on a host: relative, no '..', printable, no
    backslash (sha256sum escapes those), not one of our own file names."""
    if not path or path.startswith("/") or "\\" in path or path.endswith("/"):
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return False
    return parts[0] not in OWN_FILES and not parts[0].startswith(".gpufleet")


def _add_wildcard(pattern: str) -> str:
    # huggingface_hub's rule: a pattern naming a directory ("original/") matches inside it.
    return pattern + "*" if pattern.endswith("/") else pattern


def select_files(
    listing: list[dict[str, Any]],
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The files of a revision that a model wants, with huggingface_hub's pattern semantics
    (fnmatch; a trailing '/' names a directory), sorted by path. Raises ValueError on a path
    that is unsafe to create on a host."""
    allow = [_add_wildcard(p) for p in allow_patterns] if allow_patterns else None
    ignore = [_add_wildcard(p) for p in ignore_patterns] if ignore_patterns else []
    selected = []
    for entry in listing:
        path = entry["path"]
        if allow is not None and not any(fnmatch.fnmatch(path, p) for p in allow):
            continue
        if any(fnmatch.fnmatch(path, p) for p in ignore):
            continue
        if not safe_repo_path(path):
            raise ValueError(f"the repository holds a path this deploy will not create: {path!r}")
        selected.append(entry)
    return sorted(selected, key=lambda e: e["path"])


def listing_entry(path: str, size: int, blob_id: str, lfs_sha256: str | None) -> dict[str, Any]:
    """One file of a revision as the hub describes it: git blob id, and sha256 when LFS."""
    return {"path": path, "size": int(size), "git_oid": blob_id, "lfs_sha256": lfs_sha256}


def hub_hash(entry: dict[str, Any]) -> str:
    """The hub's identity for a file's content: sha256 for LFS files, git blob sha1 otherwise."""
    return f"sha256:{entry['lfs_sha256']}" if entry.get("lfs_sha256") else f"git:{entry['git_oid']}"


def selection_key(repo_id: str, revision: str, allow: list[str] | None, ignore: list[str] | None):
    blob = json.dumps([repo_id, revision, allow or None, ignore or None], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def manifest_identity(manifest: dict[str, Any]) -> tuple:
    return (
        manifest.get("repo_id"),
        manifest.get("revision"),
        list(manifest.get("allow_patterns") or []),
        list(manifest.get("ignore_patterns") or []),
    )


def build_manifest(
    repo_id: str,
    revision: str,
    allow: list[str] | None,
    ignore: list[str] | None,
    files: list[dict[str, Any]],
    verified_at: str,
    endpoint: str,
) -> dict[str, Any]:
    """The manifest kept next to the weights. `files`: listing entries plus their sha256."""
    return {
        "format": MANIFEST_FORMAT,
        "repo_id": repo_id,
        "revision": revision,
        "allow_patterns": list(allow or []),
        "ignore_patterns": list(ignore or []),
        "endpoint": endpoint,
        "verified_at": verified_at,
        "total_size": sum(f["size"] for f in files),
        "files": [
            {
                "path": f["path"],
                "size": f["size"],
                "sha256": f["sha256"],
                "hub_hash": hub_hash(f),
            }
            for f in sorted(files, key=lambda f: f["path"])
        ],
    }


def render_sums(manifest: dict[str, Any]) -> str:
    return "".join(f"{f['sha256']}  {f['path']}\n" for f in manifest["files"])


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# Remote listing of a directory: "<type> <size> <mode> <uid>:<gid> <relative path>".
_LISTING_RE = re.compile(r"^(\S) (\d+) ([0-7]+) (\d+):(\d+) ?(.*)$")


def _parse_entries(lines: list[str]) -> dict[str, dict[str, Any]]:
    entries = {}
    for line in lines:
        match = _LISTING_RE.match(line)
        if not match:
            continue
        kind, size, mode, uid, gid, path = match.groups()
        entries[path or "."] = {
            "type": kind,
            "size": int(size),
            "mode": mode[-4:].rjust(4, "0"),
            "owner": f"{uid}:{gid}",
        }
    return entries


def parse_model_state(lines: list[str]) -> dict[str, Any]:
    """Parse the ModelState fact output (sections introduced by '#@<name>' lines)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith("#@") and line[2:].isalnum():
            current = line[2:]
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(line)

    info = dict(
        line.split("=", 1) for line in sections.get("state", []) if "=" in line
    )
    manifest, manifest_error = None, None
    text = "\n".join(sections.get("manifest", [])).strip()
    if text:
        try:
            manifest = json.loads(text)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
                manifest, manifest_error = None, "not a manifest object"
        except ValueError as error:
            manifest_error = f"invalid JSON: {error}"

    hashes = {}
    for line in sections.get("sha256", []):
        digest, sep, path = line.partition("  ")
        if sep and HEX64_RE.match(digest):
            hashes[path] = digest

    avail = info.get("avail_kib", "")
    return {
        "dir": info.get("dir", "missing"),
        "login_user": info.get("login_user", ""),
        "avail_bytes": int(avail) * 1024 if avail.isdigit() else None,
        "manifest": manifest,
        "manifest_error": manifest_error,
        "files": _parse_entries(sections.get("files", [])),
        "sha256": hashes,
        "staging": _parse_entries(sections.get("staging", [])),
        "rejected": sorted({line for line in sections.get("rejected", []) if line}),
        "stale": sorted({line for line in sections.get("stale", []) if line}),
    }


def installed_problems(
    state: dict[str, Any],
    repo_id: str,
    revision: str,
    allow: list[str] | None,
    ignore: list[str] | None,
    verify: str,
) -> tuple[list[str], list[str]]:
    """Why the model directory on a host is not the wanted, intact copy: (content problems,
    ownership/permission problems). Both empty: nothing to do."""
    if state["dir"] == "missing":
        return ["not installed"], []
    if state["dir"] != "present":
        return [f"the model path is a {state['dir']}, not a directory"], []
    manifest = state["manifest"]
    if manifest is None:
        why = state["manifest_error"] or "absent"
        return [f"no usable manifest ({why})"], []
    wanted = (repo_id, revision, list(allow or []), list(ignore or []))
    have = manifest_identity(manifest)
    if have != wanted:
        if have[:2] != wanted[:2]:
            return [f"holds {have[0]}@{str(have[1])[:12]}, wanted {repo_id}@{rev12(revision)}"], []
        return ["the allow/ignore patterns changed"], []

    problems: list[str] = []
    files = state["files"]
    expected_dirs = {"."}
    for entry in manifest["files"]:
        path = entry["path"]
        parts = path.split("/")
        for depth in range(1, len(parts)):
            expected_dirs.add("/".join(parts[:depth]))
        found = files.get(path)
        if found is None:
            problems.append(f"{path} is missing")
        elif found["type"] != "f":
            problems.append(f"{path} is not a plain file")
        elif found["size"] != entry["size"]:
            problems.append(f"{path} has {found['size']} bytes, the manifest says {entry['size']}")
        elif verify == "sha256" and state["sha256"].get(path) != entry["sha256"]:
            problems.append(f"{path} does not match its sha256")
    known = {e["path"] for e in manifest["files"]} | expected_dirs | set(OWN_FILES)
    for path, found in sorted(files.items()):
        if path not in known:
            problems.append(f"unexpected {'directory' if found['type'] == 'd' else 'file'} {path}")

    perms: list[str] = []
    for path, found in sorted(files.items()):
        want_mode = "0755" if found["type"] == "d" else "0644"
        if found["type"] in ("d", "f") and (found["owner"] != "0:0" or found["mode"] != want_mode):
            perms.append(f"{path} is {found['owner']} {found['mode']}")
    return problems, perms


@dataclass
class HostPlan:
    """What one host needs for one model, decided from its ModelState and the wanted files."""

    keep: list[str] = field(default_factory=list)  # already in staging, right size
    link: list[tuple[str, str]] = field(default_factory=list)  # (path in current dir, new path)
    send: list[dict[str, Any]] = field(default_factory=list)  # wanted entries to upload
    remove: list[str] = field(default_factory=list)  # staging entries to delete first
    subdirs: list[str] = field(default_factory=list)

    @property
    def send_bytes(self) -> int:
        return sum(e["size"] for e in self.send)


def plan_host(state: dict[str, Any], wanted: list[dict[str, Any]], verify: str) -> HostPlan:
    """Which wanted files a host keeps from its staging directory (resume), links from its
    current copy (same hub hash and size, still intact as far as `verify` can tell), and must be
    sent. A path the last verification rejected is always sent again."""
    plan = HostPlan()
    rejected = set(state["rejected"])
    staging = state["staging"]
    current = state["files"]
    manifest = state["manifest"] or {}
    reusable: dict[tuple[str, int], str] = {}
    if state["dir"] == "present":
        for entry in manifest.get("files", []):
            found = current.get(entry["path"])
            if not found or found["type"] != "f" or found["size"] != entry["size"]:
                continue
            if verify == "sha256" and state["sha256"].get(entry["path"]) != entry.get("sha256"):
                continue
            reusable.setdefault((entry.get("hub_hash", ""), entry["size"]), entry["path"])

    wanted_paths = set()
    for entry in wanted:
        path = entry["path"]
        wanted_paths.add(path)
        parts = path.split("/")
        for depth in range(1, len(parts)):
            sub = "/".join(parts[:depth])
            if sub not in plan.subdirs:
                plan.subdirs.append(sub)
        in_staging = staging.get(path)
        source = reusable.get((hub_hash(entry), entry["size"]))
        if path in rejected:
            plan.send.append(entry)
        elif in_staging and in_staging["type"] == "f" and in_staging["size"] == entry["size"]:
            plan.keep.append(path)
        elif source is not None:
            plan.link.append((source, path))
        else:
            plan.send.append(entry)

    needed_dirs = set(plan.subdirs) | {"."}
    for path, found in sorted(staging.items()):
        if path in wanted_paths and found["type"] == "f":
            continue
        if path in needed_dirs and found["type"] == "d" or path in OWN_FILES:
            continue
        if not any(path.startswith(p + "/") for p in plan.remove):
            plan.remove.append(path)
    return plan


def disk_refusal(where: str, avail: int | None, needed: int, margin: int) -> str | None:
    """Why a filesystem cannot take `needed` more bytes and keep `margin` free, or None."""
    if avail is None:
        return f"could not read the free space of {where}"
    if avail < needed + margin:
        return (
            f"not enough free disk on {where}: {human_bytes(avail)} free, "
            f"{human_bytes(needed)} to write + {human_bytes(margin)} margin"
        )
    return None


def read_token(token_file: str | None, environ=os.environ) -> str | bool:
    """The HF token from `token_file` (control machine) or HF_TOKEN; False: send none (the
    client then never reads a token of its own, such as one stored by `hf auth login`)."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise OperationError(
                f"hf_token_file {path}: cannot read it ({error.strerror})"
            ) from None
        if not token:
            raise OperationError(f"hf_token_file {path} is empty")
        return token
    return environ.get("HF_TOKEN", "").strip() or False


def scrub(text: str, token: str | bool) -> str:
    """A message with the token (if any) masked: client errors must never carry it out."""
    return text.replace(token, "***") if isinstance(token, str) and token else text


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
    try:
        wanted = select_files(listing, allow, ignore)
    except ValueError as error:
        raise OperationError(f"{repo_id}@{rev12(revision)}: {error}") from None
    if not wanted:
        raise OperationError(f"{repo_id}@{rev12(revision)}: no file matches the patterns")
    _write_json_atomic(layout.tree, {"repo_id": repo_id, "revision": revision, "files": listing})

    verified: dict[str, Any] = {}
    if layout.verified.exists():
        try:
            verified = json.loads(layout.verified.read_text(encoding="utf-8"))
        except ValueError:
            verified = {}
    good, bad = verify_cache_files(layout.files, wanted, verified)
    total = sum(e["size"] for e in wanted)
    hub_bytes = 0
    for attempt in range(2):
        if not bad:
            break
        if attempt:  # a second try for files whose content did not match: fetch them afresh
            for path in bad:
                _forget_download(layout.files, path)
        todo = [e for e in wanted if e["path"] in bad]
        before = _bytes_on_disk(layout.files, wanted)
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
                allow_patterns=allow or None,
                ignore_patterns=ignore or None,
                endpoint=endpoint,
                token=token,
            )
        except Exception as error:  # the client's errors: not found, auth, HTTP, network, disk
            raise OperationError(
                f"download of {repo_id}@{rev12(revision)} from {endpoint} failed: "
                f"{scrub(_one_line(error), token)}; run again to resume"
            ) from None
        hub_bytes += max(_bytes_on_disk(layout.files, wanted) - before, 0)
        good, bad = verify_cache_files(layout.files, wanted, verified)
        _write_json_atomic(layout.verified, verified)
    if bad:
        for path in bad:
            _forget_download(layout.files, path)
        raise OperationError(
            f"{repo_id}@{rev12(revision)}: the hub sent {', '.join(bad)} twice with content "
            "that does not match the hub's own hash; removed from the cache, nothing was installed"
        )
    _write_json_atomic(layout.verified, verified)

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


def _fetch_command(state, host, request):
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


def _record_command(state, host, name, sent_bytes, sent_files):
    LEDGER.lan[host.name] = LEDGER.lan.get(host.name, 0) + sent_bytes
    LEDGER.lan_files[host.name] = LEDGER.lan_files.get(host.name, 0) + sent_files
    host.log_styled(
        f"Model weights: {name}: sent {sent_files} file(s), {human_bytes(sent_bytes)} over the LAN",
        log_func=logger.info,
    )
    return True


# --- Facts ----------------------------------------------------------------------------------

# POSIX sh + GNU find/coreutils; never fails. $1 model dir, $2 its staging dir, $3 verify mode,
# $4 the models directory, $5 the model name (stale staging entries are listed by name).
_STATE_SCRIPT = r"""
d=$1; s=$2; verify=$3; models=$4; name=$5
echo '#@state'
echo "login_user=${SUDO_USER:-$(id -un)}"
p=$models; while [ ! -e "$p" ]; do p=$(dirname "$p"); done
df -Pk "$p" 2>/dev/null | awk 'NR==2 {print "avail_kib=" $4}'
if [ -L "$d" ]; then echo dir=symlink
elif [ -d "$d" ]; then echo dir=present
elif [ -e "$d" ]; then echo dir=file
else echo dir=missing; fi
echo '#@manifest'
if [ -d "$d" ] && [ ! -L "$d" ] && [ -f "$d/.gpufleet-manifest.json" ]; then
  cat "$d/.gpufleet-manifest.json"; echo
fi
echo '#@files'
if [ -d "$d" ] && [ ! -L "$d" ]; then find "$d" -printf '%y %s %m %U:%G %P\n'; fi
echo '#@sha256'
if [ "$verify" = sha256 ] && [ -d "$d" ] && [ ! -L "$d" ]; then
  (cd "$d" && find . -type f ! -name '.gpufleet-*' -printf '%P\0' | xargs -0r sha256sum --)
fi
echo '#@staging'
if [ -d "$s" ] && [ ! -L "$s" ]; then find "$s" -mindepth 1 -printf '%y %s %m %U:%G %P\n'; fi
echo '#@rejected'
if [ -f "$s/.gpufleet-rejected" ]; then cat "$s/.gpufleet-rejected"; fi
echo '#@stale'
if [ -d "$models/.staging" ]; then
  for e in "$models/.staging/$name".old "$models/.staging/$name"-????????????; do
    [ -e "$e" ] && [ "$e" != "$s" ] && basename "$e"
  done
fi
exit 0
"""


class ModelState(FactBase):
    """One model on a host, in one round trip: its directory (every entry with type, size, mode
    and numeric owner), its manifest, sha256 of its files when `verify` is "sha256", the staging
    directory of the wanted revision (resume), files the last verification rejected, stale
    staging entries of this model, the free space of the models filesystem, and the login user
    (who owns the staging directory so SFTP can write into it).

    .. code:: python

        {
            "dir": "present",  # or "missing", "symlink", "file"
            "login_user": "ops",
            "avail_bytes": 107374182400,
            "manifest": {"repo_id": "...", "revision": "...", "files": [...]},
            "manifest_error": None,
            "files": {"config.json": {"type": "f", "size": 612, "mode": "0644", "owner": "0:0"}},
            "sha256": {"config.json": "3f0c..."},
            "staging": {},
            "rejected": [],
            "stale": ["llama.old"],
        }
    """

    def command(
        self, models_dir: str, model_name: str, revision: str, verify: str = "size"
    ) -> StringCommand:
        return StringCommand(
            "sh", "-c", QuoteString(_STATE_SCRIPT), "weights",
            QuoteString(posixpath.join(models_dir, model_name)),
            QuoteString(staging_dir(models_dir, model_name, revision)),
            QuoteString(verify), QuoteString(models_dir), QuoteString(model_name),
        )

    def process(self, output):
        return parse_model_state(output)


# --- Operations -----------------------------------------------------------------------------


def _finalize_command(models_dir: str, name: str, revision: str, stale: list[str]) -> StringCommand:
    """Verify the staging directory against the manifest's sha256, then make it the model:
    root-owned, 0644/0755, swapped in (the old copy moved aside first, removed after)."""
    stage = staging_dir(models_dir, name, revision)
    target = posixpath.join(models_dir, name)
    old = old_dir(models_dir, name)
    script = (
        'cd "$1" || exit 1; '
        f"if ! out=$(sha256sum -c {SUMS_NAME} 2>/dev/null); then "
        "printf '%s\\n' \"$out\" | sed -n 's/: FAILED.*$//p' > "
        f"{REJECTED_NAME}; "
        f"while IFS= read -r f; do rm -f -- \"$f\"; done < {REJECTED_NAME}; "
        "echo \"sha256 mismatch after transfer (removed from staging, the next run sends them "
        f"again): $(tr '\\n' ' ' < {REJECTED_NAME})\" >&2; exit 1; fi; "
        f"rm -f {REJECTED_NAME}; "
        "chown -R 0:0 . && find . -type d -exec chmod 0755 {} + "
        "&& find . -type f -exec chmod 0644 {} + && cd / "
        '&& rm -rf -- "$3" && if [ -e "$2" ]; then mv -T -- "$2" "$3"; fi '
        '&& mv -T -- "$1" "$2" && rm -rf -- "$3"'
    )
    parts: list[Any] = [
        "sh", "-c", QuoteString(script), "weights",
        QuoteString(stage), QuoteString(target), QuoteString(old),
    ]
    if stale:
        parts += ["&& rm -rf --"] + [
            QuoteString(posixpath.join(models_dir, STAGING_DIR, entry)) for entry in stale
        ]
    return StringCommand(*parts)


@operation()
@fails_only_this_host
def model(
    model_name: str,
    repo_id: str,
    revision: str,
    models_dir: str,
    cache_dir: str,
    endpoint: str = DEFAULT_ENDPOINT,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    token_file: str | None = None,
    verify: str = "size",
    free_margin_gb: int = 1,
    listing: list[dict] | None = None,
):
    """
    Provision one model's weights at ``<models_dir>/<name>/``: plain files, root-owned,
    0644/0755 (any engine container can read them through a read-only mount), with a manifest
    and a sha256sums file beside them.

    A host whose manifest names this repo, revision and patterns, and whose files match it (by
    size, or by sha256 with ``verify="sha256"``), gets no command and the hub is not asked.
    Otherwise: the control machine fetches the revision once per run into ``cache_dir`` and
    verifies it against the hub's hashes; the host gets only the files it lacks into its staging
    directory, verifies all of them with ``sha256sum -c``, and the staging directory replaces the
    model directory. A host without room for the files it needs is refused before anything is
    written.

    + model_name: directory name under models_dir
    + repo_id: Hugging Face repository, e.g. "meta-llama/Llama-3.1-8B-Instruct"
    + revision: the pinned 40-hex commit id
    + models_dir: the models directory on the host
    + cache_dir: the control machine's weights cache
    + endpoint: hub base URL
    + allow_patterns, ignore_patterns: huggingface_hub patterns selecting files
    + token_file: control-machine file holding the HF token (None: env HF_TOKEN, or no token)
    + verify: "size" (cheap, every run) or "sha256" (re-reads every byte on the host)
    + free_margin_gb: GiB that must stay free on the host (and on the cache) after the transfer
    + listing: the revision's files (``listing_entry`` dicts); None: asked of the control cache
      or the hub, only when this host needs work

    **Example:**

    .. code:: python

        model(
            name="Model tiny-llama",
            model_name="tiny-llama",
            repo_id="gpufleet-lab/tiny-llama",
            revision="4eab0cd005a1f7148f5d417d86428a174a186129",
            models_dir="/opt/models",
            cache_dir="~/.cache/gpufleet/weights",
        )
    """
    name = model_name
    check_model_spec(name, repo_id, revision)
    if verify not in VERIFY_MODES:
        raise OperationError(f"verify {verify!r}: expected one of {', '.join(VERIFY_MODES)}")
    allow = list(allow_patterns or [])
    ignore = list(ignore_patterns or [])
    label = f"{name} ({repo_id}@{rev12(revision)})"

    state = host.get_fact(
        ModelState, models_dir=models_dir, model_name=name, revision=revision, verify=verify
    )
    target = posixpath.join(models_dir, name)
    stale = list(state["stale"])
    problems, perms = installed_problems(state, repo_id, revision, allow, ignore, verify)

    if not problems:
        manifest = state["manifest"]
        if perms:
            explain(f"model {label}: ownership or mode: {'; '.join(perms[:5])}")
            yield StringCommand(
                "chown -R 0:0", QuoteString(target),
                "&& find", QuoteString(target), "-type d -exec chmod 0755 {} +",
                "&& find", QuoteString(target), "-type f -exec chmod 0644 {} +",
            )
        if stale:
            yield StringCommand(
                "rm -rf --",
                *[QuoteString(posixpath.join(models_dir, STAGING_DIR, e)) for e in stale],
            )
        if not perms and not stale:
            checked = "sha256" if verify == "sha256" else "sizes"
            host.noop(
                f"model {label} is in place: {len(manifest['files'])} files, "
                f"{human_bytes(manifest.get('total_size', 0))}, {checked} match the manifest"
            )
        return

    explain(f"model {label}: {'; '.join(problems)}")
    if state["dir"] not in ("present", "missing"):
        raise OperationError(
            f"{target} is a {state['dir']}, not a directory: move it away by hand (the deploy "
            "replaces only directories it can verify)"
        )
    if listing is None:
        listing = remote_listing(endpoint, repo_id, revision, token_file, cache_dir)
    try:
        wanted = select_files(listing, allow, ignore)
    except ValueError as error:
        raise OperationError(f"model {label}: {error}") from None
    if not wanted:
        raise OperationError(f"model {label}: no file of the revision matches the patterns")

    plan = plan_host(state, wanted, verify)
    margin = free_margin_gb * GIB
    refusal = disk_refusal(
        f"{models_dir} on this host", state["avail_bytes"], plan.send_bytes, margin
    )
    if refusal:
        raise OperationError(f"model {label}: {refusal}")

    layout = cache_layout(cache_dir, repo_id, revision, allow, ignore)
    request = {
        "name": name,
        "repo_id": repo_id,
        "revision": revision,
        "endpoint": endpoint,
        "cache_dir": cache_dir,
        "allow_patterns": allow,
        "ignore_patterns": ignore,
        "token_file": token_file,
        "margin_bytes": margin,
    }
    stage = staging_dir(models_dir, name, revision)
    user = state["login_user"] or "root"

    # 1. The control cache holds the verified files (downloaded at most once per run).
    yield FunctionCommand(_fetch_command, (request,), {})
    # 2. The staging directory, owned by the login user: uploads go there directly.
    dirs = [posixpath.join(stage, d) for d in plan.subdirs]
    yield StringCommand(
        "install -d -m 0755", QuoteString(models_dir), QuoteString(posixpath.dirname(stage)),
        "&& install -d -m 0700", QuoteString(stage), *[QuoteString(d) for d in dirs],
        # Directories only: a file kept from an earlier run may be a hard link to the live copy.
        "&& chown", QuoteString(user), QuoteString(stage), *[QuoteString(d) for d in dirs],
    )
    # Unwanted leftovers, and files about to be sent again (SFTP cannot overwrite a root-owned
    # file: a rejected or cut-off one may be).
    resend = [e["path"] for e in plan.send if e["path"] in state["staging"]]
    doomed = plan.remove + [p for p in resend if p not in plan.remove]
    if doomed:
        yield StringCommand("rm -rf --", *[QuoteString(posixpath.join(stage, p)) for p in doomed])
    # 3. Files the host already holds: hard links (a copy across filesystems).
    for source, dest in plan.link:
        src = QuoteString(posixpath.join(target, source))
        dst = QuoteString(posixpath.join(stage, dest))
        yield StringCommand("ln -f --", src, dst, "2>/dev/null || cp -p --", src, dst)
    # 4. The files it lacks, then the manifest and sums, straight into staging over SFTP.
    for entry in plan.send:
        yield FileUploadCommand(
            str(layout.files / entry["path"]), posixpath.join(stage, entry["path"]), _sudo=False
        )
    yield FileUploadCommand(str(layout.manifest), posixpath.join(stage, MANIFEST_NAME), _sudo=False)
    yield FileUploadCommand(str(layout.sums), posixpath.join(stage, SUMS_NAME), _sudo=False)
    yield FunctionCommand(_record_command, (name, plan.send_bytes, len(plan.send)), {})
    # 5. Verify every byte, then swap into place.
    yield _finalize_command(models_dir, name, revision, stale)


# --- Phase ----------------------------------------------------------------------------------


class _ReportAtPhaseEnd(BaseStateCallback):
    """Prints the run's hub and LAN bytes once, when the phase's last operation has ended on
    every host (pyinfra calls operation_end once per operation, not per host)."""

    def __init__(self, op_name: str):
        self.op_name = op_name
        self.done = False

    def operation_end(self, state, op_hash):
        if self.done or not any(self.op_name in n for n in state.get_op_meta(op_hash).names):
            return
        self.done = True
        logger.info(LEDGER.summary([h.name for h in state.inventory.iter_activated_hosts()]))


REPORT_OP_NAME = "Report hub and LAN bytes"


@operation()
@fails_only_this_host
def transfer_report():
    """
    Nothing to change: the run's hub and LAN bytes are printed once this operation has ended on
    every host (a pyinfra callback); each host's own transfer is logged as it happens.
    """
    host.noop("hub and LAN bytes of this run are printed when the phase ends")
    return
    yield  # pragma: no cover - a generator that yields nothing


def _spec(entry: Any) -> dict[str, Any]:
    if hasattr(entry, "model_dump"):
        return entry.model_dump()
    return dict(entry)


def models_for_host(models: list[Any], host_groups: list[str]) -> list[dict[str, Any]]:
    """The model entries whose `groups` include one of the host's groups."""
    groups = set(host_groups)
    return [
        spec for spec in map(_spec, models) if groups & set(spec.get("groups") or ["gpu_nodes"])
    ]


@deploy("Model weights")
def model_weights(settings):
    """Every model of `settings.models` this host's groups need, verified in place."""
    from pyinfra import state

    wanted = models_for_host(settings.models, list(host.groups))
    if not wanted:
        host.noop("no model in group data names one of this host's groups")  # pragma: no cover
        return
    if not any(isinstance(h, _ReportAtPhaseEnd) for h in state.callback_handlers):
        state.add_callback_handler(_ReportAtPhaseEnd(REPORT_OP_NAME))
    for spec in wanted:
        model(
            name=f"Model {spec['name']}: {spec['repo_id']}@{rev12(spec['revision'])}",
            model_name=spec["name"],
            **_model_kwargs(spec, settings),
        )
    transfer_report(name=REPORT_OP_NAME)


def _model_kwargs(spec: dict[str, Any], settings) -> dict[str, Any]:
    return {
        "repo_id": spec["repo_id"],
        "revision": spec["revision"],
        "models_dir": settings.models_dir,
        "cache_dir": settings.weights_cache_dir,
        "endpoint": settings.hf_endpoint.rstrip("/"),
        # An Ollama model fetches only its GGUF file unless allow_patterns selects more.
        "allow_patterns": list(spec.get("allow_patterns") or
                               ([spec["gguf_file"]] if spec.get("gguf_file") else [])),
        "ignore_patterns": list(spec.get("ignore_patterns") or []),
        "token_file": settings.hf_token_file,
        "verify": settings.weights_verify,
        "free_margin_gb": settings.weights_free_margin_gb,
    }
