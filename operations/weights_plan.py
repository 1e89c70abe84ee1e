"""Model weights, the pure part: which files a model is, what a host holds of them, what a run
must send and where, how much disk that needs, and the manifest that records a verified copy.
operations/weights.py reads the facts and runs the transfers; operations/weights_cache.py is the
control machine's verified download.

    plan = plan_host(parse_model_state(lines), wanted_files, verify="size")
    problems = installed_problems(manifest, wanted)     # why a copy is not the wanted one
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra.api import OperationError

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


def files_to_fetch(listing: list[dict[str, Any]], allow: list[str] | None,
                   ignore: list[str] | None, what: str) -> list[dict[str, Any]]:
    """select_files, refusing (OperationError naming `what`) bad patterns or an empty result."""
    try:
        wanted = select_files(listing, allow, ignore)
    except ValueError as error:
        raise OperationError(f"{what}: {error}") from None
    if not wanted:
        raise OperationError(f"{what}: no file of the revision matches the patterns")
    return wanted


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

    addresses = dict(line.split(" ", 1) for line in sections.get("addresses", []) if " " in line)
    avail = info.get("avail_kib", "")
    return {
        "dir": info.get("dir", "missing"),
        "login_user": info.get("login_user", ""),
        "primary": info.get("primary") or None,
        "addresses": addresses,
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
