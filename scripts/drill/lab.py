"""What a drill does to the lab and reads from it: SSH commands on its hosts (a new connection
each time, so a host that was stopped and started is reached again), its host containers on
this machine, the stack as a manager sees it, the weights on each host, and deploys of the lab
inventory, whole or interrupted by a signal at a chosen operation.

Lab only: drills break things on purpose, so they run against the lab's own hosts and never
against an inventory of real servers.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from operations import smoke as sm
from operations.weights import ModelState
from operations.weights_plan import installed_problems, parse_model_state
from scripts.fleet_access import load_fleet
from scripts.lab import fleet as lab_fleet
from scripts.loadclient import Endpoint
from scripts.loadtest import endpoints_for

REPO = Path(__file__).resolve().parents[2]
PYINFRA = REPO / ".venv" / "bin" / "pyinfra"
DEPLOY = ["inventories/lab.py", "deploy.py"]


@dataclass
class Deploy:
    exit_code: int | None  # None: stopped by the drill's signal before it ended
    seconds: float
    changed: list[str]      # operations that changed something (a whole --json run only)
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class DrillLab:
    def __init__(self, name: str):
        self.name = name
        os.environ["LAB_NAME"] = name  # the lab inventory reads it
        self.state = lab_fleet.read_state(name)
        if not self.state:
            raise RuntimeError(f"lab {name} is not up: "
                               f"run `python3 scripts/lab.py --name {name} up`")
        self.reload()

    def reload(self) -> None:
        """The inventory again (after a `lab.py set` or `managers` edit)."""
        self.state = lab_fleet.read_state(self.name)
        self.fleet = load_fleet(str(REPO / "inventories" / "lab.py"))
        self.settings = self.fleet.settings()
        self.key = sm.read_api_key(self.settings.stack_api_key_file)
        self.verify = sm.tls_context(self.settings.stack_gateway_ca_file)

    @property
    def nodes(self) -> list[str]:
        return [h["name"] for h in self.state["hosts"]]

    def container(self, node: str) -> str:
        return next(h["container"] for h in self.state["hosts"] if h["name"] == node)

    # --- commands -------------------------------------------------------------------------

    def ssh(self, node: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`command` through sh on a lab host, as root (sudo)."""
        host = next(h for h in self.state["hosts"] if h["name"] == node)
        options = lab_fleet.ssh_options(Path(self.state["ssh_key"]),
                                        Path(self.state["known_hosts"]))
        return subprocess.run(
            ["ssh", *options, "-T", f"{self.state['ssh_user']}@{host['address']}",
             f"sudo sh -c {shlex.quote(command)}"],
            capture_output=True, text=True, timeout=timeout)

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """This machine's Docker engine, which runs the lab's host containers."""
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)

    @contextmanager
    def slow_link(self, node: str, rate: str = "512kbit"):
        """What `node` receives, shaped to `rate` (tbf on the host side of its veth; netem is
        not available here): a transfer to it then lasts long enough to be cut in the middle."""
        index = self.docker("exec", self.container(node), "cat", "/sys/class/net/eth0/iflink")
        require(index, "the lab host's link")
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
        device = next((line.split(": ")[1].split("@")[0] for line in links.stdout.splitlines()
                       if line.split(":")[0] == index.stdout.strip()), None)
        if device is None:
            raise RuntimeError(f"no device with index {index.stdout.strip()} for {node}")
        shape = ["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
                 "burst", "32kbit", "latency", "400ms"]
        require(subprocess.run(shape, capture_output=True, text=True), f"tc on {device}")
        try:
            yield device
        finally:
            subprocess.run(["tc", "qdisc", "del", "dev", device, "root"], capture_output=True)

    def lab_cli(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "lab.py"), "--name",
                               self.name, *args], capture_output=True, text=True, timeout=600)
        self.reload()
        return done

    # --- the stack ------------------------------------------------------------------------

    def stack(self) -> tuple[str, dict]:
        """(manager, stack) from the first manager that answers."""
        command = sm.SmokeStack().command(self.settings.stack_name)
        reasons = []
        for manager in self.fleet.managers:
            try:
                done = self.ssh(manager, command, timeout=30)
            except subprocess.TimeoutExpired:
                reasons.append(f"{manager}: no answer in 30 s")
                continue
            stack = sm.parse_stack(done.stdout.splitlines())
            if done.returncode == 0 and not stack.get("error"):
                return manager, stack
            reasons.append(f"{manager}: {stack.get('error') or done.stderr.strip()[-200:]}")
        raise RuntimeError("no manager answered: " + "; ".join(reasons))

    def gateways(self, stack: dict) -> list[Endpoint]:
        """Every gateway of the stack, each serving every model."""
        return endpoints_for("gateway", self.settings, stack)

    def task_container(self, node: str, service: str) -> str:
        """The id of `service`'s running container on `node`, or ''."""
        done = self.ssh(node, "docker ps -q --filter "
                              f"label=com.docker.swarm.service.name={shlex.quote(service)}")
        return (done.stdout.split() or [""])[0]

    def engine_services(self) -> list[str]:
        return [f"{self.settings.stack_name}_{sm.service_key(s.name)}"
                for s in sm.served_models(self.settings)]

    def healthy(self) -> tuple[bool, str]:
        """Every served model has all its replicas running and answering through the gateway,
        and every gateway answers: the smoke tests' own checks, with short deadlines."""
        try:
            _, stack = self.stack()
        except RuntimeError as error:
            return False, str(error)
        targets, problems = sm.stack_targets(self.settings, stack)
        if problems:
            return False, problems[0].detail
        services = {s["name"]: s for s in stack["services"]}
        for name in self.engine_services():
            running = [t for t in stack["tasks"]
                       if t["service"] == name and t["state"] == "running"]
            wanted = (services.get(name) or {}).get("replicas") or 0
            if len(running) < wanted:
                return False, f"{name}: {len(running)} of {wanted} replicas running"
        results = sm.run_checks(targets, self.key, deadline_s=3.0,
                                ca_file=self.settings.stack_gateway_ca_file)
        failed = [r for r in results if r.failed]
        return (not failed), (failed[0].failure_line() if failed else "")

    def wait_healthy(self, deadline_s: float) -> tuple[float | None, str]:
        """Seconds until healthy() holds (None: not within the deadline), and the last reason."""
        start = time.monotonic()
        why = ""
        while time.monotonic() - start < deadline_s:
            ok, why = self.healthy()
            if ok:
                return time.monotonic() - start, ""
            time.sleep(1)
        return None, why

    # --- weights --------------------------------------------------------------------------

    def weights_problems(self, nodes: list[str] | None = None) -> dict[str, list[str]]:
        """Per host, what is wrong with each model directory where an engine reads it: missing
        is said as such; anything else (a file of the wrong size or sha256, a stray file) is a
        copy that should never be there."""
        found: dict[str, list[str]] = {}
        for node in nodes or self.nodes:
            settings = self.fleet.settings(node)
            for model in settings.models:
                command = ModelState().command(settings.models_dir, model.name, model.revision,
                                               "sha256").get_raw_value()
                done = self.ssh(node, command)
                state = parse_model_state(done.stdout.splitlines())
                problems, _ = installed_problems(state, model.repo_id, model.revision,
                                                 model.allow_patterns, model.ignore_patterns,
                                                 "sha256")
                if problems:
                    found.setdefault(node, []).extend(f"{model.name}: {p}" for p in problems)
        return found

    # --- deploys --------------------------------------------------------------------------

    def deploy(self, timeout: float = 900) -> Deploy:
        """One whole run of the lab inventory, `--json`: its exit code and changed operations."""
        start = time.monotonic()
        done = subprocess.run([str(PYINFRA), "-y", "--json", *DEPLOY], cwd=REPO, env=os.environ,
                              capture_output=True, text=True, timeout=timeout)
        try:
            changed = changed_operations(json.loads(done.stdout))
        except (ValueError, KeyError):
            changed = ["(no --json results: the run stopped early)"]
        return Deploy(done.returncode, time.monotonic() - start, changed, done.stderr)

    def interrupted_deploy(self, at_operation: str, signum: int, timeout: float = 600) -> Deploy:
        """A run that gets `signum` as soon as it starts the first operation whose name begins
        with `at_operation` (as an operator's Ctrl-C or a CI job's cancel would), then is waited
        for: the exit code is what pyinfra made of the signal (None if it never got there)."""
        start = time.monotonic()
        lines: list[str] = []
        run = subprocess.Popen([str(PYINFRA), "-y", *DEPLOY], cwd=REPO, env=os.environ,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sent = False
        for line in run.stdout:
            lines.append(line)
            if not sent and line.startswith("--> Starting operation: " + at_operation):
                time.sleep(0.5)  # inside the operation, not at its banner
                run.send_signal(signum)
                sent = True
                lines.append(f"[drill] sent {signal.Signals(signum).name}\n")
            if time.monotonic() - start > timeout:
                run.kill()
                break
        code = run.wait(timeout=60)
        return Deploy(code if sent else None, time.monotonic() - start, [], "".join(lines))

    def drift_check(self) -> subprocess.CompletedProcess:
        """scripts/drift_check.py on the lab inventory: exit 2 names what drifted."""
        return subprocess.run([sys.executable, str(REPO / "scripts" / "drift_check.py"),
                               DEPLOY[0]], cwd=REPO, env=os.environ, capture_output=True,
                              text=True, timeout=600)

    # --- the gateway's own account --------------------------------------------------------

    def gateway_events(self, node: str, since: float) -> list[tuple[float, str]]:
        """(when, line) of the gateway container's log on `node` since `since` (epoch s), with
        Docker's own timestamps."""
        stamp = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        done = self.ssh(node, "docker logs --timestamps --since " + stamp + " $(docker ps -q "
                              "--filter label=com.docker.swarm.service.name="
                              f"{self.settings.stack_name}_gateway | head -1) 2>&1", timeout=60)
        events = []
        for line in done.stdout.splitlines():
            when, _, text = line.partition(" ")
            try:
                events.append((parse_docker_time(when), text))
            except ValueError:
                continue
        return events


def require(done: subprocess.CompletedProcess, what: str) -> None:
    """RuntimeError naming `what` and the command's last words when it failed."""
    if done.returncode != 0:
        raise RuntimeError(f"{what}: {(done.stderr or done.stdout).strip()[-300:]}")


def changed_operations(run: dict) -> list[str]:
    """The operations of a `pyinfra --json` run that changed at least one host: pyinfra lists,
    per operation, the hosts it changed under "success" and the others under "no_change"."""
    return [op["name"] for op in run["results"]["operations"] if op.get("success")]


def parse_docker_time(text: str) -> float:
    """Docker's RFC 3339 timestamps, nanoseconds included (2026-12-05T23:59:01.123456789Z)."""
    head, _, fraction = text.rstrip("Z").partition(".")
    base = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return base.timestamp() + (float("0." + fraction) if fraction else 0.0)
