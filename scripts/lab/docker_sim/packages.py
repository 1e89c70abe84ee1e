"""LAB STAND-IN packages for Docker's apt repository: Docker's package names, version strings and
relations (docker-ce, docker-ce-cli, containerd.io, docker-buildx-plugin, docker-compose-plugin),
carrying Debian's own builds of the same upstream releases (scripts/lab/docker_sim/debian.py).

The lab cannot reach download.docker.com; Debian's archive it can. Debian's docker.io of an
upstream release is that release's dockerd, built by Debian: the stand-in moves it to the paths
Docker's packages use (/usr/bin/dockerd), gives it Docker's name and version string, and says in
every description whose build it is. Two engine versions, so the lab can pin one and upgrade to
the other:

    docker-ce, docker-ce-cli   5:26.1.5-1~debian.12~bookworm   Debian trixie's docker.io/docker-cli
                               5:28.5.2-1~debian.12~bookworm   Debian sid's (the production default)
    containerd.io              1.7.24-1~debian.12~bookworm     trixie's containerd + bookworm's runc
    docker-buildx-plugin       0.29.1-1~debian.12~bookworm     sid's docker-buildx
    docker-compose-plugin      2.40.3-1~debian.12~bookworm     sid's docker-compose

Relations follow Docker's packaging (docker/docker-ce-packaging, deb/common/control): docker-ce
Depends on containerd.io and docker-ce-cli and Conflicts with docker.io; containerd.io Provides,
Conflicts with and Replaces containerd and runc, whose binary it carries.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from scripts.lab.nvidia_sim.packages import dpkg_build

from .debian import DebianDeb

CODENAME_SUFFIX = "-1~debian.12~bookworm"
MAINTAINER = "gpu-fleet lab <docker-sim@gpufleet.lab.invalid>"

# Debian's builds the stand-ins carry (Debian package, upstream version, suites to look in).
DOCKER_IO = {"26.1.5": DebianDeb("docker.io", "26.1.5", ("trixie",)),
             "28.5.2": DebianDeb("docker.io", "28.5.2", ("sid", "forky"))}
DOCKER_CLI = {"26.1.5": DebianDeb("docker-cli", "26.1.5", ("trixie",)),
              "28.5.2": DebianDeb("docker-cli", "28.5.2", ("sid", "forky"))}
CONTAINERD = DebianDeb("containerd", "1.7.24", ("trixie",))
RUNC = DebianDeb("runc", "1.1.5", ("bookworm",))  # runc of trixie and later needs glibc 2.38
TINI = DebianDeb("tini", "0.19.0", ("bookworm",))  # its static build is docker-init
BUILDX = DebianDeb("docker-buildx", "0.29.1", ("sid", "forky"))
COMPOSE = DebianDeb("docker-compose", "2.40.3", ("sid", "forky"))

ENGINE_VERSIONS = tuple(DOCKER_IO)


@dataclass
class StandIn:
    name: str
    upstream: str
    carries: list[DebianDeb]
    # (deb it comes from, path in that deb, path in this package); a unit file's text is edited.
    files: list[tuple[DebianDeb, str, str]]
    relations: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    units: tuple[str, ...] = ()  # systemd units enabled on install, restarted on upgrade
    postinst_extra: str = ""

    @property
    def version(self) -> str:
        epoch = "5:" if self.name in ("docker-ce", "docker-ce-cli") else ""
        return f"{epoch}{self.upstream}{CODENAME_SUFFIX}"

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.split(':')[-1]}_amd64.deb"


def stand_ins() -> list[StandIn]:
    """Every package the stand-in repository publishes."""
    result = []
    for upstream in ENGINE_VERSIONS:
        engine, cli = DOCKER_IO[upstream], DOCKER_CLI[upstream]
        result.append(StandIn(
            "docker-ce", upstream, [engine, TINI],
            [(engine, "usr/sbin/dockerd", "usr/bin/dockerd"),
             (engine, "usr/sbin/docker-proxy", "usr/bin/docker-proxy"),
             (TINI, "usr/bin/tini-static", "usr/bin/docker-init"),
             (engine, "usr/lib/systemd/system/docker.service", "lib/systemd/system/docker.service"),
             (engine, "usr/lib/systemd/system/docker.socket", "lib/systemd/system/docker.socket"),
             (engine, "etc/default/docker", "etc/default/docker")],
            {"Depends": "containerd.io (>= 1.6.24), docker-ce-cli, iptables, libseccomp2 (>= 2.3.0), "
                        "libc6, libsystemd0",
             "Conflicts": "docker (<< 1.5~), docker-engine, docker.io",
             "Replaces": "docker-engine"},
            "Docker: the open-source application container engine",
            units=("docker.socket", "docker.service"),
            postinst_extra="getent group docker >/dev/null || groupadd --system docker\n"))
        result.append(StandIn(
            "docker-ce-cli", upstream, [cli],
            [(cli, "usr/bin/docker", "usr/bin/docker")],
            {"Depends": "libc6",
             "Recommends": "docker-buildx-plugin, docker-compose-plugin",
             "Conflicts": "docker (<< 1.5~), docker-engine, docker.io",
             "Replaces": "docker-ce (<< 5:0), docker-engine"},
            "Docker CLI: the open-source application container engine"))
    result.append(StandIn(
        "containerd.io", CONTAINERD.upstream, [CONTAINERD, RUNC],
        [(CONTAINERD, f"usr/bin/{name}", f"usr/bin/{name}")
         for name in ("containerd", "containerd-shim", "containerd-shim-runc-v1",
                      "containerd-shim-runc-v2", "ctr")]
        + [(RUNC, "usr/sbin/runc", "usr/bin/runc"),
           (CONTAINERD, "usr/lib/systemd/system/containerd.service",
            "lib/systemd/system/containerd.service"),
           (CONTAINERD, "etc/containerd/config.toml", "etc/containerd/config.toml")],
        {"Depends": "libc6, libseccomp2", "Provides": "containerd, runc",
         "Conflicts": "containerd, runc", "Replaces": "containerd, runc"},
        "An open and reliable container runtime", units=("containerd.service",)))
    result.append(StandIn(
        "docker-buildx-plugin", BUILDX.upstream, [BUILDX],
        [(BUILDX, "usr/libexec/docker/cli-plugins/docker-buildx",
          "usr/libexec/docker/cli-plugins/docker-buildx")],
        {"Depends": "libc6", "Enhances": "docker-ce-cli"}, "Docker Buildx cli plugin"))
    result.append(StandIn(
        "docker-compose-plugin", COMPOSE.upstream, [COMPOSE],
        [(COMPOSE, "usr/libexec/docker/cli-plugins/docker-compose",
          "usr/libexec/docker/cli-plugins/docker-compose")],
        {"Depends": "libc6", "Enhances": "docker-ce-cli"}, "Docker Compose (V2) plugin for the Docker CLI"))
    return result


def all_debian_debs() -> list[DebianDeb]:
    seen: dict[str, DebianDeb] = {}
    for package in stand_ins():
        for deb in package.carries:
            seen.setdefault(deb.key, deb)
    return list(seen.values())


# ------------------------------------------------------------------------------- rendering


def control_text(package: StandIn, carried_versions: dict[str, str]) -> str:
    """The control file: Docker's name, version and relations; a description that says whose
    build the binaries are."""
    origins = ", ".join(f"{deb.package} {carried_versions[deb.key]}" for deb in package.carries)
    lines = [f"Package: {package.name}", f"Version: {package.version}", "Architecture: amd64",
             f"Maintainer: {MAINTAINER}", "Section: admin", "Priority: optional",
             "Homepage: https://www.docker.com"]
    lines += [f"{key}: {value}" for key, value in package.relations.items()]
    lines.append(f"Description: LAB STAND-IN for Docker's {package.name}: {package.summary}")
    lines.append(f" STAND-IN for the gpu-fleet lab, not a package published by Docker: Debian's")
    lines.append(f" own builds ({origins}) under Docker's package name and version.")
    return "\n".join(lines) + "\n"


def unit_text(text: str) -> str:
    """Debian's units start the binaries from /usr/sbin; Docker's packages put them in /usr/bin."""
    return text.replace("/usr/sbin/dockerd", "/usr/bin/dockerd")


def postinst_text(package: StandIn) -> str:
    """What debhelper's systemd snippets do for Docker's packages: enable the units on install
    and start them; restart the service after an upgrade, so the new binary runs."""
    units = " ".join(package.units)
    services = " ".join(u for u in package.units if u.endswith(".service"))
    body = package.postinst_extra
    if units:
        body += (
            f"deb-systemd-helper unmask {units} >/dev/null || true\n"
            f"deb-systemd-helper enable {units} >/dev/null || true\n"
            "if [ -d /run/systemd/system ]; then\n"
            "    systemctl --system daemon-reload >/dev/null || true\n"
            '    if [ -n "$2" ]; then\n'
            f"        deb-systemd-invoke restart {services} >/dev/null || true\n"
            "    else\n"
            f"        deb-systemd-invoke start {units} >/dev/null || true\n"
            "    fi\n"
            "fi\n")
    return ("#!/bin/sh\n# LAB STAND-IN maintainer script (gpu-fleet lab)\nset -e\n"
            'if [ "$1" = configure ]; then\n' + body + "fi\nexit 0\n")


def prerm_text(package: StandIn) -> str:
    units = " ".join(reversed(package.units))
    return ("#!/bin/sh\n# LAB STAND-IN maintainer script (gpu-fleet lab)\nset -e\n"
            f'if [ "$1" = remove ] && [ -d /run/systemd/system ]; then\n'
            f"    deb-systemd-invoke stop {units} >/dev/null || true\nfi\nexit 0\n")


def postrm_text(package: StandIn) -> str:
    units = " ".join(package.units)
    return ("#!/bin/sh\n# LAB STAND-IN maintainer script (gpu-fleet lab)\nset -e\n"
            'if [ "$1" = purge ]; then\n'
            f"    deb-systemd-helper purge {units} >/dev/null || true\nfi\n"
            "if [ -d /run/systemd/system ]; then systemctl --system daemon-reload >/dev/null || true; fi\n"
            "exit 0\n")


# -------------------------------------------------------------------------------- building


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def build_deb(package: StandIn, extracted: dict[str, Path], carried_versions: dict[str, str],
              out_dir: Path) -> Path:
    """Write package.filename into out_dir (dpkg-deb, uncompressed: the binaries are most of it
    and the lab's link is local)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="docker-sim-deb-") as tmp:
        root = Path(tmp) / "root"
        (root / "DEBIAN").mkdir(parents=True)
        conffiles = []
        for deb, source, target in package.files:
            src = extracted[deb.key] / source
            dst = root / target
            dst.parent.mkdir(parents=True, exist_ok=True)
            if target.endswith((".service", ".socket")):
                _write(dst, unit_text(src.read_text()), 0o644)
            else:
                shutil.copy2(src, dst, follow_symlinks=True)
            if target.startswith("etc/"):
                conffiles.append("/" + target)
        _write(root / "DEBIAN" / "control", control_text(package, carried_versions), 0o644)
        if conffiles:
            _write(root / "DEBIAN" / "conffiles", "\n".join(conffiles) + "\n", 0o644)
        if package.units or package.postinst_extra:
            _write(root / "DEBIAN" / "postinst", postinst_text(package), 0o755)
        if package.units:
            _write(root / "DEBIAN" / "prerm", prerm_text(package), 0o755)
            _write(root / "DEBIAN" / "postrm", postrm_text(package), 0o755)
        target = out_dir / package.filename
        dpkg_build(root, target, "none")
    return target


def extract(debs: dict[str, Path], into: Path) -> dict[str, Path]:
    """Each Debian deb unpacked into its own directory (key -> directory)."""
    result = {}
    for key, path in debs.items():
        directory = into / key.replace("@", "_")
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(path), str(directory)], check=True, capture_output=True)
        result[key] = directory
    return result
