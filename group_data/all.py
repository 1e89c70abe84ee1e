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

# --- NVIDIA driver -------------------------------------------------------------------------
# Base URL of NVIDIA's CUDA apt repository; "<distro>/<arch>/" (ubuntu2204, ubuntu2404 or
# debian12; x86_64 or sbsa) is appended, and the key is "<that>/3bf863cc.pub". A mirror may be named.
nvidia_cuda_repo_url = "https://developer.download.nvidia.com/compute/cuda/repos"
# Fingerprint of the CUDA repository's signing key: a downloaded key with another one is refused.
nvidia_cuda_key_fingerprint = "EB693B3035CD5710E231E123A4B469963BF863CC"
# Driver branch; it names the packages (Ubuntu hosts: branches up to 580).
nvidia_driver_branch = "580"
# Exact driver version installed, held, and required to be loaded; on nvidia_driver_branch.
nvidia_driver_version = "580.95.05"
# Kernel modules: "open" (NVIDIA's choice from Turing on, required for Blackwell) or "proprietary".
nvidia_driver_flavour = "open"
# NVIDIA Fabric Manager: "auto" runs it on NVSwitch systems (HGX/DGX); True or False forces it.
nvidia_fabricmanager = "auto"
# NVIDIA's NVLink Subnet Manager (package nvlsm), which Fabric Manager needs on NVLink-5 boards
# (HGX B200/B300): "auto" installs it with Fabric Manager when nvidia-smi shows such GPUs; True
# for a first run on such a board (no driver answers yet to name the GPUs); False never.
nvidia_nvlsm = "auto"
# May the deploy reboot a host to load a new driver? If False, a host that needs a reboot fails
# with "reboot required" (the others go on) and a loaded driver is never changed in place.
nvidia_allow_reboot = False
# Seconds to wait for a rebooting host to answer again (GPU servers can take 10 minutes to POST).
nvidia_reboot_timeout_s = 900

# --- NVIDIA Container Toolkit --------------------------------------------------------------
# libnvidia-container apt repository base; "/<dpkg arch>" is appended (NVIDIA's $(ARCH)).
nvidia_container_toolkit_repo_url = "https://nvidia.github.io/libnvidia-container/stable/deb"
# Its armoured signing key...
nvidia_container_toolkit_key_url = "https://nvidia.github.io/libnvidia-container/gpgkey"
# ...and that key's fingerprint (a key with another one is refused).
nvidia_container_toolkit_key_fingerprint = "C95B321B61E88C1809C4F759DDCAE044F796ECB0"
# Toolkit apt version, installed and held; 1.19.0-1 or later (1.18 broke GPUs for Docker Swarm).
nvidia_container_toolkit_version = "1.19.1-1"
# Image for the one-off container that proves GPUs reach containers (run only after a change).
nvidia_container_verify_image = "ubuntu:24.04"
# Keep unhealthy GPUs out of serving (README, "GPU health": lost, uncorrected ECC, remapping
# pending or failed, a recovery action, an Xid of the table): they are left out of the GPUs
# Docker advertises to Swarm, so no engine task is given one. False: report them only.
gpu_health_keep_out = True

# --- Model weights -------------------------------------------------------------------------
# Models pre-downloaded to <models_dir>/<name>/ before any engine starts. Each entry:
# {"name": dir name, "repo_id": Hub repo, "revision": pinned 40-hex commit,
#  "allow_patterns": [...], "ignore_patterns": [...], "groups": ["gpu_nodes"] (hosts needing it)}.
models = []
# Hugging Face Hub base URL (a mirror can be named here).
hf_endpoint = "https://huggingface.co"
# File on the control machine holding the Hub token; None: the HF_TOKEN environment variable, or no token.
hf_token_file = None
# Control-machine cache: the Hub is read once per revision, hosts are filled from here.
weights_cache_dir = "~/.cache/gpufleet/weights"
# How each run checks weights already on a host: "size" (cheap) or "sha256" (re-reads every byte).
weights_verify = "size"
# GiB that must stay free after a transfer, on each host and in the control cache.
weights_free_margin_gb = 5
# How files reach the hosts (README, "Model weights at fleet scale"): "peers" = one copy out of
# the control machine over OpenSSH (none when a host already holds the revision), the rest from
# host to host in a pipelined chain; "control" = the control machine sends every host its files
# over pyinfra's SFTP (N copies; for hosts that cannot reach each other on weights_relay_port).
weights_distribution = "peers"
# Where the weights' bytes first come from: "control" = the control machine's cache (it reads the
# Hub; hosts never do: for fleets without egress); "seeder" = the first host of each chain
# downloads the large (LFS) files from hf_endpoint itself, the control machine reading only the
# listing and the small files (for sites where hosts reach the Hub or a mirror faster than the
# control machine does). The token reaches the seeder only inside its SSH channel, never a disk.
weights_source = "control"
# TCP port each host's relay listens on, on its cluster address, while a chain runs (only then).
weights_relay_port = 7461

