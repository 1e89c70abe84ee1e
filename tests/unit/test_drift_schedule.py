"""The drift check's nightly schedules: the GitHub Actions workflow and the systemd service and
timer. Both must run the script's real command line, and keep their secrets off it."""

import configparser
import re
import shlex
from pathlib import Path

import yaml

from scripts.drift_check import parse_args

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "drift-check.yml"
UNITS = REPO / "templates" / "systemd"
SECRETS = {"GPUFLEET_SSH_PRIVATE_KEY", "GPUFLEET_SSH_KNOWN_HOSTS", "GPUFLEET_HF_TOKEN",
           "GPUFLEET_API_KEY", "GPUFLEET_ENGINE_KEY"}


def workflow():
    data = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as true.
    return data, data.get("on", data.get(True))


def steps():
    data, _ = workflow()
    (job,) = data["jobs"].values()
    return job["steps"]


def step(name):
    return next(s for s in steps() if s.get("name") == name)


def check_argv(script: str) -> list[str]:
    """The drift_check.py command of a shell script, its line continuations joined and the
    "${data[@]}" array expanded as the script builds it."""
    text = script.replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "scripts/drift_check.py" in line)
    words = shlex.split(line)
    argv = words[words.index("scripts/drift_check.py") + 1:]
    data = " ".join(re.findall(r"--data \"?[a-z_]+=[^\s\")]*\"?", text))
    return [a for a in argv if a != "${data[@]}"] + shlex.split(data)


def test_the_workflow_runs_nightly_and_by_hand():
    _, on = workflow()
    (cron,) = on["schedule"]
    assert len(cron["cron"].split()) == 5 and cron["cron"].split()[2:] == ["*", "*", "*"]
    assert "workflow_dispatch" in on


def test_the_workflow_names_its_secrets_and_writes_them_to_private_files():
    text = WORKFLOW.read_text()
    assert set(re.findall(r"secrets\.([A-Z_]+)", text)) == SECRETS
    for name in SECRETS:
        assert name in text.split("name: Drift check")[0], f"{name} is not documented on top"
    credentials = step("Credentials into files only this user can read")
    assert credentials["run"].lstrip().startswith("umask 077")
    assert "$RUNNER_TEMP" in credentials["run"]
    # Secrets reach the script as environment, never interpolated into a command line.
    for s in steps():
        assert "secrets." not in s.get("run", "")
    assert step("Remove the credentials")["if"] == "always()"


def test_the_workflow_runs_the_real_command_line_and_uploads_both_reports():
    args = parse_args(check_argv(step("Drift check")["run"]))
    assert args.inventory == "inventories/prod.py"
    assert (args.json, args.markdown) == ("drift.json", "drift.md")
    keys = {pair.partition("=")[0] for pair in args.data}
    assert {"ssh_key", "ssh_known_hosts_file", "stack_api_key_file", "stack_engine_key_file", "hf_token_file"} <= keys
    upload = next(s for s in steps() if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert upload["with"]["path"].split() == ["drift.json", "drift.md"]


def test_the_workflow_fails_on_drift_and_on_a_failed_check_with_distinct_messages():
    verdict = step("Verdict")
    assert verdict["if"] == "always()"
    script = verdict["run"]
    assert re.search(r"2\).*Drift found.*exit 2", script)
    assert re.search(r"1\).*Drift check failed.*exit 1", script)
    assert re.search(r"0\).*No drift", script) and "0) " in script


def unit(name):
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


def test_the_service_is_a_oneshot_as_an_operator_in_the_checkout():
    service = unit("gpufleet-drift-check.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] and service["User"] != "root"
    working = service["WorkingDirectory"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == f"{working}/.venv/bin/python" and argv[1] == "scripts/drift_check.py"
    args = parse_args(argv[2:])
    assert args.inventory == "inventories/prod.py"
    assert args.json and args.markdown
    state = f"/var/lib/{service['StateDirectory']}/"
    assert args.json.startswith(state) and args.markdown.startswith(state)
    assert service["UMask"] == "0077"


def test_the_timer_is_nightly_persistent_and_spread():
    timer = unit("gpufleet-drift-check.timer")
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"]
    assert timer["Timer"]["OnCalendar"].startswith("*-*-* ")
    assert timer["Timer"]["Unit"] == "gpufleet-drift-check.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
