"""The rollout's record: a state file that makes a second run resume, and the report (Markdown and
JSON) of what each host went through."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class HostRecord:
    name: str
    changes: list[dict] = field(default_factory=list)  # {operation, detail} (plan.disruptive_changes)
    status: str = "pending"   # pending, drained, done, failed
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    rebooted: bool | None = None   # its boot changed (boot id, PID 1's start)
    reboots: int | None = None     # reboots its deploy did (the driver phase's reboot operation)
    drain_s: float | None = None
    deploy_s: float | None = None
    deploy_exit: int | None = None
    back_s: float | None = None
    wall_s: float | None = None
    labels_set: dict = field(default_factory=dict)
    problem: str | None = None
    log: str | None = None
    # Wall-clock times (epoch seconds) of its steps: drained, deploy started, set active, done.
    times: dict = field(default_factory=dict)


@dataclass
class RolloutRecord:
    inventory: str
    data: list[str]
    max_unavailable: int
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    finished: str | None = None
    batches: list[list[str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    hosts: dict[str, HostRecord] = field(default_factory=dict)
    result: str = "running"   # running, done, stopped, refused, nothing to do
    wall_s: float | None = None

    def host(self, name: str) -> HostRecord:
        return self.hosts.setdefault(name, HostRecord(name))


def drained_by_rollout(state_path: Path) -> dict[str, str]:
    """Hosts an earlier rollout drained and did not finish (name -> its status there): this run
    takes them first, and is the only one that may set them active again."""
    try:
        saved = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: host["status"] for name, host in saved.get("hosts", {}).items()
            if host.get("status") in ("drained", "failed")}


def save(record: RolloutRecord, out_dir: Path) -> None:
    """rollout.json (also the state a rerun resumes from) and rollout.md, written whole each
    time (staged, then renamed: a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(record)
    for name, text in (("rollout.json", json.dumps(data, indent=2, default=str) + "\n"),
                       ("rollout.md", markdown(record))):
        staged = out_dir / (name + ".new")
        staged.write_text(text)
        staged.rename(out_dir / name)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _versions(v: dict) -> str:
    if not v:
        return "-"
    return f"driver {v.get('driver') or '-'}, Docker {v.get('docker') or '-'}, toolkit {v.get('toolkit') or '-'}"


def markdown(record: RolloutRecord) -> str:
    lines = [
        "# Rollout", "",
        f"{record.started}, `{record.inventory}`, max unavailable {record.max_unavailable}"
        + (f", data {' '.join(record.data)}" if record.data else "") + f": **{record.result}**"
        + (f" in {record.wall_s:.0f} s" if record.wall_s is not None else "") + ".", "",
        "Batches: " + ("; ".join(", ".join(b) for b in record.batches) or "none"), "",
    ]
    if record.refused:
        lines += ["Refused:", ""] + [f"- {why}" for why in record.refused] + [""]
    lines += ["| host | result | before | after | rebooted | drain (s) | deploy (s) | back (s) | wall (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for host in record.hosts.values():
        rebooted = "-" if host.rebooted is None else (
            f"yes ({host.reboots}x)" if host.rebooted else "no")
        lines.append(f"| {host.name} | {host.status} | {_versions(host.before)} | {_versions(host.after)} "
                     f"| {rebooted} | {_s(host.drain_s)} | {_s(host.deploy_s)} | {_s(host.back_s)} "
                     f"| {_s(host.wall_s)} |")
    problems = [h for h in record.hosts.values() if h.problem]
    if problems:
        lines += ["", "Problems:", ""] + [f"- {h.name}: {h.problem}" + (f" (deploy log: {h.log})" if h.log else "")
                                          for h in problems]
    changes = [h for h in record.hosts.values() if h.changes]
    if changes:
        lines += ["", "What the deploy would change on each host (the reason it was taken; the commands "
              "are in the JSON):", ""]
        for host in changes:
            lines += [f"- {host.name}: " + "; ".join(c["operation"] for c in host.changes)]
    return "\n".join(lines) + "\n"
