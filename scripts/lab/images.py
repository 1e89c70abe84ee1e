"""The lab's images, built here and offline (no registry is reachable from these machines).

    ensure_base()                   Debian 12 minbase from debootstrap, imported: gpufleet-lab-base:<hash>
    ensure_image(name, context)     a small `docker build` FROM that base: <name>:<hash of the recipe>
    ensure_host()                   the lab host image (systemd, sshd, sudo, the deploy user)

Every tag carries a content hash of its recipe: a changed recipe builds a new image, an unchanged
one is reused (the cache survives `lab.py down`; `down --purge-images` removes it). Other lab
images (stand-in repositories, hub, registry) build FROM the base with `ensure_image`: their
Dockerfile starts with `ARG BASE` / `FROM ${BASE}`.

Standard library only (the docker CLI through subprocess).
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_IMAGE_DIR = Path(__file__).resolve().parent / "host-image"
IMAGE_PREFIX = "gpufleet-lab-"


class ImageError(Exception):
    """An image could not be built; the message says which step failed and why."""


def _say(message: str) -> None:
    print(f"lab: {message}", flush=True)


def _image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


# --- Pure ----------------------------------------------------------------------------------


def recipe_hash(*paths: Path, extra: str = "") -> str:
    """Content hash (12 hex digits) of an image recipe: the files under `paths` (names and
    contents, in a stable order) and `extra` (e.g. the base image's tag)."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        files = [path] if path.is_file() else path.rglob("*")
        for file in sorted(p for p in files if p.is_file()):
            relative = file.name if path.is_file() else file.relative_to(path).as_posix()
            digest.update(relative.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def mirror_from_sources(sources: list[str]) -> str | None:
    """The Debian archive URL in apt sources (one-line `deb` format or deb822 `URIs:`), given
    the texts of the files in apt's order; None when no source names a Debian archive.
    Security and other archives (…/debian-security) are not the main archive."""
    for text in sources:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] == ["URIs:"]:
                uris = words[1:]
            elif words[:1] == ["deb"]:
                uris = [word for word in words[1:] if "://" in word][:1]
            else:
                continue
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    return None


def apt_sources_list(mirror: str, suite: str = SUITE) -> str:
    """The image's /etc/apt/sources.list: the same mirror this machine uses."""
    return f"deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\n"


# --- Building ------------------------------------------------------------------------------


def debian_mirror() -> str:
    """This machine's own Debian mirror: the lab uses what the machine already reaches."""
    sources_d = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(sources_d.glob("*.sources")),
             *sorted(sources_d.glob("*.list"))]
    texts = [path.read_text(errors="replace") for path in files if path.is_file()]
    return mirror_from_sources(texts) or DEFAULT_MIRROR


def ensure_base() -> str:
    """Debian 12 minbase from debootstrap, imported as an image; returns its tag. Built once
    per mirror (about 40 s), reused after that."""
    mirror = debian_mirror()
    tag = f"{IMAGE_PREFIX}base:{recipe_hash(extra=f'{SUITE} minbase {mirror}')}"
    if _image_exists(tag):
        return tag
    _say(f"building the base image {tag} with debootstrap from {mirror} (about a minute, once)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpufleet-rootfs-") as rootfs:
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, rootfs, mirror],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-600:]
            raise ImageError(f"debootstrap {SUITE} from {mirror} failed: {output}")
        Path(rootfs, "etc/apt/sources.list").write_text(apt_sources_list(mirror))
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
            stdin=tar.stdout, capture_output=True,
        )
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise ImageError(f"docker import failed: {imported.stderr.decode(errors='replace').strip()}")
    _say(f"base image ready in {time.monotonic() - started:.0f}s")
    return tag


def ensure_image(name: str, context: Path, what: str = "") -> str:
    """`docker build` of `context` (a Dockerfile starting `ARG BASE` / `FROM ${BASE}`) on top of
    the base image, tagged <name>:<hash of the context and the base>; returns the tag."""
    base = ensure_base()
    tag = f"{name}:{recipe_hash(context, extra=base)}"
    if _image_exists(tag):
        return tag
    _say(f"building the image {tag}{f' ({what})' if what else ''}")
    started = time.monotonic()
    result = subprocess.run(
        ["docker", "build", "--build-arg", f"BASE={base}", "-t", tag, str(context)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-800:]
        raise ImageError(f"docker build of {tag} failed: {output}")
    _say(f"image {tag} ready in {time.monotonic() - started:.0f}s")
    return tag


def packages_dockerfile(comment: str, packages: list[str], instructions: str) -> str:
    """A Dockerfile for ensure_image: `# comment`, FROM the base, Debian `packages` installed
    from the base's mirror (no recommends; apt lists, docs and man pages removed), then
    `instructions` (LABEL, COPY, CMD, ...: text, one instruction a line)."""
    return (f"# {comment}\n"
            "ARG BASE\n"
            "FROM ${BASE}\n"
            "ENV DEBIAN_FRONTEND=noninteractive\n"
            "RUN apt-get update \\\n"
            f" && apt-get install -y --no-install-recommends {' '.join(packages)} \\\n"
            " && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man\n"
            + instructions)


def ensure_image_from(name: str, files: dict[str, str], what: str = "") -> str:
    """ensure_image of a build context given as file name -> text (a Dockerfile starting `ARG
    BASE` / `FROM ${BASE}`, and what it COPYs), written to a scratch directory: the tag hashes
    the names and contents, not where they were written."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-image-") as tmp:
        for file_name, text in files.items():
            Path(tmp, file_name).write_text(text)
        return ensure_image(name, Path(tmp), what)


def ensure_host() -> str:
    """The lab host image: a fresh Debian 12 server (systemd, sshd, sudo, user ops)."""
    return ensure_image(f"{IMAGE_PREFIX}host", HOST_IMAGE_DIR,
                        "systemd, sshd, sudo, the deploy user ops")


def lab_images(lab: str) -> list[str]:
    """Images for `down --purge-images`: the shared cache (gpufleet-lab-*) and any image
    labelled gpufleet.lab=<lab> (a stand-in service's own image)."""
    def listed(*filters: str) -> set[str]:
        out = subprocess.run(
            ["docker", "images", *filters, "--format", "{{.Repository}}:{{.Tag}}"],
            capture_output=True, text=True, check=True,
        ).stdout
        return {tag for tag in out.split() if not tag.endswith(":<none>")}

    shared = {tag for tag in listed() if tag.startswith(IMAGE_PREFIX)}
    return sorted(shared | listed("--filter", f"label=gpufleet.lab={lab}"))
