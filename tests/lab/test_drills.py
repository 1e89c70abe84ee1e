"""The drills CI runs (scripts/drills.py --cheap) against the serving lab: an engine killed and an
engine hung under a load of streamed and non-streamed requests through the gateway. The rest of
the drills are a documented command with its committed report (docs/reliability/)."""

import json
import subprocess
import sys

from tests.lab.conftest import REPO


def test_a_killed_and_a_hung_engine_cost_only_what_they_held(lab, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "drills.py"), "--name", lab.name,
                           "--cheap", "--out", str(tmp_path)], cwd=REPO, env=lab.env,
                          capture_output=True, text=True, timeout=1200)
    report = json.loads((tmp_path / "drills.json").read_text())
    drills = {d["drill"]: d for d in report["drills"]}
    detail = (tmp_path / "drills.md").read_text() + done.stdout[-2000:] + done.stderr[-2000:]
    assert done.returncode == 0 and report["failed"] == [], detail
    assert set(drills) == {"engine-killed", "engine-hung"}
    for drill in drills.values():
        assert drill["requests"]["sent"] > 100 and drill["requests"]["streamed"] > 0, detail
        assert drill["next_run_exit"] == 0 and drill["run_after_changes"] == [], detail
    killed = drills["engine-killed"]["requests"]
    assert killed["failed"] == killed["failed_in_flight"], detail  # no plain request lost
    hung = drills["engine-hung"]["check"]
    # The gateway took the frozen engine out, ended what it held, and sent it nothing more.
    assert hung["marked_down"] and hung["ended_within_s"] <= 10 and hung["sent_after_down"] == 0
