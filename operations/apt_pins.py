"""apt packages pinned to an upstream version, the apt revision left to the repository: the
NVIDIA driver ("580.95.05" is "580.95.05-1" on Debian, "580.95.05-0ubuntu1" on Ubuntu) and
Docker's companions (containerd.io "1.7.28" is "1.7.28-1~debian.12~bookworm").

    upstream_version("1:580.95.05-0ubuntu1")       # "580.95.05"
    resolve_pin_lines("containerd.io", "1.7.28")   # shell lines that set $v or fail
    apt_install(["curl", "gnupg"], "--no-install-recommends")
"""

from __future__ import annotations

from pyinfra.facts.apt import noninteractive_apt


def apt_install(packages: list[str], extra_args: str = "") -> str:
    """`apt-get install` of `packages` without prompts (pyinfra's own noninteractive wrapper:
    DEBIAN_FRONTEND and --force-confdef/--force-confold)."""
    return f"{noninteractive_apt(('install ' + extra_args).strip())} {' '.join(packages)}"


def upstream_version(apt_version: str | None) -> str | None:
    """The upstream part of an apt version: "1:580.95.05-0ubuntu1" -> "580.95.05"."""
    if not apt_version:
        return None
    version = apt_version.split(":", 1)[1] if ":" in apt_version else apt_version
    return version.rsplit("-", 1)[0] if "-" in version else version


def resolve_pin_lines(name: str, version: str) -> list[str]:
    """Shell lines (for a `set -e` script) that set $v to the first apt version of `name` the
    configured repositories offer whose upstream part is `version`, or fail naming what they
    have."""
    return [
        f"v=$(apt-cache madison {name} | awk -v want='{version}-' "
        "'{ v = $3; sub(/^[0-9]+:/, \"\", v); if (index(v, want) == 1) { print $3; exit } }')",
        f"[ -n \"$v\" ] || {{ echo 'no {name} {version} in the configured repositories; they "
        f"have:' >&2; apt-cache madison {name} | awk '{{print $3}}' | head -n 5 >&2; exit 1; }}",
    ]
