"""One run of the fleet, phase by phase: `pyinfra inventories/prod.py deploy.py`.

Each phase is a pyinfra @deploy in operations/<concern>.py; they run in this order on every host
of the inventory. The configuration was already checked when the inventory loaded (before any
connection); `settings_for` gives each phase the host's typed settings.

A host that fails preflight is reported and left untouched: no later phase is planned for it,
and the other hosts go on.
"""

from pyinfra import host

from operations.config import settings_for
from operations.docker_engine import docker_engine
from operations.preflight import preflight

settings = settings_for(host)

# 1. Preflight: OS, architecture, disk, kernel headers, time sync, sudo. Changes nothing.
if preflight(settings):
    # 2. Docker Engine: pinned packages, daemon.json merged, restarted only when it changed.
    docker_engine(settings)
