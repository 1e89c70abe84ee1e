#!/usr/bin/env python3
"""Benchmark of the weights phase alone: one synthetic model of realistic size to fleets of
several sizes over shaped links, by peers (the chain) and by the control machine (the star).

    python3 scripts/bench_weights.py --out docs/benchmarks [--sizes 1,3,6,10] [--mib 1024]
        [--shards 4] [--host-mbit 200] [--uplink-mbit 200] [--modes peers,control] [--keep]

One lab (gpulab-wbench, as many hosts as the largest size) is brought up without a deploy; each
host's link and the control machine's uplink are capped with tc (scripts/lab/shaping.py); the
hub stand-in serves a synthetic model (scripts/lab/hub/synthetic.py). A warm-up run of the weights
phase on every host installs what the phase installs once (python3, the relay program), with the
lab's tiny model. Then, for each mode and size N: the model is removed from every host of the lab
and the control machine's cache is emptied (a first deploy: the Hub is read in the run), and
`pyinfra --limit <first N hosts> inventories/lab.py scripts/bench_weights_deploy.py` runs the
production weights phase. Measured: wall time of that command, bytes from the Hub (the stand-in's
own counter), bytes out of the control machine and between hosts (the phase's report line), and
every host's copy checked with `sha256sum -c` afterwards (not timed).

Writes DIR/weights.json (machine, settings, every run), DIR/weights.md and DIR/weights.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.fleet_access import reexec_in_venv  # noqa: E402
from scripts.lab import fleet  # noqa: E402
from scripts.lab.hub import synthetic  # noqa: E402

LAB_NAME = "gpulab-wbench"
LAB_CLI = [sys.executable, str(REPO_ROOT / "scripts" / "lab.py"), "--name", LAB_NAME]
DEPLOY_FILE = "scripts/bench_weights_deploy.py"
LEDGER_LINE = re.compile(r"Model weights: hub bytes (\d+) .*?; LAN bytes (\d+)[^\n]*")
BETWEEN_HOSTS = re.compile(r"; between hosts (\d+)")
TIMEOUT_S = 3600


def parse_ledger(output: str) -> dict | None:
    """The phase's own report line: bytes the control machine read from the Hub, sent to hosts,
    and that hosts sent each other."""
    match = LEDGER_LINE.search(output)
    if not match:
        return None
    between = BETWEEN_HOSTS.search(match.group(0))
    return {"ledger_hub_bytes": int(match.group(1)), "control_bytes": int(match.group(2)),
            "peer_bytes": int(between.group(1)) if between else 0}


def summarise(runs: list[dict], one_copy: int) -> list[dict]:
    """Per mode and size: wall time, its ratio to the same mode's one-host run, bytes in copies."""
    rows = []
    for mode in sorted({r["mode"] for r in runs}):
        mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["hosts"])
        base = next((r["wall_s"] for r in mine if r["hosts"] == 1 and r["ok"]), None)
        for r in mine:
            rows.append({
                "mode": mode, "hosts": r["hosts"], "ok": r["ok"], "wall_s": r["wall_s"],
                "vs_one_host": round(r["wall_s"] / base, 2) if base and r["ok"] else None,
                "control_copies": round(r.get("control_bytes", 0) / one_copy, 3),
                "hub_copies": round(r.get("hub_bytes", 0) / one_copy, 3),
                "peer_copies": round(r.get("peer_bytes", 0) / one_copy, 3),
                "verified": r.get("verified"),
            })
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets, against the chain's numbers."""
    peers = [r for r in rows if r["mode"] == "peers" and r["ok"]]
    if not peers:
        return ["no successful peers run: no target can be judged"]
    largest = max(peers, key=lambda r: r["hosts"])
    lines = [
        f"wall time at {largest['hosts']} hosts / one host: {largest['vs_one_host']}x "
        f"(target <= 1.5x): {'met' if (largest['vs_one_host'] or 99) <= 1.5 else 'NOT met'}",
        f"control-machine egress, largest of any size: {max(r['control_copies'] for r in peers)} "
        f"copies (target <= 1.05): "
        f"{'met' if max(r['control_copies'] for r in peers) <= 1.05 else 'NOT met'}",
        f"Hub bytes, largest of any size: {max(r['hub_copies'] for r in peers)} copies "
        f"(target <= 1.0): {'met' if max(r['hub_copies'] for r in peers) <= 1.0 else 'NOT met'}",
    ]
    return lines


# --- The lab --------------------------------------------------------------------------------


