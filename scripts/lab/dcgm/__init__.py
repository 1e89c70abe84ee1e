"""The lab's monitoring images, built here and offline (images.ensure_image_from), pushed to the
lab registry by scripts/lab/services.py; each a LAB STAND-IN for the production image:

    lab/prometheus       Debian bookworm's prometheus (2.42), laid out like prom/prometheus
    lab/alertmanager     Debian's prometheus-alertmanager (0.25), like prom/alertmanager
    lab/node-exporter    Debian's prometheus-node-exporter (1.5), like prom/node-exporter
    lab/dcgm-exporter    scripts/lab/dcgm/exporter.py: dcgm-exporter's names and labels, read
                         from the simulated GPUs (there is no DCGM for simulated GPUs)

Laid out like the official images: the same ENTRYPOINT role (the binary, so the stack's
`command` is its arguments), the same data directory owned by the user it runs as.
Grafana has no Debian package and no stand-in: the lab checks its dashboards' queries against
its Prometheus instead (tests/lab/test_monitoring.py).

    tags = ensure_images()   # {"prometheus": "gpufleet-lab-prometheus:<hash>", ...}
"""

from __future__ import annotations

from pathlib import Path

from scripts.lab import images

HERE = Path(__file__).resolve().parent

# name -> (production image it stands in for, Debian packages, Dockerfile instructions)
RECIPES = {
    "prometheus": ("prom/prometheus", ["prometheus"], """\
RUN install -d -o prometheus -g prometheus -m 0755 /prometheus
USER prometheus
WORKDIR /prometheus
VOLUME /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""),
    "alertmanager": ("prom/alertmanager", ["prometheus-alertmanager"], """\
RUN install -d -o prometheus -g prometheus -m 0755 /alertmanager
USER prometheus
WORKDIR /alertmanager
VOLUME /alertmanager
EXPOSE 9093
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/prometheus/alertmanager.yml", "--storage.path=/alertmanager"]
"""),
    "node-exporter": ("prom/node-exporter", ["prometheus-node-exporter"], """\
USER nobody
EXPOSE 9100
ENTRYPOINT ["/usr/bin/prometheus-node-exporter"]
"""),
    "dcgm-exporter": ("nvidia/dcgm-exporter", ["python3"], """\
COPY exporter.py /usr/local/bin/dcgm-exporter
RUN chmod 0755 /usr/local/bin/dcgm-exporter
EXPOSE 9400
ENTRYPOINT ["/usr/local/bin/dcgm-exporter"]
"""),
}


def repository(name: str) -> str:
    """The lab registry's repository for `name`: lab/<name>."""
    return f"lab/{name}"


def recipe_files(name: str) -> dict[str, str]:
    stands_for, packages, instructions = RECIPES[name]
    label = (f"LABEL gpufleet.role=monitoring org.opencontainers.image.description=\"gpu-fleet lab "
             f"{name}: a LAB STAND-IN for {stands_for}\"\n")
    files = {"Dockerfile": images.packages_dockerfile(
        f"gpu-fleet lab {name}: LAB STAND-IN for {stands_for}.", packages, label + instructions)}
    if name == "dcgm-exporter":
        files["exporter.py"] = (HERE / "exporter.py").read_text()
    return files


def ensure_images() -> dict[str, str]:
    """Build (or reuse) every monitoring image; name -> local tag."""
    return {name: images.ensure_image_from(f"{images.IMAGE_PREFIX}{name}", recipe_files(name),
                                           f"lab {name}, a stand-in for {RECIPES[name][0]}")
            for name in RECIPES}
