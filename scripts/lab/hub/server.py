"""The gpu-fleet lab's stand-in for the Hugging Face Hub (NOT huggingface.co), for the real client.

Answers what `huggingface_hub` (checked against 2.4.0) calls when `HF_ENDPOINT` points here:

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  model info: sha, siblings (+ size,
                                                           blobId, lfs)
    GET  /api/models/{repo}/tree/{rev}[/{path}][?recursive=true]
                                         entries: oid, size, lfs {oid, size, pointerSize}
    POST /api/models/{repo}/paths-info/{rev}  (form: paths=...)  the same entries for those paths
    HEAD /{repo}/resolve/{rev}/{path}    X-Repo-Commit, ETag (git blob sha1; sha256 for LFS files,
    GET  /{repo}/resolve/{rev}/{path}    + X-Linked-Etag/X-Linked-Size), Content-Length, Range
    GET  /api/agent-harnesses            an empty registry (the client fetches it from HF_ENDPOINT)

Errors carry the Hub's headers (`X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`,
`X-Error-Message`), so the client raises its own exception types. Every response says what this is
(`X-Lab-Stand-In`, `Server`). With a token file, hub requests without `Authorization: Bearer
<token>` get 401 (the token is never logged). Lab controls, never token-protected:

    POST /_lab/faults {"mode": "drop"|"429"|"500"|"corrupt", "file": opt, "times": N, "method": opt,
                       "retry_after": s}   queue a fault; GET lists, DELETE clears
    GET  /_lab/stats                       bytes served per file and in total, requests, per client
    POST /_lab/stats/reset

Data: ROOT/<repo_id>/<40-hex revision>/<files>, branches in ROOT/<repo_id>/refs/<name> (model.py).

    python3 -m scripts.lab.hub.server --root DIR --port P [--host H] [--token-file F] [--quiet]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import hmac
import json
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from . import gitobjects

STAND_IN = "gpu-fleet lab hub, not huggingface.co"
SERVER_BANNER = "gpufleet-lab-hub/1 (lab stand-in, not huggingface.co)"
FAULT_MODES = ("drop", "429", "500", "corrupt")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REF_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
CHUNK = 64 * 1024
LOG_KEEP = 500


# ---------------------------------------------------------------- pure helpers

@dataclass(frozen=True)
class Route:
    kind: str  # "info", "tree", "paths-info", "resolve", "banner", "lab", "harnesses", "unknown"
    repo_id: str = ""
    revision: str | None = None
    path: str = ""


def parse_route(raw_path: str) -> Route:
    """Which endpoint a request path (still percent-encoded) is for. Revisions are encoded with
    safe="" by the client (so `refs%2Fpr%2F1` is one segment); file paths keep their slashes."""
    parts = urlsplit(raw_path).path.split("/")[1:]
    segs = [unquote(p) for p in parts]
    if segs in ([""], []):
        return Route("banner")
    if segs == ["api", "agent-harnesses"]:
        return Route("harnesses")
    if segs[0] == "_lab":
        return Route("lab", path="/".join(segs[1:]))
    if len(segs) >= 3 and segs[:2] == ["api", "models"]:
        rest = segs[2:]
        for n in (2, 1):
            if len(rest) >= n + 2 and rest[n] in ("revision", "tree", "paths-info"):
                repo = "/".join(rest[:n])
                if rest[n] == "revision" and len(rest) == n + 2:
                    return Route("info", repo, rest[n + 1])
                if rest[n] == "tree":
                    return Route("tree", repo, rest[n + 1], "/".join(rest[n + 2:]))
                if rest[n] == "paths-info" and len(rest) == n + 2:
                    return Route("paths-info", repo, rest[n + 1])
        if len(rest) in (1, 2) and all(rest):
            return Route("info", "/".join(rest), None)
        return Route("unknown")
    for n in (2, 1):
        if len(segs) >= n + 3 and segs[n] == "resolve" and all(segs[:n]):
            return Route("resolve", "/".join(segs[:n]), segs[n + 1], "/".join(segs[n + 2:]))
    return Route("unknown")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """A Range header against a file of `size` bytes: (first, last) inclusive, None to send the
    whole file (no header, or one this server ignores, as HTTP allows), or "unsatisfiable"."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None  # multiple ranges or garbage: serve it all
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return (max(size - n, 0), size - 1) if size else "unsatisfiable"
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or end < start:
        return "unsatisfiable"
    return (start, end)


