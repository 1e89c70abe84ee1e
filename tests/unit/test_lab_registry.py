"""The lab's registry stand-in (scripts/lab/registry): the pure parts. No Docker, no network:
the config and Dockerfile it builds, its names, and the "already pushed" decision from the
registry API's answers. `python -m scripts.lab.registry.e2e` runs the real thing."""

from __future__ import annotations

import pytest
import yaml

from scripts.lab.fleet import LabError
from scripts.lab.registry import service

PUSH = "127.0.0.1:25123"
DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
IMAGE_ID = "sha256:" + "c" * 64


def test_config_is_filesystem_http_5000_no_auth_delete_enabled():
    config = yaml.safe_load(service.render_config())
    assert config["version"] == 0.1
    assert config["storage"]["filesystem"] == {"rootdirectory": "/var/lib/docker-registry"}
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["http"]["addr"] == ":5000"
    assert "auth" not in config  # Debian's default config asks for htpasswd
    assert "tls" not in config["http"]
    assert config["http"]["headers"]["X-Lab-Stand-In"] == [service.STAND_IN_HEADER]  # one value


def test_dockerfile_builds_from_the_lab_base_with_debian_package_and_config():
    dockerfile = service.render_dockerfile()
    lines = dockerfile.splitlines()
    assert "ARG BASE" in lines and "FROM ${BASE}" in lines
    assert "apt-get install -y --no-install-recommends docker-registry" in dockerfile
    assert "COPY config.yml /etc/docker/registry/config.yml" in lines
    assert "USER docker-registry" in lines
    assert lines[-1] == ('CMD ["/usr/bin/docker-registry", "serve", '
                         '"/etc/docker/registry/config.yml"]')
    assert set(service.recipe_files()) == {"Dockerfile", "config.yml"}


def test_names():
    assert service.container_name("gpulab") == "gpulab-registry"
    assert service.volume_name("gpulab") == "gpulab-registry-data"
    assert service.IMAGE_NAME == "gpufleet-lab-registry"  # purged with the lab's image cache


def test_default_push_port_is_stable_per_lab_and_in_range():
    low, high = service.PUSH_PORT_RANGE
    assert service.default_push_port("gpulab") == service.default_push_port("gpulab")
    ports = {service.default_push_port(f"lab{i}") for i in range(50)}
    assert all(low <= port < high for port in ports)
    assert len(ports) > 40


@pytest.mark.parametrize("given, expected", [
    ("lab/debian:bookworm", ("lab/debian", "bookworm")),
    ("lab/debian", ("lab/debian", "latest")),
    ("engine", ("engine", "latest")),
    ("a/b/c:1.2.3-x", ("a/b/c", "1.2.3-x")),
])
def test_split_repository_tag(given, expected):
    assert service.split_repository_tag(given) == expected


@pytest.mark.parametrize("bad", [
    "", "Lab/Debian:x", "registry.example.com/lab/debian:1", "localhost:5000/lab/x",
    "localhost/lab:1", "lab/debian@sha256:" + "a" * 64,
])
def test_split_repository_tag_refuses_hosts_digests_upper_case(bad):
    with pytest.raises(LabError):
        service.split_repository_tag(bad)


def test_push_names_push_on_loopback_pull_on_the_lab_network():
    registry = {"address": "172.29.7.2:5000", "push": PUSH}
    assert service.push_names(registry, "lab/debian:bookworm") == (
        f"{PUSH}/lab/debian:bookworm", "172.29.7.2:5000/lab/debian:bookworm")
    assert service.manifest_url(PUSH, "lab/debian", "bookworm") == \
        f"http://{PUSH}/v2/lab/debian/manifests/bookworm"


def test_head_accepts_every_manifest_kind_a_pull_accepts():
    assert set(service.MANIFEST_MEDIA_TYPES) == {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    }


REPO = f"{PUSH}/lab/debian"


def manifest(config_digest: str, media_type: str | None =
             "application/vnd.docker.distribution.manifest.v2+json") -> dict:
    document = {"schemaVersion": 2, "config": {"digest": config_digest, "size": 1}, "layers": []}
    if media_type:
        document["mediaType"] = media_type
    return document


@pytest.mark.parametrize("remote, repo_digests, remote_manifest, expected", [
    # The registry has no such tag (HEAD 404): push.
    (None, [f"{REPO}@{DIGEST}"], None, False),
    # The tag holds what this machine pushed from this image: nothing to do.
    (DIGEST, [f"{REPO}@{DIGEST}"], None, True),
    # ...recorded for another registry (other port) or repository: not proof.
    (DIGEST, [f"127.0.0.1:1/lab/debian@{DIGEST}", f"{PUSH}/lab/other@{DIGEST}"], None, False),
    # The tag moved to another image: push.
    (OTHER, [f"{REPO}@{DIGEST}"], None, False),
    # No local record, but the remote manifest's config is this image: nothing to do.
    (OTHER, [], manifest(IMAGE_ID), True),
    (OTHER, [], manifest(IMAGE_ID, "application/vnd.oci.image.manifest.v1+json"), True),
    (OTHER, [], manifest(IMAGE_ID, None), True),
    # ...another image's config, or an index (several images): push.
    (OTHER, [], manifest("sha256:" + "d" * 64), False),
    (OTHER, [], {"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}, False),
    (OTHER, [], None, False),
])
def test_already_there(remote, repo_digests, remote_manifest, expected):
    assert service.already_there(remote, repo_digests, REPO, IMAGE_ID, remote_manifest) is expected


def test_a_running_container_is_kept_only_with_same_image_address_and_port():
    assert service.wanted_state("n", "172.29.7.2", 25123, "gpufleet-lab-registry:abc") == \
        "true gpufleet-lab-registry:abc 172.29.7.2 127.0.0.1:25123"
    fmt = service.state_format("gpulab-net")
    assert '"gpulab-net"' in fmt and '"5000/tcp"' in fmt


def test_image_is_tagged_by_its_recipe_not_by_where_it_was_written(monkeypatch, tmp_path):
    from scripts.lab import images

    monkeypatch.setattr(images, "ensure_base", lambda: "gpufleet-lab-base:abc")
    monkeypatch.setattr(images, "_image_exists", lambda tag: True)  # nothing is built
    for name, text in service.recipe_files().items():
        (tmp_path / name).write_text(text)
    recipe = images.recipe_hash(tmp_path, extra="gpufleet-lab-base:abc")
    expected = f"gpufleet-lab-registry:{recipe}"
    assert service.ensure_image("lab-a") == service.ensure_image("lab-b") == expected


def test_the_stand_ins_dockerfiles_share_one_install_recipe():
    from scripts.lab import images
    from scripts.lab.hub import service as hub
    from scripts.lab.nvidia_sim import server as nvidia

    for module, package in ((service, "docker-registry"), (hub, "python3"),
                            (nvidia, "busybox-static")):
        lines = module.render_dockerfile().splitlines()
        assert lines[1:7] == images.packages_dockerfile("", [package], "").splitlines()[1:], module
