"""How a Hugging Face repository names its files, as pure functions (lab stand-in, not the Hub).

The Hub is git + git-lfs: a small file is a git blob and its ETag is the blob's sha1; a large one is
an LFS pointer in git and its ETag is the sha256 of the content. Which files are LFS is decided by
the repository's `.gitattributes` (`filter=lfs` patterns), as in git. The commit id is a real git
commit object's sha1 over the tree git would store (pointers for LFS files), so it changes with the
content.
"""

from __future__ import annotations

import fnmatch
import hashlib

LFS_SPEC = "version https://git-lfs.github.com/spec/v1"

# The .gitattributes every new Hugging Face model repository starts with (abridged to what matters).
HF_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.npy", "*.onnx", "*.pt",
                    "*.pth", "*.safetensors", "*.tar.gz", "*.zip", "*tfevents*")
)


def git_blob_sha1(content: bytes) -> str:
    """sha1 of the git blob object (`git hash-object`): the Hub's ETag for small files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    """The git-lfs pointer file git stores instead of a large file."""
    oid = hashlib.sha256(content).hexdigest()
    return f"{LFS_SPEC}\noid sha256:{oid}\nsize {len(content)}\n".encode()


def lfs_patterns(gitattributes: str) -> list[str]:
    """The path patterns that a .gitattributes text sends through git-lfs (`filter=lfs`)."""
    patterns = []
    for line in gitattributes.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def is_lfs(path: str, patterns: list[str]) -> bool:
    """Whether git-lfs stores `path` (a repository path with '/'), by gitattributes rules."""
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(path, pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def file_entry(path: str, content: bytes, lfs: bool) -> dict:
    """One file as the Hub's tree API lists it: oid = git blob id (of the pointer when LFS)."""
    if not lfs:
        return {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path}
    pointer = lfs_pointer(content)
    return {
        "type": "file",
        "oid": git_blob_sha1(pointer),
        "size": len(content),
        "path": path,
        "lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content),
                "pointerSize": len(pointer)},
    }


def _tree_sha1(entries: dict[str, bytes | dict]) -> str:
    """sha1 of a git tree object; entries map a name to a blob sha1 (hex, as bytes) or a subtree."""
    body = b""
    # git sorts tree entries by name, a directory as if its name ended with "/"
    for name in sorted(entries, key=lambda n: n + "/" if isinstance(entries[n], dict) else n):
        value = entries[name]
        if isinstance(value, dict):
            body += b"40000 " + name.encode() + b"\0" + bytes.fromhex(_tree_sha1(value))
        else:
            body += b"100644 " + name.encode() + b"\0" + bytes.fromhex(value.decode())
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def commit_sha1(files: dict[str, bytes], message: str, timestamp: int) -> str:
    """The 40-hex commit id git would give one commit of `files` (path -> content), LFS applied.

    Author and committer are fixed, so the same files and message always give the same id.
    """
    patterns = lfs_patterns(files.get(".gitattributes", b"").decode())
    blobs = {path: lfs_pointer(content) if is_lfs(path, patterns) else content
             for path, content in files.items()}
    return commit_sha1_of_blobs(blobs, message, timestamp)


def commit_sha1_of_blobs(blobs: dict[str, bytes], message: str, timestamp: int) -> str:
    """The commit id of files given as the blobs git stores (an LFS file's pointer, not its
    content): for repositories too large to hold in memory (scripts/lab/hub/synthetic.py)."""
    root: dict = {}
    for path, blob in blobs.items():
        *dirs, name = path.split("/")
        node = root
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = git_blob_sha1(blob).encode()
    ident = f"gpufleet lab <lab@gpufleet.invalid> {timestamp} +0000"
    body = f"tree {_tree_sha1(root)}\nauthor {ident}\ncommitter {ident}\n\n{message}\n".encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
