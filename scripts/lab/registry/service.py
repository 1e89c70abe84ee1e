"""The lab's container registry (LAB STAND-IN for the production registry): Debian's
`docker-registry` package (distribution 2.8) in a container on the lab network.

Lab hosts cannot pull from any public registry; production pulls its images from a registry, so
the lab does too. This machine's dockerd pushes to it through a port published on loopback
(`127.0.0.1:<port>`: Docker talks plain HTTP to loopback registries without configuration); lab
hosts pull from `<address>:5000` over plain HTTP, so their daemon.json lists that address under
`insecure-registries` (see README.md).

    registry = start(lab, network, address, publish_port)
    #   -> {"address": "<ip>:5000" (lab hosts pull), "push": "127.0.0.1:<port>" (this machine)}
    name = push(lab, local_image, "lab/debian:bookworm", registry)
    #   -> "<ip>:5000/lab/debian:bookworm"
    stop(lab)      # container gone, stored images kept (the volume)
    remove(lab)    # container, volume and this machine's push tags gone

The image is built here, offline, FROM the lab's debootstrap'ed base (images.ensure_image: tagged
by a hash of its recipe, shared by every lab, removed by `lab.py down --purge-images`).

Standard library only (the docker CLI through subprocess, the registry API through urllib).
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

from scripts.lab import fleet, images
from scripts.lab.fleet import LABEL, LabError, docker, exists, say

ROLE_LABEL = "gpufleet.role"
ROLE = "registry"
# On the container: the loopback address this machine pushes to (remove() untags those names).
PUSH_LABEL = "gpufleet.registry.push"
PORT = 5000
DATA_DIR = "/var/lib/docker-registry"
CONFIG_PATH = "/etc/docker/registry/config.yml"
IMAGE_NAME = f"{images.IMAGE_PREFIX}registry"
STAND_IN_HEADER = "gpu-fleet lab registry (Debian docker-registry 2.8): lab stand-in"
PUSH_PORT_RANGE = (25000, 26000)  # default loopback ports: one per lab name, from a hash

# What a pull of a tag may get back: Docker's and OCI's single-image manifests and indexes.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
)
SINGLE_IMAGE_MEDIA_TYPES = MANIFEST_MEDIA_TYPES[0::2]


# --- Pure ----------------------------------------------------------------------------------


def container_name(lab: str) -> str:
    return f"{lab}-registry"


def volume_name(lab: str) -> str:
    return f"{lab}-registry-data"


def render_config() -> str:
    """/etc/docker/registry/config.yml: filesystem storage, plain HTTP on :5000, no auth (the
    package's default config asks for htpasswd), deletes enabled, access log on stderr."""
    return f"""\
# gpu-fleet lab registry: LAB STAND-IN for the production registry. No auth, plain HTTP.
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: registry
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {DATA_DIR}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: true
      age: 24h
      interval: 6h
      dryrun: false
http:
  addr: :{PORT}
  headers:
    X-Content-Type-Options: [nosniff]
    X-Lab-Stand-In: [{json.dumps(STAND_IN_HEADER)}]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
"""


def render_dockerfile() -> str:
    return images.packages_dockerfile(
        "gpu-fleet lab registry: LAB STAND-IN for the production registry (Debian's "
        "docker-registry).",
        ["docker-registry"], f"""\
COPY config.yml {CONFIG_PATH}
LABEL {ROLE_LABEL}={ROLE} \\
      org.opencontainers.image.description="gpu-fleet lab registry, a lab stand-in"
USER docker-registry
VOLUME {DATA_DIR}
EXPOSE {PORT}
CMD ["/usr/bin/docker-registry", "serve", "{CONFIG_PATH}"]
""")


def recipe_files() -> dict[str, str]:
    """The image's build context: file name -> text."""
    return {"Dockerfile": render_dockerfile(), "config.yml": render_config()}


def default_push_port(lab: str) -> int:
    """The loopback port a lab's registry is published on unless told otherwise: the same
    lab name gets the same port."""
    low, high = PUSH_PORT_RANGE
    return low + int(hashlib.sha256(lab.encode()).hexdigest(), 16) % (high - low)


def split_repository_tag(repository_tag: str) -> tuple[str, str]:
    """"lab/debian:bookworm" -> ("lab/debian", "bookworm"); no tag means "latest". A registry
    host is not allowed here: the registry is the one this module runs."""
    repository, colon, tag = repository_tag.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = repository_tag, "latest"
    first = repository.split("/", 1)[0]
    if not repository or "@" in repository_tag or repository != repository.lower() \
            or ("/" in repository and ("." in first or ":" in first or first == "localhost")):
        raise LabError(f"repository {repository_tag!r}: expected lower-case path[:tag] without "
                       "a registry host or digest (e.g. lab/debian:bookworm)")
    return repository, tag


def manifest_url(base: str, repository: str, reference: str) -> str:
    return f"http://{base}/v2/{repository}/manifests/{reference}"


def push_names(registry: dict, repository_tag: str) -> tuple[str, str]:
    """(the name this machine pushes, the name lab hosts pull) for a repository:tag."""
    repository, tag = split_repository_tag(repository_tag)
    return f"{registry['push']}/{repository}:{tag}", f"{registry['address']}/{repository}:{tag}"


def already_there(remote_digest: str | None, local_repo_digests: list[str], push_repository: str,
                  local_image_id: str = "", remote_manifest: dict | None = None) -> bool:
    """Whether the registry's tag already holds this local image, from the registry's answers:

    - `remote_digest`: Docker-Content-Digest of HEAD /v2/<repo>/manifests/<tag> (None: 404);
    - `local_repo_digests`: the local image's RepoDigests (`<push>/<repo>@sha256:...` entries
      are what this machine pushed before);
    - `remote_manifest` (optional): that manifest's JSON, for when the local record is gone
      (tag removed, image re-tagged): a single-image manifest whose config digest is the local
      image ID is the same image (the ID is the digest of the config).
    """
    if not remote_digest:
        return False
    if f"{push_repository}@{remote_digest}" in local_repo_digests:
        return True
    if remote_manifest and local_image_id:
        media_type = remote_manifest.get("mediaType", SINGLE_IMAGE_MEDIA_TYPES[0])
        config = remote_manifest.get("config") or {}
        return media_type in SINGLE_IMAGE_MEDIA_TYPES and config.get("digest") == local_image_id
    return False


def wanted_state(network: str, address: str, publish_port: int, image: str) -> str:
    """What `docker inspect -f STATE_FORMAT` prints for a registry container start() keeps."""
    return f"true {image} {address} 127.0.0.1:{publish_port}"


def state_format(network: str) -> str:
    return ("{{.State.Running}} {{.Config.Image}} {{(index .NetworkSettings.Networks \"" + network
            + "\").IPAddress}} {{range (index .HostConfig.PortBindings \"" + f"{PORT}/tcp"
            + "\")}}{{.HostIp}}:{{.HostPort}}{{end}}")


# --- The registry API (this machine, through the loopback port) ----------------------------


def _request(method: str, url: str, accept: tuple[str, ...] = (), timeout: float = 10):
    """(status, headers, body) of one HTTP request; (0, {}, b"") when nothing answers."""
    request = urllib.request.Request(url, method=method,
                                     headers={"Accept": ", ".join(accept)} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}, b""


def api_answers(push: str) -> bool:
    """GET /v2/ answers 200 (no auth)."""
    return _request("GET", f"http://{push}/v2/", timeout=2)[0] == 200


def remote_digest(push: str, repository: str, tag: str) -> str | None:
    """The digest the registry holds for repository:tag (HEAD, with the Accept headers a pull
    sends, so the registry does not down-convert the manifest); None when it has no such tag."""
    url = manifest_url(push, repository, tag)
    status, headers, _ = _request("HEAD", url, MANIFEST_MEDIA_TYPES)
    if status == 404:
        return None
    digest = {k.lower(): v for k, v in headers.items()}.get("docker-content-digest")
    if status != 200 or not digest:
        raise LabError(f"registry {push}: HEAD {url} answered {status or 'nothing'}")
    return digest


def remote_manifest(push: str, repository: str, digest: str) -> dict | None:
    status, _, body = _request("GET", manifest_url(push, repository, digest), MANIFEST_MEDIA_TYPES)
    try:
        return json.loads(body) if status == 200 else None
    except ValueError:
        return None


# --- The image and the container -----------------------------------------------------------


def ensure_image(lab: str | None = None) -> str:
    """The registry image (Debian 12 minbase + docker-registry + config.yml), tagged
    gpufleet-lab-registry:<hash of the recipe and base>; built once (about 15 s), shared by labs."""
    return images.ensure_image_from(IMAGE_NAME, recipe_files(),
                                    "Debian's docker-registry, lab stand-in")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def running_push_address(lab: str) -> str | None:
    """127.0.0.1:<port> of this lab's registry container, running or not; None without one."""
    name = container_name(lab)
    if not exists("container", name):
        return None
    return docker("inspect", "-f", "{{index .Config.Labels \"" + PUSH_LABEL + "\"}}", name,
                  check=False) or None


def start(lab: str, network: str, address: str, publish_port: int | None = None,
          labels: dict[str, str] | None = None, timeout_s: float = 30) -> dict:
    """Run (or keep running) `<lab>-registry` at `address` on `network`, published on
    127.0.0.1:<publish_port>; returns {"address": "<address>:5000", "push": "127.0.0.1:<port>"}.

    `publish_port` None: the running container's port, else default_push_port(lab) when free,
    else any free port. A running container with the same image, address and port is kept
    (about 0.1 s); another is replaced, and the stored images (the volume) are kept.
    `labels`: extra labels for the container and volume (e.g. gpufleet.scratch=...).
    """
    name, volume = container_name(lab), volume_name(lab)
    image = ensure_image(lab)
    chosen_here = publish_port is None
    if publish_port is None:
        running = running_push_address(lab)
        publish_port = int(running.rsplit(":", 1)[1]) if running else default_push_port(lab)
    result = {"address": f"{address}:{PORT}", "push": f"127.0.0.1:{publish_port}"}
    if exists("container", name):
        state = docker("inspect", "-f", state_format(network), name, check=False)
        if state == wanted_state(network, address, publish_port, image):
            _wait_ready(name, result["push"], timeout_s)
            return result
        say(f"registry {name}: replacing ({state or 'not inspectable'})")
        docker("rm", "-f", name)
    if not _port_free(publish_port):
        if not chosen_here:
            raise LabError(f"registry {name}: 127.0.0.1:{publish_port} is taken on this machine")
        publish_port = free_loopback_port()
        result["push"] = f"127.0.0.1:{publish_port}"
    label_args = ["--label", f"{LABEL}={lab}", "--label", f"{ROLE_LABEL}={ROLE}"]
    for key, value in (labels or {}).items():
        label_args += ["--label", f"{key}={value}"]
    if not exists("volume", volume):
        docker("volume", "create", *label_args, volume)
    docker(
        "run", "-d", "--name", name, "--hostname", "registry",
        *label_args, "--label", f"{PUSH_LABEL}={result['push']}",
        "--network", network, "--ip", address,
        "-p", f"127.0.0.1:{publish_port}:{PORT}",
        "--restart", "unless-stopped", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "-v", f"{volume}:{DATA_DIR}",
        image,
    )
    _wait_ready(name, result["push"], timeout_s)
    return result


def _wait_ready(name: str, push: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api_answers(push):
            return
        if docker("inspect", "-f", "{{.State.Running}}", name, check=False) != "true":
            break
        time.sleep(0.2)
    logs = subprocess.run(["docker", "logs", "--tail", "20", name], capture_output=True,
                          check=False)
    output = (logs.stdout + logs.stderr).decode(errors="replace")[-800:]
    raise LabError(f"registry {name}: GET http://{push}/v2/ did not answer 200 within "
                   f"{timeout_s:.0f}s: {output}")


def push(lab: str, local_image: str, repository_tag: str, registry: dict) -> str:
    """Tag `local_image` as <push>/<repository_tag> and push it, unless the registry already
    holds that tag with this image; returns the name lab hosts pull (<address>/<repository_tag>)."""
    push_name, pull_name = push_names(registry, repository_tag)
    repository, tag = split_repository_tag(repository_tag)
    push_repository = f"{registry['push']}/{repository}"
    info = json.loads(docker("image", "inspect", local_image))[0]
    docker("tag", local_image, push_name)
    digest = remote_digest(registry["push"], repository, tag)
    manifest = None
    if digest and f"{push_repository}@{digest}" not in (info.get("RepoDigests") or []):
        manifest = remote_manifest(registry["push"], repository, digest)
    if already_there(digest, info.get("RepoDigests") or [], push_repository, info["Id"], manifest):
        how = "this machine pushed it" if manifest is None else "its config is this image's id"
        say(f"registry: {pull_name} already holds {local_image} ({digest[:19]}...: {how}); "
            "nothing pushed")
        return pull_name
    started = time.monotonic()
    result = subprocess.run(["docker", "push", push_name], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-600:]
        raise LabError(f"docker push {push_name} failed: {output}")
    say(f"registry: pushed {local_image} as {pull_name} in {time.monotonic() - started:.1f}s")
    return pull_name


def stop(lab: str) -> None:
    """Remove this lab's registry container (no error when there is none); the volume, and so
    the pushed images, stay for the next start."""
    fleet.remove_role(lab, ROLE)


def remove(lab: str) -> None:
    """The container, its volume (every pushed image) and this machine's <push>/... tags."""
    push_address = running_push_address(lab)
    stop(lab)
    for volume in docker("volume", "ls", "-q", "--filter", f"label={LABEL}={lab}",
                         "--filter", f"label={ROLE_LABEL}={ROLE}").split():
        docker("volume", "rm", volume)
    if push_address:
        tags = docker("images", "--format", "{{.Repository}}:{{.Tag}}").split()
        ours = [t for t in tags if t.startswith(f"{push_address}/") and not t.endswith(":<none>")]
        if ours:
            docker("rmi", *ours)
