"""Debian's own builds of Docker Engine, fetched from Debian's archive and verified: the binaries
the lab's stand-in for Docker's repository repackages (scripts/lab/docker_sim/packages.py).

The archive's InRelease is checked with gpgv against this machine's Debian archive keyring, the
Packages index against the SHA256 in it, and every .deb against the SHA256 in the index: what
reaches a lab host is byte for byte what Debian published. A file is looked up by its upstream
version, not its Debian revision, so a security rebuild (deb13u1 -> deb13u2) is followed without
a change here; a version gone from every suite named is an error that says so.

Downloads are cached in a directory shared by labs (about 120 MB), re-verified from the cache
on every build against the index entry recorded with them. Standard library only (lab.py runs
with the system's python3).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DebianDeb:
    """A binary package of Debian's, by name and upstream version, looked for in these suites."""
    package: str
    upstream: str
    suites: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.package}@{self.upstream}"


def upstream_of(debian_version: str) -> str:
    """'28.5.2+dfsg4-5' -> '28.5.2'; '1.7.24~ds1-6+deb13u1' -> '1.7.24'; '1:2.3-1' -> '2.3'."""
    version = debian_version.split(":", 1)[-1].rsplit("-", 1)[0]
    for mark in ("+", "~"):
        version = version.split(mark, 1)[0]
    return version


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """Debian control stanzas (Packages, Release) as dicts; continuation lines are kept joined
    with newlines under their field."""
    stanzas, current, field = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, field = {}, None
        elif line[0] in " \t" and field:
            current[field] += "\n" + line.strip()
        else:
            field, _, value = line.partition(":")
            current[field] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def index_sha256(release: dict[str, str], path: str) -> str:
    """The SHA256 a Release file gives one of its index files."""
    for line in release.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == path:
            return parts[0]
    raise LookupError(f"the Release file lists no {path}")


def find_entry(stanzas: list[dict[str, str]], deb: DebianDeb) -> dict[str, str] | None:
    """The index entry of deb's package at its upstream version (the newest revision of it)."""
    found = [s for s in stanzas
             if s.get("Package") == deb.package and upstream_of(s.get("Version", "")) == deb.upstream]
    return found[-1] if found else None


# ------------------------------------------------------------------------------ network


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified_release(suite: str, arch: str) -> dict[str, str]:
    """The suite's InRelease, its signature checked by gpgv against Debian's archive keyring."""
    signed = _get(f"{MIRROR}/dists/{suite}/InRelease")
    with tempfile.TemporaryDirectory(prefix="docker-sim-gpgv-") as tmp:
        out = Path(tmp) / "Release"
        checked = subprocess.run(["gpgv", "--keyring", ARCHIVE_KEYRING, "--output", str(out), "-"],
                                 input=signed, capture_output=True)
        if checked.returncode != 0:
            raise RuntimeError(f"Debian's {suite} InRelease failed gpgv against {ARCHIVE_KEYRING}: "
                               f"{checked.stderr.decode(errors='replace').strip()}")
        return parse_stanzas(out.read_text())[0]


def suite_index(suite: str, arch: str) -> list[dict[str, str]]:
    release = verified_release(suite, arch)
    path = f"main/binary-{arch}/Packages.xz"
    data = _get(f"{MIRROR}/dists/{suite}/{path}")
    if _sha256(data) != index_sha256(release, path):
        raise RuntimeError(f"Debian's {suite} {path} does not match its signed Release")
    return parse_stanzas(lzma.decompress(data).decode())


def fetch_all(debs: list[DebianDeb], cache_dir: Path, arch: str = "amd64") -> dict[str, Path]:
    """Every deb (key -> path in cache_dir), verified; only what the cache lacks is fetched."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cache_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    paths: dict[str, Path] = {}
    indexes: dict[str, list[dict[str, str]]] = {}
    for deb in debs:
        entry = manifest.get(deb.key)
        if entry and (cache_dir / entry["file"]).is_file() \
                and _sha256((cache_dir / entry["file"]).read_bytes()) == entry["sha256"]:
            paths[deb.key] = cache_dir / entry["file"]
            continue
        for suite in deb.suites:
            if suite not in indexes:
                indexes[suite] = suite_index(suite, arch)
            found = find_entry(indexes[suite], deb)
            if found:
                break
        else:
            raise LookupError(f"Debian's archive has no {deb.package} {deb.upstream} for {arch} "
                              f"in {', '.join(deb.suites)} any more: update "
                              "scripts/lab/docker_sim/packages.py to a version it has")
        data = _get(f"{MIRROR}/{found['Filename']}")
        if _sha256(data) != found["SHA256"]:
            raise RuntimeError(f"{found['Filename']} does not match Debian's signed index")
        name = found["Filename"].rsplit("/", 1)[-1]
        staged = cache_dir / (name + ".part")
        staged.write_bytes(data)
        staged.rename(cache_dir / name)
        manifest[deb.key] = {"file": name, "sha256": found["SHA256"], "version": found["Version"],
                             "suite": suite}
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        paths[deb.key] = cache_dir / name
    return paths


def debian_version(cache_dir: Path, deb: DebianDeb) -> str:
    """The Debian version of the cached file for deb (what a stand-in's description names)."""
    return json.loads((cache_dir / MANIFEST).read_text())[deb.key]["version"]
