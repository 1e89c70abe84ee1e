"""SIMULATOR for the gpu-fleet lab, not NVIDIA software: signed apt repositories laid out like
NVIDIA's, holding the simulated packages.

    <out>/compute/cuda/repos/debian12/x86_64/   flat repo like developer.download.nvidia.com's
                                                 (Packages[.gz], Release, InRelease, Release.gpg,
                                                 the debs; the lab key as 3bf863cc.pub, the file
                                                 name NVIDIA's key has there, and <keyid>.pub)
    <out>/compute/cuda/repos/debian12/sbsa/      the same for arm64
    <out>/libnvidia-container/stable/deb/amd64/  flat repo like nvidia.github.io/libnvidia-container
    <out>/libnvidia-container/stable/deb/arm64/
    <out>/libnvidia-container/gpgkey             the signing key, armored, like NVIDIA's

One signing key per lab, generated once into the caller's GnuPG home (no passphrase). Indexes
are written here in Python (the Packages and Release formats are simple and fixed), so the lab
needs only dpkg-deb and gpg, no apt-utils. A rebuild happens only when the sources change.

    python -m scripts.lab.nvidia_sim.repo OUT_DIR GNUPG_HOME   # build, print the paths as JSON
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
import time
from pathlib import Path

from . import packages as pkgs

KEY_UID = "gpu-fleet lab NVIDIA SIMULATOR repository key <nvidia-sim@gpufleet.lab.invalid>"
STAMP = ".nvsim-build.json"

CUDA_BASE = "compute/cuda/repos/debian12"
NVIDIA_CUDA_KEY_FILE = "3bf863cc.pub"
TOOLKIT_BASE = "libnvidia-container"


# ---------------------------------------------------------------------------- pure helpers


def packages_stanza(control: str, filename: str, data: bytes, prefix: str = "./") -> str:
    """One Packages entry: the control fields plus where the file is (prefix + filename,
    relative to the repository's root) and its checksums."""
    fields = control.rstrip("\n")
    # Installed-Size is not in our control files; apt does not need it.
    return (
        f"{fields}\n"
        f"Filename: {prefix}{filename}\n"
        f"Size: {len(data)}\n"
        f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
        f"SHA1: {hashlib.sha1(data).hexdigest()}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
    )


def release_text(files: dict[str, bytes], architecture: str, label: str, date: float) -> str:
    """A flat repository's Release file over its index files."""
    lines = [
        "Origin: gpu-fleet-lab",
        f"Label: {label} (SIMULATOR for the gpu-fleet lab, not NVIDIA software)",
        f"Architectures: {architecture}",
        f"Date: {email.utils.formatdate(date, usegmt=True)}",
        "Acquire-By-Hash: no",
    ]
    for title, algo in (("MD5Sum", hashlib.md5), ("SHA1", hashlib.sha1), ("SHA256", hashlib.sha256)):
        lines.append(f"{title}:")
        for name in sorted(files):
            data = files[name]
            lines.append(f" {algo(data).hexdigest()} {len(data):>16} {name}")
    return "\n".join(lines) + "\n"


def sources_digest() -> str:
    """Hash of everything a build depends on: this package's code and files/."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in sorted([*here.glob("*.py"), *(here / "files").iterdir()]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def repo_paths(fingerprint: str) -> dict:
    """Relative URL paths (under the served directory) of both repositories and their keys."""
    key_id = fingerprint[-8:].lower()
    return {
        "cuda_repo": f"{CUDA_BASE}/x86_64/",
        "cuda_repo_arm64": f"{CUDA_BASE}/sbsa/",
        # NVIDIA's key file name in debian12/x86_64 (its key id), so a key URL built the way
        # production builds it for NVIDIA's repository works; the content is the lab's key.
        "cuda_key": f"{CUDA_BASE}/x86_64/{NVIDIA_CUDA_KEY_FILE}",
        "cuda_key_by_id": f"{CUDA_BASE}/x86_64/{key_id}.pub",
        "toolkit_repo": f"{TOOLKIT_BASE}/stable/deb/amd64/",
        "toolkit_repo_arm64": f"{TOOLKIT_BASE}/stable/deb/arm64/",
        "toolkit_repo_template": f"{TOOLKIT_BASE}/stable/deb/$(ARCH)/",
        "toolkit_key": f"{TOOLKIT_BASE}/gpgkey",
        "key_id": key_id,
        "fingerprint": fingerprint,
    }


# ---------------------------------------------------------------------------- gpg


def _gpg(gnupg_home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(
        ["gpg", "--homedir", str(gnupg_home), "--batch", "--no-tty", "--quiet", *args],
        input=stdin, capture_output=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"gpg {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def ensure_key(gnupg_home: Path, uid: str = KEY_UID) -> str:
    """The fingerprint of the signing key in gnupg_home, generating it (as uid) the first time."""
    gnupg_home.mkdir(parents=True, exist_ok=True)
    gnupg_home.chmod(0o700)

    def secret_fingerprints() -> list[str]:
        out = _gpg(gnupg_home, "--with-colons", "--list-secret-keys").decode()
        fprs, in_sec = [], False
        for line in out.splitlines():
            kind = line.split(":")[0]
            if kind == "sec":
                in_sec = True
            elif kind == "fpr" and in_sec:
                fprs.append(line.split(":")[9])
                in_sec = False
        return fprs

    fprs = secret_fingerprints()
    if not fprs:
        _gpg(gnupg_home, "--pinentry-mode", "loopback", "--passphrase", "",
             "--quick-generate-key", uid, "ed25519", "sign", "never")
        fprs = secret_fingerprints()
    return fprs[0]


def stop_agent(gnupg_home: Path) -> None:
    """gpg starts an agent for the home; stop it so no process outlives the build."""
    subprocess.run(["gpgconf", "--homedir", str(gnupg_home), "--kill", "gpg-agent"],
                   capture_output=True)


# ---------------------------------------------------------------------------- building


def _write_flat_repo(repo_dir: Path, debs: list[Path], architecture: str, label: str,
                     gnupg_home: Path, fingerprint: str, date: float) -> None:
    stanzas = []
    for deb in sorted(debs):
        data = deb.read_bytes()
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True,
                                 capture_output=True, text=True).stdout
        stanzas.append(packages_stanza(control, deb.name, data))
    packages_bytes = "\n".join(stanzas).encode()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as handle:
        handle.write(packages_bytes)
    index = {"Packages": packages_bytes, "Packages.gz": gz.getvalue()}
    for name, data in index.items():
        (repo_dir / name).write_bytes(data)
    release = release_text(index, architecture, label, date).encode()
    (repo_dir / "Release").write_bytes(release)
    sign = ("--local-user", fingerprint, "--digest-algo", "SHA512", "--yes")
    (repo_dir / "InRelease").write_bytes(_gpg(gnupg_home, *sign, "--clearsign", stdin=release))
    (repo_dir / "Release.gpg").write_bytes(
        _gpg(gnupg_home, *sign, "--armor", "--detach-sign", stdin=release))


def build_repo(out_dir: Path, gnupg_home: Path) -> dict:
    """Build (or keep, when up to date) both simulated repositories under out_dir.

    Returns the relative URL paths: cuda_repo, cuda_key, toolkit_repo, toolkit_key (and the
    arm64 variants, key_id, and `rebuilt`: whether anything was written this time).
    """
    out_dir = Path(out_dir)
    gnupg_home = Path(gnupg_home)
    fingerprint = ensure_key(gnupg_home)
    paths = repo_paths(fingerprint)
    key_id = paths["key_id"]
    wanted = {"sources": sources_digest(), "fingerprint": fingerprint}
    stamp = out_dir / STAMP
    try:
        if json.loads(stamp.read_text()) == wanted and all(
            (out_dir / paths[k]).exists() for k in ("cuda_key", "toolkit_key")
        ) and (out_dir / paths["cuda_repo"] / "InRelease").exists() \
                and (out_dir / paths["toolkit_repo"] / "InRelease").exists():
            stop_agent(gnupg_home)
            return {**paths, "rebuilt": False}
    except (OSError, ValueError):
        pass

    public_key = _gpg(gnupg_home, "--armor", "--export", fingerprint)
    date = time.time()
    staging = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for arch in pkgs.ARCHITECTURES:
            cuda_dir = staging / CUDA_BASE / pkgs.CUDA_ARCH_DIRS[arch]
            debs = [pkgs.build_deb(p, cuda_dir) for p in pkgs.cuda_packages(arch)]
            _write_flat_repo(cuda_dir, debs, arch, "NVIDIA CUDA", gnupg_home, fingerprint, date)
            (cuda_dir / f"{key_id}.pub").write_bytes(public_key)
            (cuda_dir / NVIDIA_CUDA_KEY_FILE).write_bytes(public_key)

            tk_dir = staging / TOOLKIT_BASE / "stable" / "deb" / arch
            debs = [pkgs.build_deb(p, tk_dir) for p in pkgs.toolkit_packages(arch)]
            _write_flat_repo(tk_dir, debs, arch, "libnvidia-container", gnupg_home, fingerprint,
                             date)
        (staging / TOOLKIT_BASE / "gpgkey").write_bytes(public_key)
        (staging / "SIMULATOR.txt").write_text(
            "SIMULATOR for the gpu-fleet lab, not NVIDIA software: apt repositories laid out\n"
            "like NVIDIA's, holding simulated packages. See scripts/lab/nvidia_sim/README.md.\n")
        (staging / STAMP).write_text(json.dumps(wanted))
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        stop_agent(gnupg_home)
    return {**paths, "rebuilt": True}


def swap_in(staging: Path, out_dir: Path) -> None:
    """Replace out_dir's contents with staging's, world-readable for the HTTP server. The
    directory itself stays: the server's bind mount of it remains valid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for child in list(out_dir.iterdir()):
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in staging.iterdir():
        child.rename(out_dir / child.name)
    for path in out_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    out_dir.chmod(0o755)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    started = time.monotonic()
    result = build_repo(Path(argv[1]), Path(argv[2]))
    result["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
