"""A rule that needs the hosts' GPUs is refused while the run is planned, before anything is
changed on any host (issue 19): on the lab (two simulated GPUs per host, drivers loaded by the
deploys before this file), a model asking for four GPUs per replica stops the run with exit 2
and one line, and no operation runs.

Runs after test_stack.py: the fleet is converged and serving.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.lab


def test_a_model_wider_than_any_host_is_refused_before_any_operation(lab):
    model = {**lab.state["settings"]["models"][0], "tensor_parallel_size": 4}
    result = lab.pyinfra("-y", "inventories/lab.py", "deploy.py", f"--data=models={json.dumps([model])}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    refused = [line for line in output.splitlines() if line.startswith("configuration error: ")]
    assert refused == [
        "configuration error: models[0].tensor_parallel_size = 4: expected at most the GPUs of one "
        "host of its groups (2 on node-1, the most any has): a replica cannot span hosts (read "
        "from the hosts' GPUs)"], output
    assert "Beginning operation run" not in output and "Starting operation" not in output, output
    assert "Traceback" not in output, output

    # Nothing moved: the next ordinary run changes nothing.
    again = lab.pyinfra("--json", "-y", "inventories/lab.py", "deploy.py")
    assert again.returncode == 0, again.stdout + again.stderr
    results = json.loads(again.stdout)["results"]
    assert [op["name"] for op in results["operations"] if op["success"]] == []