# --- Docker Swarm --------------------------------------------------------------------------
# Address this node advertises to the Swarm (IP or interface[:port]); None: the address pyinfra
# connects to (ssh_hostname) when it is an IP, else the source address of the default route.
swarm_advertise_address = None
# Node labels from the inventory (key: value), set beside the gpufleet.* labels from the facts;
# a key removed here is removed from the node.
swarm_node_labels = {}
# Retire this host: drained, waits for its tasks to stop, leaves, removed from the node list
# (not allowed on a member of swarm_managers: move it out of the group first).
swarm_retire = False
# A host already in another Swarm leaves it (--force) and joins ours; otherwise it fails.
swarm_takeover = False
# Seconds to wait for a drained node's running tasks to stop.
swarm_drain_timeout_s = 300

# --- Inference stack -----------------------------------------------------------------------
# Each entry of `models` with serve=True (the default) becomes one engine service. Keys of an
# entry for serving: engine ("vllm" | "tgi" | "ollama"), served_model_name, replicas,
# tensor_parallel_size, max_model_len, gpu_memory_utilization, port, engine_args, shm_size_gb,
# gpu_model, health_start_period_s, stop_grace_period_s, drain_port (vLLM), image (README.md,
# "models", describes each).
# Swarm stack name: services are <stack_name>_gateway and <stack_name>_<model>.
stack_name = "gpufleet"
# Engine images, pinned by tag (add @sha256:... to pin the digest too).
stack_engine_images = {
    "vllm": "vllm/vllm-openai:v0.11.0",
    "tgi": "ghcr.io/huggingface/text-generation-inference:3.3.6",
    "ollama": "ollama/ollama:0.12.6",
}
# The CUDA version each engine image requires of the driver (its NVIDIA_REQUIRE_CUDA: `docker
# image inspect IMAGE`), by reference without digest: a served image whose CUDA needs a newer
# driver than nvidia_driver_version is refused before any host is touched (README, "Engine
# images and the driver"). An image not listed is not checked; add yours.
stack_image_cuda = {
    # vLLM 0.11.0's image and wheels are built on CUDA 12.9 (vllm-project/vllm#30633).
    "vllm/vllm-openai:v0.11.0": "12.9",
    # TGI 3.3.6's image is FROM nvidia/cuda:12.4.0-base-ubuntu22.04 (its Dockerfile at v3.3.6).
    "ghcr.io/huggingface/text-generation-inference:3.3.6": "12.4",
}
# The gateway in front of every engine: HAProxy, balancing over healthy engine tasks.
stack_gateway_image = "haproxy:3.2.4"
# The user id each image runs as: it owns the secrets mounted in /run/secrets (mode 0400).
# The official vLLM, TGI and Ollama images run as root; the official haproxy image as uid 99.
stack_secret_uids = {"vllm": 0, "tgi": 0, "ollama": 0, "gateway": 99}
# The port users and smoke tests reach the gateway on.
stack_gateway_port = 8080
# KiB of a request body the gateway reads whole to route it by its "model" when more than one
# model is served; a larger body is refused with 413 (never routed on a part of it). HAProxy's
# buffers become this size plus 17 KiB of headers room, and a request in flight holds up to two
# (request, response): 1024 KiB and 1000 requests in flight is up to 2 GiB on a manager.
# With one model the body is passed through unread. 16 to 65536.
stack_gateway_max_body_kb = 1024
# How the gateway's port is published: "ingress" (Swarm's routing mesh: any node answers, needs
# IPVS in the kernel) or "host" (each manager answers on its own address, with DNS round-robin
# between tasks instead of virtual IPs).
stack_publish_mode = "ingress"
# File (0600) on the control machine holding the key of the client "operator": the deploy's own
# smoke tests, the load test and the benchmarks send it (Bearer); required when a model is served.
# It reaches the gateway only as a Docker secret.
stack_api_key_file = None
# Named clients of the gateway: client name -> file (0600) on the control machine holding its
# key. Each is accepted on its own; remove or change one entry and only that client's key goes.
# Logs and the rate-limit table carry the name, never the key. Names: a-z, 0-9, _ and -.
stack_client_keys = {}
# Requests per minute a client may send to one gateway task (client name -> count); over it the
# gateway answers 429. A client not listed has no limit. Each gateway task counts on its own.
stack_client_rate_limits = {}
# File (0600) on the control machine holding the engines' internal key: the gateway sends it to
# the engines in place of the client's key, and no client holds it. Required when a model is
# served: `openssl rand -hex 32 > FILE && chmod 600 FILE`.
stack_engine_key_file = None
# HTTPS at the gateway: the server certificate (PEM, then its chain) and its private key (PEM,
# unencrypted, 0600), files on the control machine, delivered as one Docker secret. Both None:
# plain HTTP. Checked before any host is touched: a pair, valid now.
stack_gateway_tls_cert_file = None
# The certificate's private key (PEM, unencrypted, 0600 or 0400).
stack_gateway_tls_key_file = None
# With TLS: a port where plain HTTP is answered by a redirect (308) to the HTTPS port; None: no
# plain HTTP listener at all (connections refused).
stack_gateway_http_redirect_port = None
# The CA bundle (PEM) the smoke tests, the load test and the benchmarks verify the gateway's
# certificate against; None: the system's trusted CAs. Verification is never turned off.
stack_gateway_ca_file = None
# The name the gateway's certificate is for (what clients connect to, e.g. llm.example.com): the
# deploy's own tools reach each gateway task by its node's address but verify this name. None:
# the certificate must name each node address.
stack_gateway_tls_server_name = None
# Engine ports admit only the gateway nodes (the Swarm managers), the node itself and
# stack_engine_allowed_sources: an iptables chain of the deploy's own (GPUFLEET-ENGINES) on each
# node, restored at boot. False: no such chain (a site firewall must do it instead).
stack_engine_firewall = True
# IPv4 addresses or networks that may also reach engine ports directly, e.g. a Prometheus outside
# the fleet or the machine `loadtest.py --target engines` runs on.
stack_engine_allowed_sources = []
# Seconds a stack deploy may take to converge (all tasks running and healthy) before it fails.
stack_converge_timeout_s = 1800
# Seconds Swarm watches an updated task before it counts the update as done (and rolls back on failure).
stack_update_monitor_s = 60

