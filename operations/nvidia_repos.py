"""NVIDIA's flat apt repositories (CUDA, Container Toolkit): the signing key, checked against
its fingerprint before it is used; the deb822 source signed by it; and the source files of
NVIDIA's own install guides that name the same repository with another key, moved aside.

Shared by operations/nvidia.py (the CUDA repository) and operations/toolkit.py (the toolkit's).

    yield from signed_flat_repository("the CUDA repository", uri, state["cuda_keyring"],
                                      state["packages"], key_url, keyring, fingerprint, name)
"""

from __future__ import annotations

import posixpath
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase, QuoteString, StringCommand
from pyinfra.operations import apt

from operations.apt_pins import apt_install
from operations.phase import explain

# Needed to fetch and check a key: TLS roots, curl, gpg.
REPO_TOOL_PACKAGES = ("ca-certificates", "curl", "gpg")


def key_fingerprint_ok(keyring: dict[str, Any], fingerprint: str) -> bool:
    """Whether the keyring file holds the wanted key. A present keyring whose fingerprints
    could not be read (no gpg on the host) is trusted as is: it was checked when installed."""
    if not keyring["present"]:
        return False
    if not keyring["fingerprints"]:
        return True
    return fingerprint.upper() in keyring["fingerprints"]


def install_key_command(url: str, keyring: str, fingerprint: str) -> StringCommand:
    """Download an armoured key, refuse it unless it carries `fingerprint`, dearmour it into a
    staged keyring and move that into place (one command; the staged files never linger)."""
    staged = f"{keyring}.new"
    download = f"{keyring}.download"
    check = (
        f"gpg --show-keys --with-colons {download} 2>/dev/null | "
        f"awk -F: '$1 == \"fpr\" {{ print $10 }}' | grep -qix {fingerprint}"
    )
    return StringCommand(
        "install -d -m 0755", posixpath.dirname(keyring),
        "&& curl -fsSL --retry 3 --proto '=https,http' -o", download, QuoteString(url),
        "&&", "{", check, "||", "{",
        "echo", QuoteString(f"the key at {url} is not the expected key {fingerprint}"), ">&2;",
        "rm -f", download, ";", "exit 1;", "}", ";", "}",
        "&& gpg --batch --yes --dearmor -o", staged, download,
        "&& chmod 0644", staged,
        "&& mv -f", staged, keyring,
        "&& rm -f", download,
    )


def tool_commands(packages: dict[str, Any], needed: bool) -> list[str]:
    """apt-get update + install of the key tools that are missing, when a key must be fetched."""
    missing = [name for name in REPO_TOOL_PACKAGES if name not in packages]
    if not needed or not missing:
        return []
    return ["apt-get update", apt_install(missing, "--no-install-recommends")]


# Where source files that name one of our repositories with another key are moved aside.
APT_SOURCES_BACKUP = "/var/backups/gpufleet/apt-sources"
_DPKG_ARCHES = ("amd64", "arm64")


def foreign_source_match(uri: str) -> str:
    """What a foreign source file names when it is one of our repositories: the URI, with a
    trailing dpkg architecture left out (NVIDIA's own list file writes it `$(ARCH)`)."""
    trimmed = uri.rstrip("/")
    head, _, last = trimmed.rpartition("/")
    return head + "/" if last in _DPKG_ARCHES else trimmed


class ForeignAptSources(FactBase):
    """Files of /etc/apt/sources.list.d, other than `<own>.sources`, that name `match` (one path a
    line). NVIDIA's own instructions (cuda-keyring's cuda-<distro>-<arch>.list, the toolkit's
    nvidia-container-toolkit.list) leave such files with another Signed-By keyring, and apt
    refuses two sources for one URI with different Signed-By ("Conflicting values set for
    option Signed-By"): every `apt-get update` fails until one goes.

    .. code:: python

        ["/etc/apt/sources.list.d/cuda-debian12-x86_64.list"]
    """

    def command(self, match: str, own: str) -> StringCommand:
        script = ('for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do '
                  '[ -f "$f" ] || continue; [ "${f##*/}" = "$2.sources" ] && continue; '
                  'grep -v "^[[:space:]]*#" "$f" | grep -qF -- "$1" && echo "$f"; done; true')
        return StringCommand("sh", "-c", QuoteString(script), "foreign-sources",
                             QuoteString(match), QuoteString(own))

    @staticmethod
    def default():
        return []

    def process(self, output):
        return [line.strip() for line in output if line.strip()]


def move_foreign_sources(label: str, uri: str, sources_name: str):
    """Source files that name our repository with another key, moved to APT_SOURCES_BACKUP (kept
    for the operator, out of apt's way); apt then reads only ours."""
    foreign = host.get_fact(ForeignAptSources, match=foreign_source_match(uri), own=sources_name)
    for path in foreign:
        explain(f"{label}: {path} names {uri} too (with its own Signed-By, which makes apt "
                f"refuse both): moved to {APT_SOURCES_BACKUP}/")
        yield StringCommand("install -d -m 0755", APT_SOURCES_BACKUP, "&&", "mv -f",
                            QuoteString(path), QuoteString(APT_SOURCES_BACKUP + "/"))


def signed_flat_repository(
    label: str, uri: str, keyring_state: dict[str, Any], packages: dict[str, Any], key_url: str,
    keyring: str, fingerprint: str, sources_name: str,
):
    """The commands (if any) for one of NVIDIA's flat apt repositories: its key, installed only
    when the keyring's fingerprint is not the expected one, and a deb822 source signed by it;
    another source file naming the same repository (NVIDIA's own, with its own key) is moved
    aside first. Shared by the CUDA and Container Toolkit repositories; noop when all is in
    place."""
    foreign = list(move_foreign_sources(label, uri, sources_name))
    yield from foreign
    key_ok = key_fingerprint_ok(keyring_state, fingerprint)
    if not key_ok:
        yield from tool_commands(packages, needed=True)
        yield install_key_command(key_url, keyring, fingerprint)
    # A flat repository: the suite is "/" and there are no components.
    source = list(
        apt.sources_file._inner(filename=sources_name, uris=uri, suites="/", signed_by=keyring)
    )
    yield from source
    if key_ok and not source and not foreign:
        host.noop(f"{label} {uri} is configured with its key")
