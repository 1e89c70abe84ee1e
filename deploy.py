"""One run of the fleet, phase by phase: `pyinfra inventories/prod.py deploy.py`.

Each phase is a pyinfra @deploy in operations/<concern>.py; they run in this order on every host
of the inventory. The configuration was already checked when the inventory loaded (before any
connection); `settings_for` gives each phase the host's typed settings.

A host that fails preflight is reported and left untouched: no later phase is planned for it,
and the other hosts go on. A host that fails in a later phase (a driver that needs a reboot the
data forbids, say) stops there; the others go on.
"""

from pyinfra import host

from operations.config import settings_for
from operations.docker_engine import docker_engine
from operations.engine_ports import engine_ports
from operations.fleet_fit import fleet_fits
from operations.gpu_health import gpu_health_phase
from operations.monitoring import monitoring
from operations.nvidia import nvidia_driver
from operations.ollama_store import ollama_stores
from operations.phase import DOCKER, SWARM, PhaseResult, note_node_changes
from operations.preflight import preflight
from operations.smoke import smoke
from operations.stack import stack
from operations.swarm import swarm
from operations.toolkit import container_toolkit, current_gpu_daemon_config, gpu_container_check
from operations.weights import model_weights

settings = settings_for(host)

# 0. What the configuration asks of the GPUs, against what the hosts report (tensor-parallel
#    size, replicas): refused here, while planning, before anything is changed on any host.
fleet_fits(settings)

# 1. Preflight: OS, architecture, disk, kernel headers, time sync, sudo. Changes nothing.
if preflight(settings):
    # 2. NVIDIA driver: CUDA repository, pinned and held driver, nouveau out, a reboot only when
    #    the loaded driver is not the pinned one.
    driver = nvidia_driver(settings)

    # 3. NVIDIA Container Toolkit: pinned and held, swarm-resource set for Swarm's GPUs.
    toolkit = container_toolkit(settings)

    # 3b. GPU health: each unhealthy GPU reported (host, index, UUID, reason); kept out of the
    #     GPUs advertised to Swarm below unless gpu_health_keep_out is False.
    gpu_health_phase(settings)

    # 4. Docker Engine: pinned packages; daemon.json merged with the nvidia runtime as default and
    #    one NVIDIA-GPU generic resource per healthy GPU (read when merged, after the driver is
    #    loaded); restarted only when it changed.
    engine = docker_engine(settings, extra_daemon_config=lambda: current_gpu_daemon_config(
        settings.gpu_health_keep_out))

    # What phases 2-4 changed can restart Docker (a reboot, a changed daemon.json): the stack
    # phase waits for the Swarm nodes of those hosts, and for no node that was down anyway.
    engine_touched = PhaseResult(driver.ops + toolkit.ops + engine.ops)
    note_node_changes(host, DOCKER, engine_touched)

    # 5. Proof that GPUs reach containers, run only when one of the above changed something.
    gpu_container_check(settings, changed=engine_touched.changed)

    # 6. Model weights: each model read from the Hub once per fleet (on the control machine),
    #    verified against the Hub's hashes, staged on each host, checked, moved into place.
    model_weights(settings)
    # 6b. Ollama's own store for each served Ollama model: its GGUF file imported with
    #     `ollama create` (hard-linked, not copied), checked, moved into place.
    ollama_stores(settings)

    # 7. Docker Swarm: init on the first of swarm_managers, joins with tokens read from a manager
    #    when the join runs (never logged or on a command line), nodes labelled from their GPUs.
    # (A changed membership leaves every node not ready for a few seconds: waited for too.)
    note_node_changes(host, SWARM, swarm(settings))

    # 8. Engine ports: an iptables chain admits only the gateway nodes (the Swarm managers) and
    #    stack_engine_allowed_sources to the served models' ports, loaded at boot too.
    engine_ports(settings)

    # 8b. Inference stack: engines (one service per served model) behind the HAProxy gateway,
    #    secrets versioned by content, deployed from a manager when it differs, then waited on.
    stack(settings)

    # 9. Smoke tests: the gateway and every engine task answer as configured (health, models,
    #    one completion per model, 401 without the key), checked from the control machine.
    smoke(settings)

    # 10. Monitoring: Prometheus, Alertmanager and Grafana on the first manager, node-exporter
    #     and dcgm-exporter on the nodes, scrape targets rendered from the fleet, alert rules from
    #     group data; after the smoke tests, so that a monitoring fault never holds serving.
    monitoring(settings)