def lab(*args: str, timeout: int = TIMEOUT_S) -> str:
    result = subprocess.run([*LAB_CLI, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"bench: lab.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def state() -> dict:
    return fleet.read_state(LAB_NAME)


def hub(path: str, body: dict | None = None) -> dict:
    settings = state()["settings"]
    request = urllib.request.Request(
        settings["hf_endpoint"].rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def on_hosts(hosts: list[dict], script: str) -> list[str]:
    outputs = []
    for host in hosts:
        result = subprocess.run(["docker", "exec", host["container"], "sh", "-c", script],
                                capture_output=True, text=True, timeout=600)
        outputs.append(result.stdout.strip())
    return outputs


def pyinfra(limit: list[str]) -> tuple[int, float, str]:
    env = {**os.environ, "LAB_NAME": LAB_NAME}
    started = time.monotonic()
    limits = [arg for name in limit for arg in ("--limit", name)]
    result = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "pyinfra"), "-y", *limits, "inventories/lab.py",
         DEPLOY_FILE],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return result.returncode, time.monotonic() - started, result.stdout + result.stderr


def measure(mode: str, size: int, model: dict) -> dict:
    hosts = state()["hosts"]
    name = model["name"]
    on_hosts(hosts, f"rm -rf /opt/models/{name} /opt/models/.staging/{name}*")
    shutil.rmtree(state()["settings"]["weights_cache_dir"], ignore_errors=True)
    lab("set", "all", f"weights_distribution={mode}")
    hub("/_lab/stats/reset", {})
    code, seconds, output = pyinfra([h["name"] for h in hosts[:size]])
    record = {"mode": mode, "hosts": size, "ok": code == 0, "wall_s": round(seconds, 2),
              "hub_bytes": hub("/_lab/stats")["total_bytes"], **(parse_ledger(output) or {})}
    checks = on_hosts(hosts[:size], f"cd /opt/models/{name} && sha256sum --quiet -c "
                                    ".gpufleet-sha256sums && echo verified")
    record["verified"] = sum(1 for c in checks if c == "verified")
    record["ok"] = code == 0 and record["verified"] == size
    if not record["ok"]:
        record["error"] = output[-3000:]
    print(f"bench: {mode:7} {size:2} hosts: {seconds:7.1f} s, control "
          f"{record.get('control_bytes')}, peers {record.get('peer_bytes')}, hub "
          f"{record['hub_bytes']}, verified {record['verified']}/{size}", flush=True)
    return record


RELAY_LINE = re.compile(r"received [^\n]* from the control machine in ([0-9.]+) s")


def bulk_rates(model: dict, shard: Path) -> dict:
    """MB/s into one host over an unshaped link (the two shared cores are the limit): OpenSSH's
    scp, paramiko's SFTP (pyinfra's upload, the star's path) with the same file, and the weights
    phase's own bulk path (the control machine's OpenSSH stream into the head relay)."""
    lab("shape", "--off")
    target = state()["hosts"][0]
    address, user, key = target["address"], state()["ssh_user"], state()["ssh_key"]
    known = state()["known_hosts"]
    size = shard.stat().st_size
    rates = {"bytes": size}
    started = time.monotonic()
    subprocess.run(["scp", "-q", "-i", key, "-o", f"UserKnownHostsFile={known}", "-o",
                    "StrictHostKeyChecking=yes", str(shard), f"{user}@{address}:/tmp/bench-scp"],
                   check=True, timeout=TIMEOUT_S)
    rates["openssh_scp_mb_s"] = round(size / (time.monotonic() - started) / 1e6, 1)
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(known)
    client.connect(address, username=user, key_filename=key, look_for_keys=False,
                   allow_agent=False)
    try:
        started = time.monotonic()
        client.open_sftp().put(str(shard), "/tmp/bench-sftp")
        rates["paramiko_sftp_mb_s"] = round(size / (time.monotonic() - started) / 1e6, 1)
    finally:
        client.close()
    on_hosts([target], "rm -f /tmp/bench-scp /tmp/bench-sftp")
    name = model["name"]
    on_hosts(state()["hosts"], f"rm -rf /opt/models/{name} /opt/models/.staging/{name}*")
    lab("set", "all", "weights_distribution=peers")
    code, _, output = pyinfra([target["name"]])
    match = RELAY_LINE.search(output)
    if code == 0 and match:
        one_copy = sum(p.stat().st_size for p in shard.parent.iterdir() if p.is_file())
        rates["relay_mb_s"] = round(one_copy / float(match.group(1)) / 1e6, 1)
    return rates


# --- The report -----------------------------------------------------------------------------


def write_report(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.json").write_text(json.dumps(data, indent=2) + "\n")
    rows, settings = data["summary"], data["settings"]
    lines = [
        "# Model weights to a fleet: peers (chain) against the control machine (star)", "",
        f"Measured {data['date']} by `scripts/bench_weights.py` on {data['machine']}. One synthetic "
        f"model of {settings['mib']} MiB in {settings['shards']} shards "
        f"({data['one_copy_bytes']} bytes with its small files); every host's link capped at "
        f"{settings['host_mbit']} Mbit/s and the control machine's uplink at "
        f"{settings['uplink_mbit']} Mbit/s (tc tbf). Each run is a first deploy of the weights "
        "phase: no host holds the model and the control machine's cache is empty.", "",
        "| mode | hosts | wall (s) | vs one host | control egress (copies) | Hub (copies) | "
        "between hosts (copies) | hosts verified |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['hosts']} | {r['wall_s']} | {r['vs_one_host']} | "
                     f"{r['control_copies']} | {r['hub_copies']} | {r['peer_copies']} | "
                     f"{r['verified']}/{r['hosts']} |")
    bulk = data.get("bulk")
    if bulk:
        lines += ["", "The bulk path into one host over an unshaped link (MB/s; the two shared cores "
                  "encrypt, so this is a CPU figure, not a link's):", "",
                  "| OpenSSH scp | paramiko SFTP (pyinfra's upload: the star) | the weights relay "
                  "(OpenSSH stream, the chain's head) |", "|---:|---:|---:|",
                  f"| {bulk.get('openssh_scp_mb_s')} | {bulk.get('paramiko_sftp_mb_s')} | "
                  f"{bulk.get('relay_mb_s')} |", "",
                  f"scp and SFTP: one shard ({bulk['bytes']} bytes), the copy command's wall time, "
                  "connection included. The relay: the whole model, its own timer (first byte to "
                  "last byte written into staging) in a one-host run of the phase."]
    lines += ["", "Targets (the chain):", ""] + [f"- {v}" for v in data["verdicts"]] + [
        "", "Wall time is that of `pyinfra --limit <N hosts> inventories/lab.py "
        "scripts/bench_weights_deploy.py`: connecting, facts, the Hub download into the control "
        "cache and its verification, the transfer, and each host's `sha256sum -c` before the swap. "
        "Raw runs: `weights.json`; chart: `weights.png`.", ""]
    (out / "weights.md").write_text("\n".join(lines))
    _chart(out / "weights.png", rows)


def _chart(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in sorted({r["mode"] for r in rows}):
        mine = [r for r in rows if r["mode"] == mode and r["ok"]]
        label = "peers (chain)" if mode == "peers" else "control machine (star)"
        ax.plot([r["hosts"] for r in mine], [r["wall_s"] for r in mine], marker="o", label=label)
    ax.set_xlabel("hosts")
    ax.set_ylabel("weights phase wall time (s)")
    ax.set_title("One model to N hosts over shaped links")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    reexec_in_venv()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="1,3,6,10")
    parser.add_argument("--modes", default="peers,control")
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--host-mbit", type=int, default=200)
    parser.add_argument("--uplink-mbit", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    modes = [m for m in args.modes.split(",") if m]
    if not sizes or sizes[0] < 1 or any(m not in ("peers", "control") for m in modes):
        parser.error("--sizes: positive integers; --modes: peers and/or control")

    lab("up", "--hosts", str(sizes[-1]), "--no-deploy")
    # Warm-up, not measured: what the phase installs once (python3, the relay program).
    code, seconds, output = pyinfra([h["name"] for h in state()["hosts"]])
    if code != 0:
        raise SystemExit(f"bench: the warm-up run failed:\n{output[-3000:]}")
    repo, revision = synthetic.write_synthetic(fleet.state_dir(LAB_NAME) / "hub", args.mib,
                                               args.shards)
    model = {"name": repo.split("/")[1], "repo_id": repo, "revision": revision, "serve": False}
    lab("set", "all", "models=" + json.dumps([model]))
    lab("shape", "--host-mbit", str(args.host_mbit), "--uplink-mbit", str(args.uplink_mbit))
    runs = []
    try:
        for mode in modes:
            for size in sizes:
                runs.append(measure(mode, size, model))
    finally:
        lab("shape", "--off")
    files = fleet.state_dir(LAB_NAME) / "hub" / repo / revision
    one_copy = sum(p.stat().st_size for p in files.iterdir() if p.is_file())
    bulk = bulk_rates(model, max(files.glob("*.safetensors"), key=lambda p: p.stat().st_size))
    rows = summarise(runs, one_copy)
    data = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}: "
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "settings": {"mib": args.mib, "shards": args.shards, "host_mbit": args.host_mbit,
                     "uplink_mbit": args.uplink_mbit, "sizes": sizes, "modes": modes},
        "one_copy_bytes": one_copy, "bulk": bulk, "runs": runs, "summary": rows, "verdicts": verdicts(rows),
    }
    write_report(args.out, data)
    print("\n".join(data["verdicts"]))
    if not args.keep:
        lab("down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
