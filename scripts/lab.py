#!/usr/bin/env python3
"""The lab: a fleet of fresh servers on this machine, and the deploy run against them.

    python3 scripts/lab.py up [--hosts N] [--no-deploy]   bootstrap, hosts, then the full deploy
    python3 scripts/lab.py status [--json]                what is running, and where
    python3 scripts/lab.py ssh NODE [COMMAND...]           a shell on a host, as the deploy user
    python3 scripts/lab.py down [--purge-images]           remove everything the lab created
    python3 scripts/lab.py bootstrap                       .venv with the pinned deps + a Docker engine

Editing the lab inventory, as an operator edits a real one (kept in .lab/<lab>/hosts.json):

    python3 scripts/lab.py set NODE KEY=VALUE...   host data, e.g. set node-4 swarm_retire=true
    python3 scripts/lab.py unset NODE KEY...       remove host data keys again
    python3 scripts/lab.py forget NODE             out of the inventory; the container keeps running
    python3 scripts/lab.py remember NODE           back into the inventory
    python3 scripts/lab.py managers N              the first N inventory hosts are swarm_managers
    python3 scripts/lab.py tls on|off              HTTPS at the gateway with the lab's own CA, or not

A LAB FAULT on a simulated GPU, as hardware fails (read by the simulated nvidia-smi):

    python3 scripts/lab.py gpu-fault NODE INDEX ecc[=N]|remap-pending|remap-failed|recovery[=ACTION]|lost|xid[=N]|temperature[=C]|clear

Lab hosts are containers that behave like fresh Debian 12 servers (systemd, sshd, sudo, their
own Docker data volume); pyinfra reaches them over real SSH. The lab's name comes from --name or
LAB_NAME (default gpulab): the tests use their own name, so they never touch yours.

Standard library only: this runs on a machine where nothing is installed yet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.lab import fleet, gpu_faults, host_edits, images, services, shaping  # noqa: E402  (needs the repo root on sys.path)
from scripts.lab.fleet import LabError, say  # noqa: E402

VENV = REPO_ROOT / ".venv"
# Host tools the lab needs on this machine, by the command that proves each is there.
HOST_TOOLS = {
    "dockerd": "docker.io",
    "debootstrap": "debootstrap",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "gpg": "gnupg",
    "tc": "iproute2",  # the drills shape a lab host's link (scripts/drill/lab.py)
    "apt-ftparchive": "apt-utils",  # the stand-in apt repositories are indexed with it
}


# --- bootstrap ------------------------------------------------------------------------------


def pinned_requirements() -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: PyYAML == pyyaml, a_b == a-b


def pin_mismatches(pins: list[str], installed: dict[str, str | None]) -> list[str]:
    """One line per pin the environment does not satisfy ("name: 1.0 installed, 2.0 pinned").
    `pins` are `name==version` strings; `installed` maps normalized names to the installed
    version (None when absent)."""
    problems = []
    for pin in pins:
        name, sep, version = pin.partition("==")
        if not sep:
            raise LabError(f"pyproject.toml: {pin!r} is not pinned (expected name==version)")
        name, version = name.strip(), version.strip()
        have = installed.get(_normalized(name))
        if have != version:
            problems.append(f"{name}: {have or 'not'} installed, {version} pinned")
    return problems


def installed_versions(names: list[str]) -> dict[str, str | None]:
    """What .venv has installed of `names` (normalized name -> version or None)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        return {}
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try:\n        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n        return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))\n"
    )
    result = subprocess.run([str(python), "-c", probe, *names], capture_output=True, text=True)
    if result.returncode != 0:  # a broken environment: reinstall
        return {}
    return {_normalized(name): version for name, version in json.loads(result.stdout).items()}


def ensure_venv() -> None:
    """.venv with exactly the pins of pyproject.toml: created when missing, and pip runs only
    when what is installed differs from the pins (checked package by package, every time)."""
    pins = pinned_requirements()
    names = [pin.partition("==")[0].strip() for pin in pins]
    if not (VENV / "bin" / "python").exists():
        say(f"venv: creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    problems = pin_mismatches(pins, installed_versions(names))
    if not problems:
        return
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    say(f"venv: {shown}: installing the {len(pins)} pinned dependencies")
    subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", *pins],
        check=True,
    )
    problems = pin_mismatches(pins, installed_versions(names))
    if problems:
        raise LabError(f".venv still differs from pyproject.toml after pip install: {'; '.join(problems)}")


def apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise LabError(f"missing {', '.join(packages)}: install them (as root: apt-get install {' '.join(packages)})")
    say(f"installing {', '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-800:]
            raise LabError(f"{' '.join(command[:2])} failed (exit {result.returncode}): {output}")


def ensure_host_tools() -> None:
    missing = sorted({package for tool, package in HOST_TOOLS.items() if not shutil.which(tool)})
    if missing:
        apt_install(missing)


def docker_answers() -> bool:
    if not shutil.which("docker"):  # a bare machine: bootstrap installs docker.io
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def ensure_docker_engine(timeout_s: float = 60) -> None:
    """A Docker engine that answers: started under systemd where there is one, else as a
    detached dockerd (it must outlive this process: the tests and the deploy use it)."""
    if docker_answers():
        return
    if Path("/run/systemd/system").exists():
        say("docker: engine not running, starting docker.service")
        subprocess.run(["systemctl", "start", "docker"], check=True)
    else:
        say("docker: engine not running, starting dockerd (log: /var/log/dockerd.log)")
        with open("/var/log/dockerd.log", "ab") as log:
            subprocess.Popen(["dockerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not docker_answers():
        if time.monotonic() > deadline:
            raise LabError(f"the Docker engine did not answer within {timeout_s:.0f}s: see /var/log/dockerd.log")
        time.sleep(1)
    say("docker: engine answers")


def bootstrap() -> None:
    ensure_host_tools()
    ensure_venv()
    ensure_docker_engine()


# --- up / down / status / ssh -----------------------------------------------------------------


def gpu_hardware(host_name: str) -> dict[str, bytes]:
    """Simulated GPUs are the host's 'hardware': provisioned with the host, not by the deploy."""
    from scripts.lab.nvidia_sim import hardware

    return {"/etc/gpu-simulator/gpus.json": hardware.gpus_json(host_name).encode()}


def up(lab: str, count: int, deploy: bool) -> int:
    started = time.monotonic()
    bootstrap()
    image = images.ensure_host()
    subnet = fleet.ensure_network(lab)
    key = fleet.ensure_ssh_key(lab)
    count = max(count, fleet.existing_host_count(lab))
    hosts = fleet.planned_hosts(lab, subnet, count)
    states = fleet.container_states(lab)
    foreign = fleet.foreign_hosts([h.container for h in hosts if h.container in states],
                                  key.with_suffix(".pub").read_bytes())
    if foreign:
        raise LabError(
            f"{', '.join(foreign)}: made with another SSH key than this lab's "
            f"({key.relative_to(REPO_ROOT)}: made anew, or from another checkout), so no SSH "
            f"reaches them: `python3 scripts/lab.py --name {lab} down` removes them (their "
            "Docker data and weights too), or use another --name / LAB_NAME")
    for index, host in enumerate(hosts, start=1):
        state = states.get(host.container)
        if state is None:
            say(f"{host.name}: creating {host.container} at {host.address}")
            fleet.create_host(lab, index, host, image, key.with_suffix(".pub").read_bytes(),
                              gpu_hardware(host.name))
        elif state != "running":
            say(f"{host.name}: starting {host.container} (was {state})")
            fleet.docker("start", host.container)
    for host in hosts:
        fleet.wait_until_ready(host, key)
    known_hosts = fleet.state_dir(lab) / "known_hosts"
    fleet.record_host_keys(hosts, known_hosts)
    stand_ins = services.start(lab, subnet, fleet.state_dir(lab))
    if "stack_gateway_tls_cert_file" in ((fleet.read_state(lab) or {}).get("settings") or {}):
        stand_ins.update(services.tls_settings(lab, fleet.state_dir(lab)))  # `tls on` stays on
    state_file = fleet.write_state(lab, subnet, hosts, key, known_hosts, stand_ins)
    say(f"{len(hosts)} hosts ready in {time.monotonic() - started:.0f}s ({state_file.relative_to(REPO_ROOT)})")
    if not deploy:
        return 0
    say("running the deploy: pyinfra inventories/lab.py deploy.py -y")
    result = subprocess.run(
        [str(VENV / "bin" / "pyinfra"), "inventories/lab.py", "deploy.py", "-y"],
        cwd=REPO_ROOT, env={**os.environ, "LAB_NAME": lab},
    )
    print()
    if result.returncode != 0:
        print(f"The deploy exited {result.returncode}: the hosts are up, the fleet is not "
              "converged (its output above says which host and why).")
    print(f"Lab '{lab}' is up. Next:")
    print("  python3 scripts/lab.py status            hosts, addresses, state")
    print("  python3 scripts/lab.py ssh node-1        a shell as the deploy user")
    print("  .venv/bin/pyinfra inventories/lab.py deploy.py   run again: nothing should change")
    print("  python3 scripts/lab.py down              remove the lab")
    print("  README.md, section 'The lab'             what the lab is and what it stands in for")
    return result.returncode


def status(lab: str, as_json: bool) -> int:
    state = fleet.read_state(lab)
    containers = fleet.container_states(lab) if docker_answers() else {}
    hosts = []
    for host in (state or {}).get("hosts", []):
        hosts.append({**host, "state": containers.get(host["container"], "missing")})
    report = {"lab": lab, "hosts": hosts}
    endpoint = gateway_endpoint(state)
    if endpoint:
        report["endpoint"] = endpoint
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    if not state:
        print(f"lab {lab} is not up (python3 scripts/lab.py up)")
        return 1
    key, known_hosts = Path(state["ssh_key"]), Path(state["known_hosts"])
    with ThreadPoolExecutor(max_workers=8) as pool:
        reachable = list(pool.map(
            lambda h: h["state"] == "running" and fleet.ssh_answers(h["address"], key, known_hosts),
            hosts,
        ))
    print(f"lab {lab}  network {state['network']} {state['subnet']}")
    print(status_table(hosts, reachable))
    return 0 if all(reachable) else 1


def status_table(hosts: list[dict], reachable: list[bool]) -> str:
    """The status table: one row per host, with whether the deploy user gets in over SSH."""
    rows = [("name", "container", "address", "state", "ssh")]
    rows += [(h["name"], h["container"], h["address"],
              h["state"] + (",forgotten" if h.get("forgotten") else ""), "ok" if ok else "NO")
             for h, ok in zip(hosts, reachable)]
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(4)]
    return "\n".join("".join(cell.ljust(width) for cell, width in zip(row, widths)) + row[4]
                     for row in rows)


def gateway_endpoint(state: dict | None, port: int = 8080) -> str | None:
    """The stack gateway's base URL on the first manager (the lab publishes it in host mode,
    stack_gateway_port's default), once a gateway answers there; None before the stack exists."""
    import urllib.error
    import urllib.request

    if not state or not state.get("hosts"):
        return None
    base = f"http://{state['hosts'][0]['address']}:{port}"
    try:
        urllib.request.urlopen(f"{base}/health", timeout=2).close()
    except urllib.error.HTTPError:
        pass  # it answered (503: no engine task healthy yet): the gateway exists
    except OSError:
        return None
    return base


def ssh(lab: str, node: str, command: list[str]) -> int:
    state = fleet.read_state(lab)
    if not state:
        raise LabError(f"lab {lab} is not up: run `python3 scripts/lab.py up` first")
    host = next((h for h in state["hosts"] if h["name"] == node), None)
    if host is None:
        names = ", ".join(h["name"] for h in state["hosts"])
        raise LabError(f"no host {node} in lab {lab} (hosts: {names})")
    options = fleet.ssh_options(Path(state["ssh_key"]), Path(state["known_hosts"]))
    os.execvp("ssh", ["ssh", *options, "-t" if not command else "-T",
                      f"{state['ssh_user']}@{host['address']}", *command])


def inventory_accepts(lab: str) -> bool:
    """The lab inventory, as edited, validated the way a deploy validates it before connecting
    (operations/inventory_check.py, in the venv): its one-line problems on stderr if not."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise LabError("no .venv: run `python3 scripts/lab.py bootstrap` first")
    check = subprocess.run(
        [str(python), "-c", "import runpy, sys; sys.path.insert(0, '.'); "
         "runpy.run_path('inventories/lab.py', run_name='inventory')"],
        cwd=REPO_ROOT, env={**os.environ, "LAB_NAME": lab}, capture_output=True, text=True)
    sys.stderr.write(check.stderr)
    return check.returncode == 0


def edit(lab: str, change) -> int:
    """Apply one operator edit (a pure function of fleet: state -> state) to hosts.json, and
    say what the inventory now gives the deploy."""
    state = fleet.read_state(lab)
    if not state:
        raise LabError(f"lab {lab} is not up: run `python3 scripts/lab.py up` first")
    previous = json.loads(json.dumps(state))
    state = change(state)
    fleet.save_state(lab, state)
    if not inventory_accepts(lab):
        fleet.save_state(lab, previous)
        say("edit refused: hosts.json is unchanged")
        return 2
    listed = [h for h in state["hosts"] if not h.get("forgotten")]
    managers = [h["name"] for h in listed[: state.get("swarm_managers", 1)]]
    say(f"inventory: {', '.join(h['name'] for h in listed)}; swarm_managers: {', '.join(managers)}")
    for host in state["hosts"]:
        notes = [f"{k}={json.dumps(v)}" for k, v in sorted((host.get("data") or {}).items())]
        if host.get("forgotten"):
            notes.append("forgotten (container running, not in the inventory)")
        if notes:
            say(f"{host['name']}: {'; '.join(notes)}")
    return 0


def set_tls(lab: str, state: dict, on: bool) -> dict:
    """The lab's settings with the gateway's TLS keys (the lab CA's certificate) in or out."""
    keys = services.tls_settings(lab, fleet.state_dir(lab))
    settings = {k: v for k, v in state.get("settings", {}).items() if k not in keys}
    if on:
        settings.update(keys)
        say(f"tls: the gateway serves HTTPS as {keys['stack_gateway_tls_server_name']} "
            f"(certificate {keys['stack_gateway_tls_cert_file']}, CA {keys['stack_gateway_ca_file']}); "
            "the next deploy rolls it out")
    return {**state, "settings": settings}


def gpu_fault(lab: str, node: str, index: int, fault: str) -> int:
    """Inject (or clear) a LAB FAULT on GPU `index` of `node`, as root in its container: the
    hardware's doing, not the deploy user's."""
    state = fleet.read_state(lab)
    host = next((h for h in (state or {}).get("hosts", []) if h["name"] == node), None)
    if host is None:
        raise LabError(f"no host {node} in lab {lab}")
    try:
        script = gpu_faults.fault_script(index, fault)
    except ValueError as error:
        raise LabError(str(error)) from None
    subprocess.run(["docker", "exec", host["container"], "sh", "-c", script], check=True,
                   capture_output=True)
    say(f"{node}: GPU {index}: {fault} (LAB FAULT, read by the simulated nvidia-smi)")
    return 0


def shape(lab: str, host_mbit: int | None, uplink_mbit: int | None) -> int:
    """Cap every host's link and the control machine's uplink (scripts/lab/shaping.py)."""
    state = fleet.read_state(lab)
    if not state or not state.get("hosts"):
        raise LabError(f"lab {lab} is not up: python3 scripts/lab.py up")
    try:
        done = shaping.shape_lab([h["container"] for h in state["hosts"]],
                                 fleet.network_name(lab), host_mbit, uplink_mbit)
    except shaping.ShapeError as error:
        raise LabError(str(error)) from None
    for line in done:
        say(f"LAB LINK {line}")
    return 0


def down(lab: str, purge_images: bool) -> int:
    if not docker_answers():
        raise LabError("no Docker engine answers: nothing to remove (python3 scripts/lab.py bootstrap)")
    started = time.monotonic()
    services.stop(lab)
    removed = fleet.remove_everything(lab)
    say(f"removed {removed['container']} containers, {removed['network']} networks, "
        f"{removed['volume']} volumes of lab {lab} in {time.monotonic() - started:.0f}s")
    if purge_images:
        tags = images.lab_images(lab)
        kept = []
        for tag in tags:
            # Another lab's containers may still run from a shared image: keep it, say so.
            if subprocess.run(["docker", "rmi", tag], capture_output=True).returncode != 0:
                kept.append(tag)
        say(f"removed {len(tags) - len(kept)} lab images"
            + (f"; kept {', '.join(kept)} (in use by another lab's containers)" if kept else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="lab name (default: $LAB_NAME or gpulab)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bootstrap", help=".venv with pinned deps, host tools, a Docker engine")
    up_parser = commands.add_parser("up", help="start the lab hosts and run the deploy")
    up_parser.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    up_parser.add_argument("--no-deploy", action="store_true", help="hosts only, no deploy")
    status_parser = commands.add_parser("status", help="hosts and their state")
    status_parser.add_argument("--json", action="store_true")
    ssh_parser = commands.add_parser("ssh", help="ssh to a host as the deploy user")
    ssh_parser.add_argument("node")
    ssh_parser.add_argument("remote_command", nargs=argparse.REMAINDER)
    set_parser = commands.add_parser("set", help="add or change hosts' inventory data")
    set_parser.add_argument("node", help="a host, several comma-separated, or all")
    set_parser.add_argument("assignments", nargs="+", metavar="KEY=VALUE",
                            help="a JSON value (true, 3, [..]) or a plain string")
    unset_parser = commands.add_parser("unset", help="remove keys from hosts' inventory data")
    unset_parser.add_argument("node", help="a host, several comma-separated, or all")
    unset_parser.add_argument("keys", nargs="+", metavar="KEY")
    forget_parser = commands.add_parser(
        "forget", help="take a host out of the inventory; its container keeps running")
    forget_parser.add_argument("node")
    remember_parser = commands.add_parser("remember", help="put a forgotten host back")
    remember_parser.add_argument("node")
    managers_parser = commands.add_parser(
        "managers", help="the first N inventory hosts are swarm_managers (default 1)")
    managers_parser.add_argument("count", type=int)
    tls_parser = commands.add_parser(
        "tls", help="HTTPS at the gateway with the lab's own CA (on), or plain HTTP (off)")
    tls_parser.add_argument("mode", choices=["on", "off"])
    fault_parser = commands.add_parser(
        "gpu-fault", help="LAB FAULT on one simulated GPU: ecc[=N], remap-pending, remap-failed, "
        "recovery[=ACTION], lost, xid[=N] (last XID, for monitoring), temperature[=C]; or clear")
    fault_parser.add_argument("node")
    fault_parser.add_argument("index", type=int)
    fault_parser.add_argument("fault")
    shape_parser = commands.add_parser(
        "shape", help="LAB LINKS: cap each host's link and the control machine's uplink (tc tbf)")
    shape_parser.add_argument("--host-mbit", type=int, help="each host's link, Mbit/s")
    shape_parser.add_argument("--uplink-mbit", type=int, help="the control machine's uplink, Mbit/s")
    shape_parser.add_argument("--off", action="store_true", help="remove every cap")
    down_parser = commands.add_parser("down", help="remove the lab's containers, network, volumes")
    down_parser.add_argument("--purge-images", action="store_true", help="also remove lab images")
    args = parser.parse_args(argv)
    try:
        lab = fleet.lab_name(args.name)
        if args.command == "bootstrap":
            bootstrap()
            say("ready")
            return 0
        if args.command == "up":
            if args.hosts < 1:
                raise LabError(f"--hosts {args.hosts}: expected at least 1")
            return up(lab, args.hosts, deploy=not args.no_deploy)
        if args.command == "status":
            return status(lab, args.json)
        if args.command == "ssh":
            return ssh(lab, args.node, args.remote_command)
        if args.command == "set":
            return edit(lab, lambda s: host_edits.set_host_data(s, args.node, args.assignments))
        if args.command == "unset":
            return edit(lab, lambda s: host_edits.unset_host_data(s, args.node, args.keys))
        if args.command in ("forget", "remember"):
            forgotten = args.command == "forget"
            return edit(lab, lambda s: host_edits.set_forgotten(s, args.node, forgotten))
        if args.command == "tls":
            return edit(lab, lambda s: set_tls(lab, s, args.mode == "on"))
        if args.command == "managers":
            return edit(lab, lambda s: host_edits.set_manager_count(s, args.count))
        if args.command == "gpu-fault":
            return gpu_fault(lab, args.node, args.index, args.fault)
        if args.command == "shape":
            if args.off == (args.host_mbit is not None or args.uplink_mbit is not None):
                raise LabError("shape: give --host-mbit and/or --uplink-mbit, or --off")
            return shape(lab, args.host_mbit, args.uplink_mbit)
        return down(lab, args.purge_images)
    except (LabError, images.ImageError) as error:
        print(f"lab: error: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"lab: error: {' '.join(map(str, error.cmd))} exited {error.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
