"""The lab fleet for integration tests: brought up fresh once per test session, torn down after.

The tests' lab has its own name (LAB_NAME, default gpulab-test), so a developer's lab is never
touched. LAB_KEEP=1 leaves it running for a look afterwards (`python3 scripts/lab.py --name
gpulab-test status`). A machine without a Docker engine fails these tests: `.ci/run` and the
README's first command start one.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts.drill.lab import changed_operations

REPO = Path(__file__).resolve().parents[2]
LAB_CLI = [sys.executable, str(REPO / "scripts" / "lab.py")]


# The lab's test files share one fleet and build on each other's state, so they run in the
# order of a fleet's life, not alphabetically: fresh hosts first, then the first deploys, the
# stack, what runs against a serving fleet, and the Swarm's membership changes last.
LAB_ORDER = ["test_lab_hosts", "test_lab_images", "test_run", "test_run_weights", "test_stack",
             "test_fleet_fit", "test_smoke_loadtest", "test_monitoring", "test_drills", "test_engines", "test_gateway_security", "test_drift", "test_gpu_health", "test_host_down", "test_swarm",
             "test_rollout"]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent

    def rank(item):
        path = Path(str(item.fspath))
        if not path.is_relative_to(here):
            return -1  # unit tests first, in their own order
        return LAB_ORDER.index(path.stem) if path.stem in LAB_ORDER else len(LAB_ORDER)

    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.lab)
    items.sort(key=rank)  # stable: tests keep their order within a file


@dataclass
class Lab:
    name: str
    state: dict = field(default_factory=dict)

    @property
    def hosts(self) -> list[dict]:
        return self.state["hosts"]

    @property
    def env(self) -> dict:
        return {**os.environ, "LAB_NAME": self.name}

    def cli(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([*LAB_CLI, "--name", self.name, *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def ssh(self, node: str, command: str) -> subprocess.CompletedProcess:
        return self.cli("ssh", node, command, timeout=120)

    def gateway_log(self, node: str) -> subprocess.CompletedProcess:
        """The log of the gateway container on manager `node` (`docker service logs` can wait
        on the tasks of other nodes)."""
        return self.ssh(node, "sudo timeout 60 docker logs $(sudo docker ps -q --filter "
                              "label=com.docker.swarm.service.name=gpufleet_gateway | head -1) 2>&1")

    def pyinfra(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / ".venv" / "bin" / "pyinfra"), *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=900)

    def changed_operations(self) -> list[str]:
        """Deploy the lab inventory; the names of the operations that changed something."""
        result = self.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return changed_operations(json.loads(result.stdout))

    def status_from(self, node: str, address: str, port: int, request: str) -> str:
        """The status line a raw HTTP request gets from lab host `node` to address:port (bash's
        /dev/tcp: lab hosts have no curl), or the connection's error."""
        script = (f"exec 3<>/dev/tcp/{address}/{port} || exit 7; printf '{request}' >&3; "
                  "head -1 <&3")
        result = self.ssh(node, f"timeout 10 bash -c {shlex.quote(script)}")
        return (result.stdout.strip()
                or f"no answer (rc {result.returncode}: {result.stderr.strip()[-120:]})")

    def reload(self) -> None:
        self.state = json.loads((REPO / ".lab" / self.name / "hosts.json").read_text())


def _labelled(name: str) -> list[str]:
    found = []
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        listed = subprocess.run(["docker", *kind, "-q", "--filter", f"label=gpufleet.lab={name}"],
                                capture_output=True, text=True)
        found += listed.stdout.split()
    return found


@pytest.fixture(scope="session")
def lab():
    if not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine answers: run `python3 scripts/lab.py bootstrap` first")
    lab = Lab(os.environ.get("LAB_NAME") or "gpulab-test")
    lab.cli("down")  # fresh hosts: whatever an earlier run left is removed first
    up = lab.cli("up", "--hosts", "3", "--no-deploy")
    assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
    lab.reload()
    yield lab
    if os.environ.get("LAB_KEEP") == "1":
        return
    down = lab.cli("down")
    assert down.returncode == 0, down.stderr
    assert _labelled(lab.name) == [], "lab down left containers, networks or volumes behind"
    assert not (REPO / ".lab" / lab.name).exists()
