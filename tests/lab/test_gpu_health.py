"""A GPU that fails while serving (issue 22), on the lab's simulated GPUs.

The GPU an engine task holds on one node gets uncorrected ECC errors (`lab.py gpu-fault`, read by
the simulated nvidia-smi): the drift check exits 2 naming host, index, UUID and reason; the next
deploy, under a steady load through the gateway, reports it and stops advertising it to Swarm;
the task runs again on a healthy GPU (the node's other one, or another node's), every replica
passes the smoke tests, and no more requests fail than were in flight. A GPU reset clears the fault: the next deploy lets the
GPU back in, and the one after changes nothing.

Runs after test_drift.py (the fleet serves the stack) and leaves it serving as it found it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
ENGINE_SERVICE = "gpufleet_tiny-llama"
LOAD_CONCURRENCY = 4


def engine_gpu(lab, node: str) -> str | None:
    """The GPU UUID Swarm gave the engine task running on `node` (its DOCKER_RESOURCE_ variable:
    what the nvidia runtime exposes to the container)."""
    listed = lab.ssh(node, "sudo docker ps -q --filter "
                           f"label=com.docker.swarm.service.name={ENGINE_SERVICE}")
    container = listed.stdout.split()[0] if listed.stdout.split() else None
    if container is None:
        return None
    env = lab.ssh(node, f"sudo docker inspect --format '{{{{json .Config.Env}}}}' {container}")
    for item in json.loads(env.stdout or "[]"):
        if item.startswith("DOCKER_RESOURCE_NVIDIA-GPU="):
            return item.split("=", 1)[1]
    return None


def gpu_index(lab, node: str, uuid: str) -> int:
    rows = lab.ssh(node, "nvidia-smi --query-gpu=index,uuid --format=csv,noheader").stdout
    return next(int(i) for i, u in (line.split(", ") for line in rows.splitlines()) if u == uuid)


def advertised(lab, node: str) -> list[str]:
    config = json.loads(lab.ssh(node, "sudo cat /etc/docker/daemon.json").stdout)
    return config.get("node-generic-resources", [])


def drift(lab) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/drift_check.py", "inventories/lab.py"],
                          cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=600)


def deploy(lab) -> tuple[int, dict, str]:
    result = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py")
    output = result.stdout + result.stderr
    try:
        results = json.loads(result.stdout)["results"]
    except json.JSONDecodeError:
        pytest.fail(f"pyinfra did not print JSON (rc={result.returncode}):\n{output}")
    return result.returncode, results, output


def deploy_under_load(lab, out: Path) -> tuple[int, dict, str, dict]:
    """A deploy run under scripts/loadtest.py --during (LOAD_CONCURRENCY requests always in
    flight through the gateway, stopped 3 s after the deploy): the deploy's exit code, JSON
    results and output, and the load's meta (failed_during, during_covered)."""
    pyinfra = REPO / ".venv" / "bin" / "pyinfra"
    command = (f"{pyinfra} --json -y inventories/lab.py deploy.py > {out}/deploy.json "
               f"2> {out}/deploy.err")
    load = subprocess.run([sys.executable, "scripts/loadtest.py", "inventories/lab.py",
                           "--concurrency", str(LOAD_CONCURRENCY), "--max-tokens", "8",
                           "--requests", "100000", "--max-seconds", "600", "--settle", "3",
                           "--during", command, "--out", str(out / "load")],
                          cwd=REPO, env=lab.env, capture_output=True, text=True, timeout=900)
    output = (out / "deploy.json").read_text() + (out / "deploy.err").read_text()
    summary = out / "load" / "summary.json"
    assert summary.exists(), load.stdout[-2000:] + load.stderr[-2000:]
    try:
        results = json.loads((out / "deploy.json").read_text())["results"]
    except json.JSONDecodeError:
        pytest.fail(f"pyinfra did not print JSON:\n{output}")
    meta = json.loads(summary.read_text())["meta"]
    return meta["during_exit_code"], results, output, meta


def changed(results) -> set[tuple[str, str]]:
    return {(op["name"], name) for op in results["operations"] for name in op["success"]}


def serving_worker(lab) -> str:
    """A worker that runs an engine task (where the replicas are depends on the tests before)."""
    listed = lab.ssh(lab.hosts[0]["name"], f"sudo docker service ps {ENGINE_SERVICE} "
                     "--filter desired-state=running --format '{{.Node}}'")
    busy = set(listed.stdout.split())
    return next(h["name"] for h in lab.hosts[1:] if h["name"] in busy)


def test_an_unhealthy_gpu_is_reported_kept_out_and_let_back_in(lab, tmp_path):
    node = serving_worker(lab)
    uuid = engine_gpu(lab, node)
    assert uuid, f"no engine task with a GPU on {node}"
    index = gpu_index(lab, node, uuid)
    assert lab.cli("gpu-fault", node, str(index), "ecc=2").returncode == 0
    try:
        checked = drift(lab)
        assert checked.returncode == 2, checked.stdout + checked.stderr
        line = f"unhealthy GPU {index} {uuid}"
        assert line in checked.stdout and "2 uncorrected ECC error(s)" in checked.stdout, \
            checked.stdout

        code, results, output, load = deploy_under_load(lab, tmp_path)
        assert code == 0, output
        assert f"[{node}] {line}" in output and "kept out of serving" in output, output
        # Docker restarted on that node under a steady load through the gateway: at most the
        # requests in flight there may fail (the load keeps LOAD_CONCURRENCY in flight).
        assert load["during_covered"] is True, load
        assert load["failed_during"] <= LOAD_CONCURRENCY, load
        assert f"NVIDIA-GPU={uuid}" not in advertised(lab, node)
        # Only that node changed (its daemon.json, Docker restarted, the GPU container check
        # that follows), and from the manager its GPU count label (one GPU fewer to size the
        # stack by) and the stack operation, which waited for the task again.
        manager = lab.hosts[0]["name"]
        others = {(op, name) for op, name in changed(results) if name != node}
        assert others <= {("Inference stack | Deploy the inference stack", manager),
                          ("Docker Swarm | Swarm node labels", manager)}, changed(results)
        labels = lab.ssh(manager, f"sudo docker node inspect {node} --format "
                                  "'{{index .Spec.Labels \"gpufleet.gpu.count\"}}'")
        assert labels.stdout.strip() == "1", labels.stdout + labels.stderr
        # Docker restarted on that node: its task runs again on the node's other GPU, or Swarm
        # moved it to another node; either way no task holds the bad GPU, and the smoke tests
        # (every replica through the gateway) passed.
        assert engine_gpu(lab, node) != uuid, f"an engine task on {node} still holds {uuid}"
        assert "smoke passed" in output and "smoke failed" not in output, output
    finally:
        # A GPU reset, as an operator runs it: clears the simulated ECC count, as a real reset
        # clears the volatile one.
        reset = lab.ssh(node, f"sudo nvidia-smi -r -i {index}")
        assert reset.returncode == 0, reset.stdout + reset.stderr

    code, results, output = deploy(lab)
    assert code == 0, output
    assert f"NVIDIA-GPU={uuid}" in advertised(lab, node), output
    code, results, output = deploy(lab)
    assert code == 0 and changed(results) == set(), output
    checked = drift(lab)
    assert checked.returncode == 0, checked.stdout + checked.stderr
