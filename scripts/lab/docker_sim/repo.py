"""LAB STAND-IN for Docker's apt repository: the layout of download.docker.com/linux/debian,
signed with a key of the lab's own, holding the packages of scripts/lab/docker_sim/packages.py.

    <out>/linux/debian/gpg                                  the signing key, armored (Docker's name)
    <out>/linux/debian/dists/bookworm/InRelease, Release, Release.gpg
    <out>/linux/debian/dists/bookworm/stable/binary-amd64/Packages, Packages.gz
    <out>/linux/debian/dists/bookworm/pool/stable/amd64/*.deb

so production's own source line works unchanged against it:
    deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] http://<ip>/linux/debian bookworm stable

    python3 -m scripts.lab.docker_sim.repo OUT_DIR GNUPG_HOME CACHE_DIR   # build, print JSON
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.lab.nvidia_sim.repo import _gpg, ensure_key, packages_stanza, stop_agent, swap_in

from . import debian
from . import packages as pkgs

KEY_UID = "gpu-fleet lab STAND-IN for Docker's repository key <docker-sim@gpufleet.lab.invalid>"
STAMP = ".docker-sim-build.json"
BASE = "linux/debian"
CODENAME = "bookworm"
COMPONENT = "stable"
ARCH = "amd64"
POOL = f"dists/{CODENAME}/pool/{COMPONENT}/{ARCH}"


def release_text(files: dict[str, bytes], date: float) -> str:
    """The suite's Release over its index files (paths relative to dists/<codename>/)."""
    lines = [
        "Origin: gpu-fleet-lab",
        "Label: Docker CE (LAB STAND-IN for the gpu-fleet lab, not Docker's repository)",
        f"Suite: {CODENAME}", f"Codename: {CODENAME}", f"Architectures: {ARCH}",
        f"Components: {COMPONENT}", f"Date: {email.utils.formatdate(date, usegmt=True)}",
    ]
    for title, algo in (("MD5Sum", hashlib.md5), ("SHA256", hashlib.sha256)):
        lines.append(f"{title}:")
        for name in sorted(files):
            lines.append(f" {algo(files[name]).hexdigest()} {len(files[name]):>16} {name}")
    return "\n".join(lines) + "\n"


def sources_digest(carried: dict[str, str]) -> str:
    """What a build depends on: this package's code and the Debian files it carries."""
    digest = hashlib.sha256(json.dumps(carried, sort_keys=True).encode())
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _write_suite(repo: Path, debs: list[Path], gnupg_home: Path, fingerprint: str) -> None:
    stanzas = []
    for deb in sorted(debs):
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True,
                                 text=True).stdout
        stanzas.append(packages_stanza(control, deb.name, deb.read_bytes(), prefix=f"{POOL}/"))
    packages_bytes = "\n".join(stanzas).encode()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as handle:
        handle.write(packages_bytes)
    index_dir = f"{COMPONENT}/binary-{ARCH}"
    index = {f"{index_dir}/Packages": packages_bytes, f"{index_dir}/Packages.gz": gz.getvalue()}
    suite = repo / "dists" / CODENAME
    for name, data in index.items():
        (suite / name).parent.mkdir(parents=True, exist_ok=True)
        (suite / name).write_bytes(data)
    release = release_text(index, time.time()).encode()
    (suite / "Release").write_bytes(release)
    sign = ("--local-user", fingerprint, "--digest-algo", "SHA512", "--yes")
    (suite / "InRelease").write_bytes(_gpg(gnupg_home, *sign, "--clearsign", stdin=release))
    (suite / "Release.gpg").write_bytes(_gpg(gnupg_home, *sign, "--armor", "--detach-sign",
                                             stdin=release))


def build_repo(out_dir: Path, gnupg_home: Path, cache_dir: Path) -> dict:
    """Build (or keep, when up to date) the stand-in under out_dir. Returns `url_path` (append
    to http://<ip>/ for docker_apt_url), `fingerprint`, `versions` (the engine versions it
    offers), `companions` (containerd.io, plugins: upstream versions) and `rebuilt`."""
    out_dir, gnupg_home, cache_dir = Path(out_dir), Path(gnupg_home), Path(cache_dir)
    fingerprint = ensure_key(gnupg_home, KEY_UID)
    debian_debs = debian.fetch_all(pkgs.all_debian_debs(), cache_dir)
    carried = {deb.key: debian.debian_version(cache_dir, deb) for deb in pkgs.all_debian_debs()}
    result = {"url_path": "linux", "fingerprint": fingerprint, "versions": list(pkgs.ENGINE_VERSIONS),
              "companions": {"containerd.io": pkgs.CONTAINERD.upstream,
                             "docker-buildx-plugin": pkgs.BUILDX.upstream,
                             "docker-compose-plugin": pkgs.COMPOSE.upstream}}
    wanted = {"sources": sources_digest(carried), "fingerprint": fingerprint}
    try:
        if json.loads((out_dir / STAMP).read_text()) == wanted:
            stop_agent(gnupg_home)
            return {**result, "rebuilt": False}
    except (OSError, ValueError):
        pass

    staging = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        repo = staging / BASE
        with tempfile.TemporaryDirectory(prefix="docker-sim-x-") as tmp:
            extracted = pkgs.extract(debian_debs, Path(tmp))
            built = [pkgs.build_deb(p, extracted, carried, repo / POOL) for p in pkgs.stand_ins()]
        _write_suite(repo, built, gnupg_home, fingerprint)
        (repo / "gpg").write_bytes(_gpg(gnupg_home, "--armor", "--export", fingerprint))
        (staging / "STAND-IN.txt").write_text(
            "LAB STAND-IN for Docker's apt repository (gpu-fleet lab), not Docker's: Debian's\n"
            "builds under Docker's package names. See scripts/lab/docker_sim/README.md.\n")
        (staging / STAMP).write_text(json.dumps(wanted))
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        stop_agent(gnupg_home)
    return {**result, "rebuilt": True}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    started = time.monotonic()
    result = build_repo(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    result["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