# --- Smoke tests ---------------------------------------------------------------------------
# Seconds an endpoint's /health may take to answer 200 (retried with backoff while a model loads).
smoke_deadline_s = 300

# --- Monitoring ----------------------------------------------------------------------------
# Metrics of the GPUs, the nodes, the engines and the gateway, alert rules and dashboards, as a
# Swarm stack of its own (<stack_name>-monitoring) deployed after the smoke tests (README.md,
# "Monitoring"). False: no monitoring stack (a running one is removed).
monitoring_enabled = True
# Node metrics (CPU, memory, disks, network): node-exporter on every node.
monitoring_node_exporter = True
# GPU metrics (DCGM_FI_*: utilisation, memory, temperature, power, XID and ECC errors):
# NVIDIA's dcgm-exporter on every node with GPUs.
monitoring_dcgm_exporter = True
# Alertmanager beside Prometheus: alerts reach monitoring_alert_receiver through it.
monitoring_alertmanager = True
# Grafana beside Prometheus, its dashboards provisioned (templates/grafana/); needs
# monitoring_grafana_admin_password_file.
monitoring_grafana = True
# Prometheus' image, pinned by tag (add @sha256:... to pin the digest too), as are the others.
monitoring_prometheus_image = "prom/prometheus:v3.5.0"
# Alertmanager's image.
monitoring_alertmanager_image = "prom/alertmanager:v0.28.1"
# node-exporter's image.
monitoring_node_exporter_image = "prom/node-exporter:v1.9.1"
# NVIDIA's dcgm-exporter image (DCGM 3.3.9, exporter 3.6.1).
monitoring_dcgm_exporter_image = "nvcr.io/nvidia/k8s/dcgm-exporter:3.3.9-3.6.1-ubuntu22.04"
# Grafana's image.
monitoring_grafana_image = "grafana/grafana:11.5.2"
# The user id Alertmanager's and Grafana's images run as: each owns its secret (mode 0400).
# The official images: Alertmanager as nobody (65534), Grafana as 472.
monitoring_secret_uids = {"alertmanager": 65534, "grafana": 472}
# Ports on the nodes' own network. Prometheus and Alertmanager (no login of their own) and the
# exporters admit only the Swarm managers, the node itself and stack_engine_allowed_sources
# (the GPUFLEET-ENGINES chain, with stack_engine_firewall); Grafana has its own login.
monitoring_prometheus_port = 9090
# Alertmanager's port, on the first manager.
monitoring_alertmanager_port = 9093
# Grafana's port, on the first manager: for people, behind its own login.
monitoring_grafana_port = 3000
# node-exporter's port, on every node.
monitoring_node_exporter_port = 9100
# dcgm-exporter's port, on every node with GPUs.
monitoring_dcgm_exporter_port = 9400
# The gateway's Prometheus exporter (HAProxy's own, per backend and server): a listener of each
# gateway task apart from the API port, answering only the managers, the node itself and
# stack_engine_allowed_sources; never the API's clients.
monitoring_gateway_metrics_port = 8405
# Seconds between two scrapes of every target (5 to 300).
monitoring_scrape_interval_s = 15
# How long Prometheus keeps samples (on its own volume on the first manager): a number and h, d,
# w or y.
monitoring_retention = "15d"
# Seconds an alert's condition must hold before it fires (0 to 3600): a restart or a scrape
# missed once pages nobody.
monitoring_alert_for_s = 120
# GPU temperature (degrees C) over which the GPU alert fires.
monitoring_alert_gpu_temperature_c = 85
# Seconds: the alert when a model's end-to-end latency at the 95th percentile is over it (5 min).
monitoring_alert_p95_latency_s = 30.0
# Seconds: the alert when a model's time to first token at the 95th percentile is over it.
monitoring_alert_p95_ttft_s = 5.0
# Percent: the alert when the filesystem holding models_dir has less free than this.
monitoring_alert_disk_free_percent = 10
# Where Alertmanager sends alerts: None (they show in Prometheus and Alertmanager only),
# "webhook", "slack" or "pagerduty"; its URL or routing key in monitoring_alert_receiver_file.
monitoring_alert_receiver = None
# File (0600) on the control machine holding the receiver's secret on one line: the webhook URL,
# Slack's incoming webhook URL, or PagerDuty's Events API v2 routing key. A Docker secret.
monitoring_alert_receiver_file = None
# File (0600) on the control machine holding Grafana's admin password (one line): a Docker
# secret, never in the stack file or an environment variable.
monitoring_grafana_admin_password_file = None
# Seconds the monitoring stack may take to run Prometheus, Alertmanager and Grafana.
monitoring_converge_timeout_s = 300

