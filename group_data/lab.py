"""The lab's overrides: applied to every host of inventories/lab.py (pyinfra applies
group_data/<inventory file name>.py to the hosts of that file). Stand-ins only, each said so."""

# Docker's apt repository is stood in for by scripts/lab/docker_sim (its URL and key come with
# the lab's settings): the lab runs production's docker_engine_source "docker", pinned and held.

# Lab hosts share this machine's disk: ask for what the lab really needs, not a GPU server's.
preflight_min_free_gb_models = 1
# (Docker images of the lab engine and gateway are small.)
preflight_min_free_gb_docker = 2

# Lab hosts run the development machine's micro-VM kernel, for which no distribution ships
# headers; the NVIDIA stand-in builds no kernel module, so nothing would use them.
preflight_require_kernel_headers = False

# A lab host is a container: a reboot is a container restart, seconds long, and the simulated
# driver is loaded only at boot, exactly like a real kernel module.
nvidia_allow_reboot = True

# The lab's kernel has no IPVS, so Swarm's routing mesh and virtual IPs do not work: the gateway
# is published on each manager's own address and balances over tasks by DNS round-robin.
stack_publish_mode = "host"
# Lab engines load a half-megabyte model on a CPU: seconds, not the minutes a GPU server needs.
stack_update_monitor_s = 15

# Monitoring: Grafana has no Debian package, so no lab stand-in (its dashboards' queries are run
# against the lab's Prometheus by tests/lab/test_monitoring.py instead). The others are stand-ins
# from the lab registry (scripts/lab/dcgm), switched in by the lab's settings.
monitoring_grafana = False
# A lab fault should show within a test's patience: scrape every 10 s, fire after 10 s (not
# faster: the two shared cores also run every test's load).
monitoring_scrape_interval_s = 10
monitoring_alert_for_s = 10
# Lab hosts share the development machine's disk, which is often fuller than a server's.
monitoring_alert_disk_free_percent = 1
# Lab engines wait for nothing: Prometheus, Alertmanager and the exporters start in seconds.
monitoring_converge_timeout_s = 120