def safe_repo_path(path: str) -> bool:
    """A file path inside a repository: relative, no '..' or empty segments."""
    segs = path.split("/")
    return bool(path) and all(s not in ("", ".", "..") for s in segs) and "\0" not in path


@dataclass
class Fault:
    mode: str
    times: int = 1
    file: str | None = None
    method: str | None = None
    retry_after: int = 1

    @classmethod
    def from_json(cls, data: dict) -> Fault:
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        unknown = set(data) - {"mode", "times", "file", "method", "retry_after"}
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        mode = str(data.get("mode"))
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {FAULT_MODES}, not {data.get('mode')!r}")
        times, retry_after = data.get("times", 1), data.get("retry_after", 1)
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise ValueError("times must be an integer >= 1")
        if not isinstance(retry_after, int) or isinstance(retry_after, bool) or retry_after < 0:
            raise ValueError("retry_after must be an integer >= 0")
        method = data.get("method")
        if method is not None and method not in ("GET", "HEAD"):
            raise ValueError("method must be GET or HEAD")
        file = data.get("file")
        if file is not None and not isinstance(file, str):
            raise ValueError("file must be a string")
        return cls(mode, times, file, method, retry_after)

    def matches(self, kind: str, method: str, file: str | None) -> bool:
        """Whether this fault applies to a hub request. drop/corrupt need a file body (a GET on
        resolve); a fault naming a file applies only to that file's resolve requests."""
        if self.method is not None and self.method != method:
            return False
        if self.mode in ("drop", "corrupt") and (kind != "resolve" or method != "GET"):
            return False
        if self.file is not None:
            return kind == "resolve" and file == self.file
        return True


def take_fault(faults: list[Fault], kind: str, method: str, file: str | None) -> Fault | None:
    """The first queued fault matching the request, used once (removed when its times run out)."""
    for i, fault in enumerate(faults):
        if fault.matches(kind, method, file):
            fault.times -= 1
            if fault.times <= 0:
                del faults[i]
            return fault
    return None


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None  # LFS oid, None for a regular git file
    pointer_size: int | None
    fs_path: Path

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.sha256:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": self.path}
        entry = {"rfilename": self.path, "size": self.size, "blobId": self.blob_id}
        if self.sha256:
            entry["lfs"] = {"sha256": self.sha256, "size": self.size,
                            "pointerSize": self.pointer_size}
        return entry


def describe_file(path: str, content: bytes, lfs: bool, fs_path: Path) -> FileInfo:
    entry = gitobjects.file_entry(path, content, lfs)
    lfs_info = entry.get("lfs")
    return FileInfo(path, len(content), entry["oid"], lfs_info["oid"] if lfs_info else None,
                    lfs_info["pointerSize"] if lfs_info else None, fs_path)


def tree_listing(files: dict[str, FileInfo], prefix: str, recursive: bool) -> list[dict] | None:
    """The tree API's entries under `prefix` ('' = root): directories first as git lists them.
    None when `prefix` is neither a directory nor a file of the revision."""
    if prefix in files:
        return [files[prefix].tree_entry()]
    base = prefix + "/" if prefix else ""
    dirs: dict[str, dict] = {}
    out_files = []
    for path in sorted(files):
        if not path.startswith(base):
            continue
        rest = path[len(base):].split("/")
        for depth in range(1, len(rest)):
            dpath = base + "/".join(rest[:depth])
            if (recursive or depth == 1) and dpath not in dirs:
                dirs[dpath] = {"type": "directory", "oid": _dir_oid(files, dpath), "size": 0,
                               "path": dpath}
        if recursive or len(rest) == 1:
            out_files.append(files[path].tree_entry())
    if not dirs and not out_files and prefix:
        return None
    return sorted(dirs.values(), key=lambda d: d["path"]) + out_files


def _dir_oid(files: dict[str, FileInfo], dpath: str) -> str:
    nested: dict = {}
    for path, info in files.items():
        if path.startswith(dpath + "/"):
            *dirs, name = path[len(dpath) + 1:].split("/")
            node = nested
            for d in dirs:
                node = node.setdefault(d, {})
            node[name] = info.blob_id.encode()
    return gitobjects._tree_sha1(nested)


# ---------------------------------------------------------------- state

class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit
        self.retry_after = retry_after


@dataclass
class Stats:
    requests: int = 0
    total_bytes: int = 0
    files: dict[str, int] = field(default_factory=dict)
    file_requests: dict[str, int] = field(default_factory=dict)
    clients: dict[str, dict[str, int]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"requests": self.requests, "total_bytes": self.total_bytes, "files": self.files,
                "file_requests": self.file_requests, "clients": self.clients,
                "statuses": self.statuses, "faults": self.faults, "log": self.log}