# --- Docker Engine -------------------------------------------------------------------------
# Where the engine comes from: "docker" (Docker's apt repository: docker-ce, containerd.io,
# compose plugin, pinned to docker_version) or "distro" (the distribution's docker.io).
docker_engine_source = "docker"
# docker-ce version installed and held when docker_engine_source is "docker".
docker_version = "28.5.2"
# containerd.io's upstream version, installed with it from Docker's repository and held (the
# apt revision is the repository's; a version it lacks fails naming the ones it has).
docker_containerd_version = "1.7.28"
# docker-buildx-plugin's upstream version, pinned and held likewise.
docker_buildx_version = "0.29.1"
# docker-compose-plugin's upstream version, pinned and held likewise.
docker_compose_version = "2.40.3"
# Fingerprint of Docker's apt signing key (https://docs.docker.com/engine/install/debian/):
# a fetched key with another is refused, a keyring holding another is replaced.
docker_key_fingerprint = "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
# Base URL of Docker's apt repository (a mirror can be named here).
docker_apt_url = "https://download.docker.com/linux"
# json-file log rotation for every container: size of one log file before it rotates...
docker_log_max_size = "100m"
# ...and how many rotated files are kept per container.
docker_log_max_file = 5
# Further daemon.json keys, merged over the managed ones; keys an operator added by hand on a
# host and not named here are kept.
docker_daemon_config = {}
