"""The lab's gateway image: a LAB STAND-IN for the official `haproxy` image (Debian bookworm's
haproxy 2.6 package on the lab's Debian 12 base, not haproxy.org's build).

Laid out like the official image: the configuration at /usr/local/etc/haproxy/haproxy.cfg (none
shipped: the stack provides it), the same docker-entrypoint.sh (a first word `haproxy` gets
`-W -db`: master-worker, foreground), CMD `haproxy -f /usr/local/etc/haproxy/haproxy.cfg`, user
haproxy, STOPSIGNAL SIGUSR1 (graceful stop), WORKDIR /var/lib/haproxy; /usr/local/sbin/haproxy
links to Debian's /usr/sbin/haproxy.

    tag = ensure_image()                  # gpufleet-lab-gateway:<hash>, built once
    check_config(tag, text) -> (rc, out)  # `haproxy -c` of a configuration, in the image

Standard library only.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from scripts.lab import images

IMAGE_NAME = f"{images.IMAGE_PREFIX}gateway"
REPOSITORY = "lab/haproxy"   # the production image's name under the lab's namespace
CONFIG_PATH = "/usr/local/etc/haproxy/haproxy.cfg"

# The official image's entrypoint, unchanged in behaviour.
ENTRYPOINT = """\
#!/bin/sh
# gpu-fleet lab gateway (LAB STAND-IN for the official haproxy image): its entrypoint's rules.
set -e

# first arg is `-f` or `--some-option`
if [ "${1#-}" != "$1" ]; then
	set -- haproxy "$@"
fi

if [ "$1" = 'haproxy' ]; then
	shift # "haproxy"
	# -W: master-worker mode (reload with SIGUSR2); -db: no background mode
	set -- haproxy -W -db "$@"
fi

exec "$@"
"""

# What the stack's gateway configuration relies on; `haproxy -c` of it in the image is the
# check that Debian's 2.6 accepts every keyword (tests/lab/test_lab_images.py runs it).
CHECK_CONFIG = """\
global
    log stdout format raw local0
    maxconn 1024

defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 300s
    timeout server 300s

resolvers docker
    nameserver dns 127.0.0.11:53
    resolve_retries 3
    timeout resolve 1s
    timeout retry 1s
    hold valid 5s
    hold other 5s
    accepted_payload_size 8192

frontend api
    bind :8080
    option http-buffer-request
    acl authorized req.hdr(authorization) -m str -f /usr/local/etc/haproxy/api-keys.lst
    http-request return status 401 content-type application/json string '{"error":"Unauthorized"}' if { path_beg /v1 } !authorized
    http-request set-var(txn.model) req.body,json_query('$.model') if { method POST }
    acl model_tiny var(txn.model) -m str tiny-llama
    acl body_names_tiny req.body -m sub "\\"model\\":\\"tiny-llama\\""
    http-request return status 200 content-type text/plain string "ok" if { path /gateway-health }
    use_backend tiny-llama if model_tiny or body_names_tiny
    use_backend tiny-llama if { path /v1/models }
    default_backend no-model

backend tiny-llama
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    server-template engine 8 tasks.gpufleet_tiny-llama:8000 check inter 2s resolvers docker init-addr none

backend no-model
    http-request return status 404 content-type application/json string '{"error":{"message":"The model does not exist.","type":"NotFoundError","param":"model","code":404}}'
"""


def render_dockerfile() -> str:
    return images.packages_dockerfile(
        "gpu-fleet lab gateway: LAB STAND-IN for the official haproxy image (Debian's haproxy "
        "2.6, laid out like haproxy:3.2).",
        ["haproxy"], f"""\
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh \\
 && mkdir -p /usr/local/etc/haproxy /usr/local/sbin \\
 && ln -s /usr/sbin/haproxy /usr/local/sbin/haproxy \\
 && rm -f /etc/haproxy/haproxy.cfg \\
 && install -d -o haproxy -g haproxy -m 0755 /var/lib/haproxy
LABEL gpufleet.role=gateway \\
      org.opencontainers.image.title="gpu-fleet lab gateway" \\
      org.opencontainers.image.description="gpu-fleet lab gateway: a LAB STAND-IN for the official haproxy image (Debian bookworm's haproxy 2.6 package, laid out like haproxy:3.2)"
STOPSIGNAL SIGUSR1
USER haproxy
WORKDIR /var/lib/haproxy
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["haproxy", "-f", "{CONFIG_PATH}"]
""")


def recipe_files() -> dict[str, str]:
    return {"Dockerfile": render_dockerfile(), "docker-entrypoint.sh": ENTRYPOINT,
            ".dockerignore": "*\n!Dockerfile\n!docker-entrypoint.sh\n"}


def ensure_image() -> str:
    """Build (or reuse) the gateway image; returns its tag."""
    return images.ensure_image_from(IMAGE_NAME, recipe_files(),
                                    "lab gateway, a stand-in for the haproxy image")


def check_config(image: str, config: str, extra_files: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None,
                 secrets: dict[str, str] | None = None) -> tuple[int, str]:
    """`haproxy -c -f /usr/local/etc/haproxy/haproxy.cfg` in `image` with `config` mounted
    there (read-only), `extra_files` beside it and `secrets` (name -> text) under /run/secrets
    as Swarm would put them; (exit status, output)."""
    extra_files = {"api-keys.lst": "Bearer sk-lab-check\n", **(extra_files or {})}
    with tempfile.TemporaryDirectory(prefix="gpufleet-haproxy-") as tmp:
        conf, run_secrets = Path(tmp, "conf"), Path(tmp, "secrets")
        for directory, files in ((conf, {"haproxy.cfg": config, **extra_files}),
                                 (run_secrets, secrets or {})):
            directory.mkdir(mode=0o755)
            directory.chmod(0o755)
            for name, text in files.items():
                Path(directory, name).write_text(text)
                Path(directory, name).chmod(0o644)
        Path(tmp).chmod(0o755)
        label_args = [arg for key, value in (labels or {}).items()
                      for arg in ("--label", f"{key}={value}")]
        mounts = ["-v", f"{conf}:/usr/local/etc/haproxy:ro"]
        if secrets:
            mounts += ["-v", f"{run_secrets}:/run/secrets:ro"]
        result = subprocess.run(
            ["docker", "run", "--rm", *label_args, "--network", "none", *mounts,
             image, "haproxy", "-c", "-f", CONFIG_PATH],
            capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).strip()