class HubState:
    """What the handler threads share: the data root, token, queued faults, counters."""

    def __init__(self, root: Path, token: str | None = None, quiet: bool = False):
        self.root = Path(root)
        self.token = token
        self.quiet = quiet
        self.lock = threading.Lock()
        # Hub requests still being answered: a request is recorded after its response is sent,
        # so lab controls wait for these to finish, or a client that has read its last byte
        # could read or reset the stats before that request is counted.
        self.in_flight = 0
        self.idle = threading.Condition(self.lock)
        self.faults: list[Fault] = []
        self.stats = Stats()
        self._file_cache: dict[tuple, FileInfo] = {}

    # repositories -------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        d = self.root / repo_id
        if (not safe_repo_path(repo_id) or repo_id.count("/") > 1 or not d.is_dir()
                or not any(COMMIT_RE.match(c.name) for c in d.iterdir() if c.is_dir())):
            raise HubError(404, "RepoNotFound", "Repository not found")
        return d

    def resolve_revision(self, repo_id: str, revision: str | None) -> str:
        d = self.repo_dir(repo_id)
        rev = revision or "main"
        if COMMIT_RE.match(rev):
            if (d / rev).is_dir():
                return rev
        elif REF_RE.match(rev) and ".." not in rev.split("/"):
            ref = d / "refs" / rev
            if ref.is_file():
                sha = ref.read_text().strip()
                if COMMIT_RE.match(sha) and (d / sha).is_dir():
                    return sha
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def files(self, repo_id: str, sha: str) -> dict[str, FileInfo]:
        base = self.root / repo_id / sha
        attrs = base / ".gitattributes"
        patterns = gitobjects.lfs_patterns(attrs.read_text()) if attrs.is_file() else []
        out = {}
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            for name in filenames:
                fs_path = Path(dirpath) / name
                path = fs_path.relative_to(base).as_posix()
                if name.endswith(".tmp"):
                    continue
                st = fs_path.stat()
                lfs = gitobjects.is_lfs(path, patterns)
                key = (str(fs_path), st.st_size, st.st_mtime_ns, lfs)
                info = self._file_cache.get(key)
                if info is None:
                    info = describe_file(path, fs_path.read_bytes(), lfs, fs_path)
                    self._file_cache[key] = info
                out[path] = info
        return dict(sorted(out.items()))

    def model_info(self, repo_id: str, revision: str | None, blobs: bool) -> dict:
        sha = self.resolve_revision(repo_id, revision)
        files = self.files(repo_id, sha)
        mtime = (self.root / repo_id / sha).stat().st_mtime
        when = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc)
        when = when.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        author = repo_id.split("/")[0] if "/" in repo_id else None
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id, "modelId": repo_id, "author": author, "sha": sha,
            "lastModified": when, "createdAt": when, "private": self.token is not None,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": ["gpu-fleet-lab", "lab-stand-in"], "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "siblings": [f.sibling(blobs) for f in files.values()],
            "usedStorage": sum(f.size for f in files.values()),
            "labStandIn": STAND_IN,
        }
        config = files.get("config.json")
        if config is not None:
            try:
                data = json.loads(config.fs_path.read_bytes())
                info["config"] = {k: data[k] for k in ("architectures", "model_type") if k in data}
            except ValueError:
                pass
        return info

    # faults and stats ---------------------------------------------------
    def take_fault(self, kind: str, method: str, file: str | None) -> Fault | None:
        with self.lock:
            fault = take_fault(self.faults, kind, method, file)
            if fault is not None:
                self.stats.faults[fault.mode] = self.stats.faults.get(fault.mode, 0) + 1
            return fault

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every hub request under way has been recorded."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout)

    def record(self, client: str, method: str, path: str, status: int, body_bytes: int,
               file_key: str | None, range_header: str | None, hub_request: bool = False) -> None:
        with self.lock:
            if hub_request:
                self.in_flight -= 1
                self.idle.notify_all()
            s = self.stats
            s.requests += 1
            s.statuses[str(status)] = s.statuses.get(str(status), 0) + 1
            c = s.clients.setdefault(client, {"requests": 0, "bytes": 0})
            c["requests"] += 1
            if file_key is not None and status in (200, 206):
                s.total_bytes += body_bytes
                s.files[file_key] = s.files.get(file_key, 0) + body_bytes
                s.file_requests[file_key] = s.file_requests.get(file_key, 0) + 1
                c["bytes"] += body_bytes
            s.log.append({"client": client, "method": method, "path": path, "status": status,
                          "range": range_header, "bytes": body_bytes})
            del s.log[:-LOG_KEEP]


