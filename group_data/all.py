"""Defaults for every host. Override per fleet in group_data/<group>.py or per host in the
inventory. Every key is validated by operations/config.py before any host is contacted."""

# --- How pyinfra reaches the hosts ---------------------------------------------------------
# Run operations through sudo; the deploy user needs passwordless sudo (preflight checks it).
_sudo = True

# --- Where things live on the hosts --------------------------------------------------------
# Directory holding the pre-downloaded model weights, one sub-directory per model.
models_dir = "/opt/models"
# Docker's data root (images, volumes, container layers); preflight checks its free space.
docker_data_root = "/var/lib/docker"

# --- Preflight: refuse a host before touching it -------------------------------------------
# Free space (GiB) required on the filesystem that holds models_dir.
preflight_min_free_gb_models = 100
# Free space (GiB) required on the filesystem that holds docker_data_root.
preflight_min_free_gb_docker = 50
# The NVIDIA driver is built by DKMS: headers for the running kernel must be installed or
# installable from apt.
preflight_require_kernel_headers = True
# Swarm TLS certificates and logs need a synchronised clock (chrony, ntpd or timesyncd).
preflight_require_time_sync = True

# --- Docker Engine -------------------------------------------------------------------------
# Where the engine comes from: "docker" (Docker's apt repository: docker-ce, containerd.io,
# compose plugin, pinned to docker_version) or "distro" (the distribution's docker.io).
docker_engine_source = "docker"
# docker-ce version installed and held when docker_engine_source is "docker".
docker_version = "28.5.2"
# Base URL of Docker's apt repository (a mirror can be named here).
docker_apt_url = "https://download.docker.com/linux"
# json-file log rotation for every container: size of one log file before it rotates...
docker_log_max_size = "100m"
# ...and how many rotated files are kept per container.
docker_log_max_file = 5
# Further daemon.json keys, merged over the managed ones; keys an operator added by hand on a
# host and not named here are kept.
docker_daemon_config = {}
