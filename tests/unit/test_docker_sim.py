"""The lab's stand-in for Docker's apt repository (scripts/lab/docker_sim): Debian's archive read
and verified correctly, the packages named and versioned exactly as production asks for them."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from operations.docker_packages import DOCKER_HELD_PACKAGES, docker_apt_version, wanted_packages
from scripts.lab.docker_sim import debian
from scripts.lab.docker_sim import packages as pkgs
from scripts.lab.docker_sim.repo import release_text

DEBIAN_12 = {"id": "debian", "version_id": "12", "codename": "bookworm"}


@pytest.mark.parametrize(("version", "upstream"), [
    ("28.5.2+dfsg4-5", "28.5.2"),
    ("26.1.5+dfsg1-9+deb13u1+b1", "26.1.5"),
    ("1.7.24~ds1-6+deb13u1", "1.7.24"),
    ("0.19.0-1+b3", "0.19.0"),
    ("1:2.3-1", "2.3"),
])
def test_upstream_of_a_debian_version(version, upstream):
    assert debian.upstream_of(version) == upstream


PACKAGES = """\
Package: docker.io
Version: 26.1.5+dfsg1-9+deb13u1
Filename: pool/main/d/docker.io/docker.io_26.1.5+dfsg1-9+deb13u1_amd64.deb
SHA256: aa
Description: Linux container runtime
 second line

Package: docker.io
Version: 26.1.5+dfsg1-9+deb13u1+b1
Filename: pool/main/d/docker.io/docker.io_26.1.5+dfsg1-9+deb13u1+b1_amd64.deb
SHA256: bb

Package: docker-cli
Version: 26.1.5+dfsg1-9+deb13u1+b1
SHA256: cc
"""


def test_an_index_entry_is_found_by_upstream_version_newest_revision_last():
    stanzas = debian.parse_stanzas(PACKAGES)
    assert stanzas[0]["Description"] == "Linux container runtime\nsecond line"
    found = debian.find_entry(stanzas, debian.DebianDeb("docker.io", "26.1.5", ("trixie",)))
    assert found["SHA256"] == "bb"
    assert debian.find_entry(stanzas, debian.DebianDeb("docker.io", "28.5.2", ("sid",))) is None


def test_the_release_file_gives_an_index_its_sha256_or_says_it_has_none():
    release = debian.parse_stanzas(
        "Suite: trixie\nSHA256:\n 0123 100 main/binary-amd64/Packages.xz\n 4567 50 main/Contents-amd64\n")[0]
    assert debian.index_sha256(release, "main/binary-amd64/Packages.xz") == "0123"
    with pytest.raises(LookupError, match="main/binary-arm64/Packages.xz"):
        debian.index_sha256(release, "main/binary-arm64/Packages.xz")


def test_a_cached_file_is_used_only_while_it_matches_the_recorded_sha256(tmp_path, monkeypatch):
    deb = debian.DebianDeb("docker-cli", "28.5.2", ("sid",))
    data = b"a debian package"
    (tmp_path / "docker-cli_28.deb").write_bytes(data)
    (tmp_path / debian.MANIFEST).write_text(
        '{"docker-cli@28.5.2": {"file": "docker-cli_28.deb", "sha256": "%s", '
        '"version": "28.5.2+dfsg4-5", "suite": "sid"}}' % hashlib.sha256(data).hexdigest())

    def offline(url):
        raise AssertionError(f"fetched {url}")

    monkeypatch.setattr(debian, "_get", offline)
    assert debian.fetch_all([deb], tmp_path) == {deb.key: tmp_path / "docker-cli_28.deb"}
    (tmp_path / "docker-cli_28.deb").write_bytes(b"tampered")
    with pytest.raises(AssertionError, match="fetched .*/dists/sid/InRelease"):
        debian.fetch_all([deb], tmp_path)


def test_stand_ins_carry_exactly_the_versions_production_pins():
    """What production asks apt for on Debian 12 (docker-ce at Docker's exact apt version, the
    companions at an upstream version) is what the stand-in publishes."""
    published = {(p.name, p.version) for p in pkgs.stand_ins()}
    for engine in pkgs.ENGINE_VERSIONS:
        companions = {"containerd.io": pkgs.CONTAINERD.upstream,
                      "docker-buildx-plugin": pkgs.BUILDX.upstream,
                      "docker-compose-plugin": pkgs.COMPOSE.upstream}
        for name, pin in wanted_packages("docker", engine, DEBIAN_12, companions):
            versions = {v for n, v in published if n == name}
            if ":" in pin:
                assert pin in versions, (name, pin)
            else:
                assert any(v.startswith(pin + "-") for v in versions), (name, pin)
    assert {name for name, _ in published} == set(DOCKER_HELD_PACKAGES)
    assert ("docker-ce", docker_apt_version("28.5.2", "debian", "12", "bookworm")) in published


def test_the_production_default_engine_is_one_the_stand_in_offers():
    from group_data import all as defaults

    assert defaults.docker_version in pkgs.ENGINE_VERSIONS


def test_every_stand_in_says_what_it_is_and_whose_build_it_carries():
    engine = next(p for p in pkgs.stand_ins() if p.name == "docker-ce" and p.upstream == "28.5.2")
    carried = {deb.key: f"{deb.upstream}+debian" for deb in engine.carries}
    control = pkgs.control_text(engine, carried)
    assert "Description: LAB STAND-IN for Docker's docker-ce" in control
    assert "docker.io 28.5.2+debian" in control and "not a package published by Docker" in control
    assert "Conflicts: docker (<< 1.5~), docker-engine, docker.io" in control
    assert engine.filename == "docker-ce_28.5.2-1~debian.12~bookworm_amd64.deb"
    containerd = next(p for p in pkgs.stand_ins() if p.name == "containerd.io")
    assert "Provides: containerd, runc" in pkgs.control_text(
        containerd, {deb.key: "x" for deb in containerd.carries})


def test_the_engine_unit_starts_the_binary_where_dockers_package_puts_it():
    debian_unit = "ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock"
    assert pkgs.unit_text(debian_unit).startswith("ExecStart=/usr/bin/dockerd -H fd://")
    targets = {t for p in pkgs.stand_ins() if p.name == "docker-ce" for _, _, t in p.files}
    assert "usr/bin/dockerd" in targets and "lib/systemd/system/docker.service" in targets


def test_maintainer_scripts_start_on_install_and_restart_on_upgrade(tmp_path):
    engine = next(p for p in pkgs.stand_ins() if p.name == "docker-ce")
    script = pkgs.postinst_text(engine)
    assert "groupadd --system docker" in script
    assert "deb-systemd-helper enable docker.socket docker.service" in script
    assert "deb-systemd-invoke restart docker.service" in script
    assert "deb-systemd-invoke start docker.socket docker.service" in script
    path = tmp_path / "postinst"
    path.write_text(script)
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
    path.write_text(pkgs.prerm_text(engine) + pkgs.postrm_text(engine))
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0


def test_the_release_file_lists_each_index_with_its_sha256():
    text = release_text({"stable/binary-amd64/Packages": b"abc"}, 0)
    assert "Suite: bookworm" in text and "Components: stable" in text and "LAB STAND-IN" in text
    assert f" {hashlib.sha256(b'abc').hexdigest()}                3 stable/binary-amd64/Packages" in text