# ---------------------------------------------------------------- HTTP

class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_BANNER
    sys_version = ""
    server: "HubServer"

    # plumbing -------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        # Only the request line and status: never headers, so never the token.
        if not self.state.quiet:
            sys.stderr.write(f"{self.client_address[0]} - {format % args}\n")

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("X-Lab-Stand-In", STAND_IN)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> int:
        body = (json.dumps(obj) + "\n").encode()
        self._start(status, {"Content-Type": "application/json; charset=utf-8",
                             "Content-Length": str(len(body)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)
        return 0

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        if err.retry_after is not None:
            headers["Retry-After"] = str(err.retry_after)
        self._json(err.status, {"error": err.message}, headers)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> None:
        if self.state.token is None:
            return
        auth = self.headers.get("Authorization")
        if not auth:
            raise HubError(401, "RepoNotFound", "Invalid username or password.")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.state.token.encode()):
            raise HubError(401, None, "Invalid credentials in Authorization header")

    # dispatch ---------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        route = parse_route(self.path)
        client = self.client_address[0]
        sent, file_key, status = 0, None, 200
        hub_request = route.kind != "lab"
        if hub_request:
            self.state.begin()
        try:
            if route.kind == "lab":
                self.state.settle()
                status = self._lab(route.path)
            elif route.kind == "banner" and self.command in ("GET", "HEAD"):
                self._start(200, {"Content-Type": "text/plain; charset=utf-8",
                                  "Content-Length": str(len(BANNER_TEXT))})
                if self.command == "GET":
                    self.wfile.write(BANNER_TEXT)
            elif route.kind == "harnesses" and self.command in ("GET", "HEAD"):
                # huggingface_hub >= 2.x fetches this registry (best effort) from HF_ENDPOINT
                self._json(200, {"standardEnvVars": [], "harnesses": {}})
            elif route.kind in ("info", "tree", "paths-info", "resolve"):
                allowed = ("POST",) if route.kind == "paths-info" else ("GET", "HEAD")
                if self.command not in allowed:
                    raise HubError(405, None, "Method not allowed")
                fault = self.state.take_fault(route.kind, self.command,
                                              route.path if route.kind == "resolve" else None)
                if fault is not None and fault.mode in ("429", "500"):
                    raise _fault_error(fault)
                self._authorized()
                if route.kind == "info":
                    query = parse_qs(urlsplit(self.path).query)
                    blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
                    self._json(200, self.state.model_info(route.repo_id, route.revision, blobs))
                elif route.kind == "tree":
                    self._tree(route)
                elif route.kind == "paths-info":
                    self._paths_info(route)
                else:
                    file_key = f"{route.repo_id}/{route.path}"
                    status, sent = self._resolve(route, fault)
            else:
                raise HubError(404, None, "Not found (gpu-fleet lab hub stand-in)")
        except HubError as err:
            status = err.status
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.state.record(client, self.command, urlsplit(self.path).path, status, sent,
                              file_key, self.headers.get("Range"), hub_request)

    def _tree(self, route: Route) -> None:
        sha = self.state.resolve_revision(route.repo_id, route.revision)
        files = self.state.files(route.repo_id, sha)
        query = parse_qs(urlsplit(self.path).query)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        listing = tree_listing(files, route.path.strip("/"), recursive)
        if listing is None:
            raise HubError(404, "EntryNotFound", f"{route.path} does not exist on \"{sha}\"", sha)
        self._json(200, listing)

    def _paths_info(self, route: Route) -> None:
        sha = self.state.resolve_revision(route.repo_id, route.revision)
        files = self.state.files(route.repo_id, sha)
        form = parse_qs(self._body().decode("utf-8", "replace"))
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(files[path].tree_entry())
            elif path and any(f.startswith(path + "/") for f in files):
                out.append({"type": "directory", "oid": _dir_oid(files, path), "size": 0,
                            "path": path})
        self._json(200, out)

    def _resolve(self, route: Route, fault: Fault | None) -> tuple[int, int]:
        sha = self.state.resolve_revision(route.repo_id, route.revision)
        if not safe_repo_path(route.path):
            raise HubError(404, "EntryNotFound", "Entry not found", sha)
        info = self.state.files(route.repo_id, sha).get(route.path)
        if info is None:
            raise HubError(404, "EntryNotFound", "Entry not found", sha)
        name = route.path.rsplit("/", 1)[-1]
        headers = {
            "Content-Type": _content_type(name),
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": sha,
            "ETag": f'"{info.etag}"',
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
        }
        if info.sha256:
            headers["X-Linked-Etag"] = f'"{info.sha256}"'
            headers["X-Linked-Size"] = str(info.size)
        rng = parse_range(self.headers.get("Range"), info.size)
        if rng == "unsatisfiable":
            self._json(416, {"error": "Requested Range Not Satisfiable"},
                       {**headers, "Content-Range": f"bytes */{info.size}"})
            return 416, 0
        status = 200
        first, last = 0, info.size - 1
        if isinstance(rng, tuple):
            status = 206
            first, last = rng
            headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
        length = last - first + 1 if info.size else 0
        headers["Content-Length"] = str(length)
        self._start(status, headers)
        if self.command == "HEAD":
            return status, 0
        stop = last + 1
        if fault is not None and fault.mode == "drop":
            stop = first + length // 2
        flip = info.size // 2 if fault is not None and fault.mode == "corrupt" else None
        sent = 0
        with open(info.fs_path, "rb") as f:
            f.seek(first)
            pos = first
            while pos < stop:
                chunk = bytearray(f.read(min(CHUNK, stop - pos)))
                if not chunk:
                    break
                if flip is not None and pos <= flip < pos + len(chunk):
                    chunk[flip - pos] ^= 0xFF
                self.wfile.write(chunk)
                pos += len(chunk)
                sent += len(chunk)
        if fault is not None and fault.mode == "drop":
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return status, sent

    def _lab(self, what: str) -> int:
        st = self.state
        if what == "faults" and self.command == "POST":
            try:
                fault = Fault.from_json(json.loads(self._body() or b"null"))
            except ValueError as e:
                self._json(400, {"error": str(e)})
                return 400
            with st.lock:
                st.faults.append(fault)
                listing = [vars(f).copy() for f in st.faults]
            self._json(200, {"faults": listing})
        elif what == "faults" and self.command in ("GET", "DELETE"):
            with st.lock:
                if self.command == "DELETE":
                    st.faults.clear()
                listing = [vars(f).copy() for f in st.faults]
            self._json(200, {"faults": listing})
        elif what == "stats" and self.command == "GET":
            with st.lock:
                data = json.loads(json.dumps(st.stats.as_json()))
            self._json(200, data)
        elif what == "stats/reset" and self.command == "POST":
            with st.lock:
                st.stats = Stats()
            self._json(200, {"reset": True})
        else:
            self._json(404, {"error": f"no lab control {what!r} for {self.command}"})
            return 404
        return 200


def _fault_error(fault: Fault) -> HubError:
    if fault.mode == "429":
        return HubError(429, None, "Too Many Requests (lab fault injection)",
                        retry_after=fault.retry_after)
    return HubError(500, None, "Internal Error (lab fault injection)")


def _content_type(name: str) -> str:
    if name.endswith(".json"):
        return "application/json; charset=utf-8"
    if name.endswith(".md") or name.startswith(".git") or name.endswith(".txt"):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


BANNER_TEXT = (
    f"{SERVER_BANNER}\nThis is the gpu-fleet lab's stand-in for the Hugging Face Hub, serving "
    "generated lab models only. It is not huggingface.co.\n"
).encode()


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: HubState):
        self.state = state
        super().__init__(address, HubHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def serve_in_thread(root: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                    quiet: bool = True) -> HubServer:
    """Start a hub on a background thread (tests): `.base_url`; `.shutdown()` stops it."""
    server = HubServer((host, port), HubState(root, token, quiet))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="lab-hub",
                     daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m scripts.lab.hub.server",
                                     description=f"{SERVER_BANNER}: serves ROOT/<repo>/<revision>/")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token-file", type=Path,
                        help="require 'Authorization: Bearer <the file's content>' on hub requests")
    parser.add_argument("--quiet", action="store_true", help="no request log on stderr")
    args = parser.parse_args(argv)
    token = args.token_file.read_text().strip() if args.token_file else None
    if args.token_file and not token:
        parser.error(f"{args.token_file} is empty")
    server = HubServer((args.host, args.port), HubState(args.root, token, args.quiet))
    sys.stderr.write(f"{SERVER_BANNER} serving {args.root} on {server.base_url}"
                     f"{' (token required)' if token else ''}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
