"""SIMULATOR for the gpu-fleet lab, not NVIDIA software: the simulated NVIDIA Debian packages.

Same package names, versions and dependency structure as NVIDIA's repositories for Debian 12
(the CUDA repository's Debian packaging of driver branch 580, and the libnvidia-container
repository's toolkit 1.19.x), so the production code installs them with exactly the commands it
uses on real hosts. Contents are small simulators (see files/); every package's description
starts with SIMULATOR. README.md lists the set.

Pure data (`cuda_packages`, `toolkit_packages`) is separate from `build_deb`, which only writes
a directory tree and runs dpkg-deb (no network).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FILES = Path(__file__).resolve().parent / "files"

SIMULATOR = "SIMULATOR for the gpu-fleet lab, not NVIDIA software"
MAINTAINER = "gpu-fleet lab (NVIDIA SIMULATOR) <nvidia-sim@gpufleet.lab.invalid>"

# Driver branch and the versions published in the simulated CUDA repository (Debian 12). The
# newest is what an unpinned install gets; the older one lets the lab exercise a driver upgrade
# (installed != loaded until the reboot).
DRIVER_BRANCH = "580"
DRIVER_VERSIONS = ("580.82.07", "580.95.05")
CUDA_VERSION = "13.0"  # the CUDA version the 580 driver reports
# The pinning package's own version, like NVIDIA's nvidia-driver-pinning-<branch> packages.
PINNING_VERSION = f"{DRIVER_BRANCH}-1"

# NVIDIA Container Toolkit versions in the simulated libnvidia-container repository.
TOOLKIT_VERSIONS = ("1.19.0", "1.19.1")

# Debian architecture -> directory of NVIDIA's CUDA repository for it.
CUDA_ARCH_DIRS = {"amd64": "x86_64", "arm64": "sbsa"}
ARCHITECTURES = ("amd64", "arm64")

# Fixed timestamps inside the packages, so a rebuild from the same sources gives the same bytes.
SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01T00:00:00Z


@dataclass(frozen=True)
class DebFile:
    path: str  # absolute path on the target host
    source: str  # file name under files/, or "" with text set
    mode: int = 0o644
    text: str | None = None


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    architecture: str  # "amd64", "arm64" or "all"
    synopsis: str  # what the real package is, after the SIMULATOR marker
    source: str
    section: str = "utils"
    depends: tuple[str, ...] = ()
    recommends: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    breaks: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    multi_arch: str | None = None
    files: tuple[DebFile, ...] = ()
    scripts: dict[str, str] = field(default_factory=dict)  # postinst/prerm/postrm -> files/ name
    substitutions: dict[str, str] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_{self.architecture}.deb"

    def control(self) -> str:
        """The DEBIAN/control text (field order as dpkg-deb and NVIDIA's packages use it)."""
        lines = [
            f"Package: {self.name}",
            f"Source: {self.source}",
            f"Version: {self.version}",
            f"Architecture: {self.architecture}",
            f"Maintainer: {MAINTAINER}",
            f"Section: {self.section}",
            "Priority: optional",
        ]
        if self.multi_arch:
            lines.append(f"Multi-Arch: {self.multi_arch}")
        for label, values in (
            ("Depends", self.depends),
            ("Recommends", self.recommends),
            ("Conflicts", self.conflicts),
            ("Breaks", self.breaks),
            ("Replaces", self.replaces),
            ("Provides", self.provides),
        ):
            if values:
                lines.append(f"{label}: {', '.join(values)}")
        lines.append("Homepage: https://github.com/NVIDIA (simulated; this is not NVIDIA software)")
        lines.append(f"Description: {SIMULATOR}: {self.synopsis}")
        lines.append(f" {SIMULATOR}. A stand-in with the name, version and dependencies")
        lines.append(" of the real package, for the gpu-fleet lab (containers without GPUs).")
        return "\n".join(lines) + "\n"


def _substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def render(source: str, substitutions: dict[str, str]) -> str:
    """A file from files/ with @NAME@ placeholders filled (the JSON library inlined)."""
    values = dict(substitutions)
    values.setdefault("JSON_LIB", (FILES / "json.pl").read_text())
    values.setdefault("DEFAULT_CONFIG_TOML", (FILES / "config.toml").read_text())
    return _substitute((FILES / source).read_text(), values)


# ---------------------------------------------------------------------------- the package set


def cuda_packages(arch: str) -> list[Package]:
    """Driver-branch packages of the simulated CUDA repository (Debian 12) for one arch."""
    packages: list[Package] = []
    for upstream in DRIVER_VERSIONS:
        v = f"{upstream}-1"
        subs = {"VERSION": upstream, "DRIVER_VERSION": upstream, "CUDA_VERSION": CUDA_VERSION}
        kmod_files = (
            DebFile("/usr/lib/nvidia-sim/nvidia-sim-kmod", "nvidia-sim-kmod", 0o755),
            DebFile("/usr/lib/nvidia-sim/kmod-version", "", 0o644, text=upstream + "\n"),
            DebFile("/lib/systemd/system/nvidia-sim-kmod.service", "nvidia-sim-kmod.service"),
        )
        kmod_scripts = {"postinst": "kmod.postinst", "prerm": "kmod.prerm"}
        packages += [
            Package(
                "nvidia-kernel-open-dkms", v, arch,
                "NVIDIA open GPU kernel modules (DKMS source); simulated module loaded at boot",
                "nvidia-graphics-drivers", section="kernel",
                conflicts=("nvidia-kernel-dkms",), replaces=("nvidia-kernel-dkms",),
                provides=(f"nvidia-kernel-dkms-any (= {v})", f"nvidia-open-kernel-dkms (= {v})"),
                files=kmod_files, scripts=kmod_scripts, substitutions=subs,
            ),
            Package(
                "nvidia-kernel-dkms", v, arch,
                "NVIDIA proprietary GPU kernel module (DKMS source); simulated module loaded at boot",
                "nvidia-graphics-drivers", section="kernel",
                conflicts=("nvidia-kernel-open-dkms",), replaces=("nvidia-kernel-open-dkms",),
                provides=(f"nvidia-kernel-dkms-any (= {v})",),
                files=kmod_files, scripts=kmod_scripts, substitutions=subs,
            ),
            Package(
                "nvidia-driver-cuda", v, arch,
                "NVIDIA driver CUDA integration components (nvidia-smi)",
                "nvidia-graphics-drivers",
                depends=(f"nvidia-kernel-open-dkms (= {v}) | nvidia-kernel-dkms (= {v})",),
                recommends=("nvidia-persistenced",),
                conflicts=("nvidia-smi",), replaces=("nvidia-smi",),
                provides=(f"nvidia-smi (= {v})",),
                files=(DebFile("/usr/bin/nvidia-smi", "nvidia-smi", 0o755),),
                substitutions=subs,
            ),
            Package(
                "nvidia-driver", v, arch,
                "NVIDIA metapackage (driver userspace)",
                "nvidia-graphics-drivers",
                depends=(f"nvidia-driver-cuda (= {v})",),
            ),
            Package(
                "nvidia-open", v, arch,
                "NVIDIA driver with open kernel modules (metapackage)",
                "nvidia-graphics-drivers",
                depends=(f"nvidia-driver (= {v})", f"nvidia-kernel-open-dkms (= {v})"),
            ),
            Package(
                f"cuda-drivers-{DRIVER_BRANCH}", v, arch,
                f"CUDA drivers, branch {DRIVER_BRANCH} (metapackage)",
                "cuda-drivers",
                depends=(
                    f"nvidia-driver (= {v})",
                    f"nvidia-kernel-dkms (= {v}) | nvidia-kernel-open-dkms (= {v})",
                ),
            ),
            Package(
                "cuda-drivers", v, arch,
                "CUDA drivers (metapackage, newest branch)",
                "cuda-drivers",
                depends=(f"cuda-drivers-{DRIVER_BRANCH} (= {v})",),
            ),
            Package(
                "nvidia-persistenced", v, arch,
                "daemon to maintain persistent software state in the NVIDIA driver",
                "nvidia-persistenced",
                files=(
                    DebFile("/usr/bin/nvidia-persistenced", "nvidia-persistenced", 0o755),
                    DebFile("/lib/systemd/system/nvidia-persistenced.service",
                            "nvidia-persistenced.service"),
                ),
                scripts={"postinst": "persistenced.postinst", "prerm": "persistenced.prerm"},
                substitutions=subs,
            ),
            Package(
                "nvidia-fabricmanager", v, arch,
                "Fabric Manager for NVSwitch based systems",
                "nvidia-fabricmanager",
                files=(
                    DebFile("/usr/bin/nv-fabricmanager", "nv-fabricmanager", 0o755),
                    DebFile("/lib/systemd/system/nvidia-fabricmanager.service",
                            "nvidia-fabricmanager.service"),
                    DebFile("/usr/share/nvidia/nvswitch/fabricmanager.cfg", "", 0o644,
                            text=f"# {SIMULATOR}\nLOG_LEVEL=4\nFM_STAY_RESIDENT_ON_FAILURES=0\n"),
                ),
                substitutions=subs,
            ),
            Package(
                f"cuda-drivers-fabricmanager-{DRIVER_BRANCH}", v, arch,
                f"CUDA drivers with Fabric Manager, branch {DRIVER_BRANCH} (metapackage)",
                "cuda-drivers",
                depends=(f"cuda-drivers-{DRIVER_BRANCH} (= {v})", f"nvidia-fabricmanager (= {v})"),
            ),
        ]
    packages.append(
        Package(
            f"nvidia-driver-pinning-{DRIVER_BRANCH}", PINNING_VERSION, "all",
            f"pins NVIDIA driver packages to branch {DRIVER_BRANCH} (apt preferences)",
            "nvidia-driver-pinning", section="admin",
            files=(DebFile(f"/etc/apt/preferences.d/nvidia-driver-pinning-{DRIVER_BRANCH}", "",
                           0o644, text=pinning_preferences()),),
        )
    )
    return packages


def pinning_preferences() -> str:
    """The apt preferences file of nvidia-driver-pinning-<branch>: every driver package of the
    branch wins over newer branches in the same repository."""
    names = [
        "nvidia-kernel-open-dkms", "nvidia-kernel-dkms", "nvidia-driver-cuda", "nvidia-driver",
        "nvidia-open", "cuda-drivers", "nvidia-persistenced", "nvidia-fabricmanager",
        f"cuda-drivers-{DRIVER_BRANCH}", f"cuda-drivers-fabricmanager-{DRIVER_BRANCH}",
    ]
    return (
        f"# {SIMULATOR}\n"
        f"# Keeps the NVIDIA driver packages on branch {DRIVER_BRANCH}.\n"
        f"Package: {' '.join(names)}\n"
        f"Pin: version {DRIVER_BRANCH}.*\n"
        "Pin-Priority: 1000\n"
    )


def toolkit_packages(arch: str) -> list[Package]:
    """Packages of the simulated libnvidia-container repository (stable/deb) for one arch."""
    packages: list[Package] = []
    for upstream in TOOLKIT_VERSIONS:
        v = f"{upstream}-1"
        subs = {"VERSION": upstream}
        packages += [
            Package(
                "libnvidia-container1", v, arch, "NVIDIA container runtime library",
                "libnvidia-container", section="libs", multi_arch="same",
                files=(DebFile("/usr/share/doc/libnvidia-container1/SIMULATOR", "", 0o644,
                               text=f"{SIMULATOR}: no library is installed.\n"),),
            ),
            Package(
                "libnvidia-container-tools", v, arch,
                "NVIDIA container runtime library (command-line tools)",
                "libnvidia-container",
                depends=(f"libnvidia-container1 (>= {v})",),
                files=(DebFile("/usr/bin/nvidia-container-cli", "nvidia-container-cli", 0o755),),
                substitutions=subs,
            ),
            Package(
                "nvidia-container-toolkit-base", v, arch, "NVIDIA Container Toolkit Base",
                "nvidia-container-toolkit",
                breaks=("nvidia-container-runtime (<= 3.5.0-1)", "nvidia-container-runtime-hook",
                        "nvidia-container-toolkit (<= 1.10.0-1)"),
                replaces=("nvidia-container-runtime (<= 3.5.0-1)", "nvidia-container-runtime-hook"),
                files=(
                    DebFile("/usr/bin/nvidia-ctk", "nvidia-ctk", 0o755),
                    DebFile("/usr/bin/nvidia-container-runtime", "nvidia-container-runtime", 0o755),
                    DebFile("/usr/bin/nvidia-cdi-hook", "nvidia-container-runtime-hook", 0o755),
                    DebFile("/usr/libexec/nvidia-sim/inject-gpus", "inject-gpus", 0o755),
                ),
                scripts={"postinst": "toolkit-base.postinst"},
                substitutions=subs,
            ),
            Package(
                "nvidia-container-toolkit", v, arch, "NVIDIA Container toolkit",
                "nvidia-container-toolkit",
                depends=(f"nvidia-container-toolkit-base (= {v})",
                         f"libnvidia-container-tools (= {v})",
                         "libnvidia-container-tools (<< 2.0.0)"),
                breaks=("nvidia-container-runtime (<= 3.5.0-1)", "nvidia-container-runtime-hook"),
                replaces=("nvidia-container-runtime (<= 3.5.0-1)", "nvidia-container-runtime-hook"),
                files=(DebFile("/usr/bin/nvidia-container-runtime-hook",
                               "nvidia-container-runtime-hook", 0o755),),
                scripts={"postinst": "toolkit.postinst", "postrm": "toolkit.postrm"},
                substitutions=subs,
            ),
        ]
    return packages


# ---------------------------------------------------------------------------- building


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def build_deb(package: Package, out_dir: Path) -> Path:
    """Write package.filename into out_dir with dpkg-deb; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nvsim-deb-") as tmp:
        root = Path(tmp) / "root"
        debian = root / "DEBIAN"
        debian.mkdir(parents=True)
        root.chmod(0o755)
        debian.chmod(0o755)
        conffiles = []
        for f in package.files:
            text = f.text if f.text is not None else render(f.source, package.substitutions)
            _write(root / f.path.lstrip("/"), text, f.mode)
            if f.path.startswith("/etc/"):
                conffiles.append(f.path)
        _write(debian / "control", package.control(), 0o644)
        if conffiles:
            _write(debian / "conffiles", "\n".join(conffiles) + "\n", 0o644)
        for script, source in package.scripts.items():
            subs = {"VERSION": package.version, **package.substitutions}
            _write(debian / script, render(source, subs), 0o755)
        target = out_dir / package.filename
        dpkg_build(root, target, "gzip")
    return target


def dpkg_build(root: Path, target: Path, compression: str) -> None:
    """dpkg-deb --build of a package tree, reproducibly: directories 0755, every mtime and the
    build date SOURCE_DATE_EPOCH, files owned by root."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            (Path(dirpath) / name).chmod(0o755)
        for name in [*dirnames, *filenames]:
            os.utime(Path(dirpath) / name, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(target)],
        check=True, capture_output=True, text=True, env=env,
    )
