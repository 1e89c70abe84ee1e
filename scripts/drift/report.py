"""The drift check's findings and how they are told: classification, exit code, one-line
summary, and the three renderings (a table per host, JSON, Markdown). Pure: no pyinfra, no
network; the planning side (scripts/drift/plan.py) fills a Report.

Vocabulary:
- an *item* is one operation on one host that would do something. Its kind says whether it is
  drift (counted) or not:
    "change"      the operation would change the host (its detail says what)
    "fail"        the deploy would fail this host here (preflight, a forbidden reboot, ...)
    "finding"     seen and deliberately left to an operator (a Swarm node not in the inventory)
    "conditional" runs only if an earlier operation changes something (pyinfra's `_if`: a
                  restart after a changed file, a check after a changed driver); never counted,
                  since it follows from a counted item or does not run at all
- a host whose check could not be made (unreachable, an error while planning) makes the whole
  check fail: exit 1, whatever the other hosts show.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

EXIT_NO_DRIFT = 0
EXIT_CHECK_FAILED = 1
EXIT_DRIFT = 2

COUNTED_KINDS = ("change", "fail", "finding")
KINDS = COUNTED_KINDS + ("conditional",)
DETAIL_COMMANDS = 3  # commands shown when an operation did not explain itself
DETAIL_WIDTH = 160  # one command, in words
DETAIL_MAX = 1000  # one item's whole detail


@dataclass
class Item:
    operation: str
    kind: str
    detail: str
    # The host whose operation would make the change, when it is another one than the host the
    # change is about (a Swarm manager relabelling a node); None: the item's own host.
    via: str | None = None
    # While classifying: the host the change is about, when the operation said so.
    about: str | None = field(default=None, repr=False, compare=False)

    @property
    def counted(self) -> bool:
        return self.kind in COUNTED_KINDS


@dataclass
class HostResult:
    name: str
    # "checked", "unreachable" or "error" (planning raised, or a fact could not be read)
    status: str = "checked"
    error: str | None = None
    items: list[Item] = field(default_factory=list)

    @property
    def drift(self) -> list[Item]:
        return [item for item in self.items if item.counted]

    @property
    def conditional(self) -> list[Item]:
        return [item for item in self.items if not item.counted]


@dataclass
class Report:
    inventory: str
    hosts: list[HostResult] = field(default_factory=list)
    # Set when the check could not start (bad configuration, no inventory): no host was checked.
    failure: str | None = None
    started: str | None = None
    duration_s: float | None = None

    @property
    def failed_hosts(self) -> list[HostResult]:
        return [h for h in self.hosts if h.status != "checked"]

    @property
    def drifted_hosts(self) -> list[HostResult]:
        return [h for h in self.hosts if h.drift]

    @property
    def drift_count(self) -> int:
        return sum(len(h.drift) for h in self.hosts)

    @property
    def exit_code(self) -> int:
        if self.failure or self.failed_hosts or not self.hosts:
            return EXIT_CHECK_FAILED
        return EXIT_DRIFT if self.drift_count else EXIT_NO_DRIFT

    @property
    def summary(self) -> str:
        return summary_line(self)


# --- Commands in words ------------------------------------------------------------------------


def one_line(text: str, width: int = DETAIL_WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_command(command: Any) -> str:
    """A pyinfra command in a few words, secrets masked: a StringCommand's masked text, an
    upload's destination, a Python callback's name (a failure's reason for `fail_host`)."""
    kind = type(command).__name__
    if kind == "StringCommand":
        return one_line(command.get_masked_value())
    if kind == "FileUploadCommand":
        return f"upload {command.dest}"
    if kind == "FileDownloadCommand":
        return f"download {command.src}"
    if kind == "RsyncCommand":
        return f"rsync to {command.dest}"
    if kind == "FunctionCommand":
        return f"run {getattr(command.function, '__name__', 'a Python callback')}"
    return one_line(str(command))


def failure_reason(command: Any) -> str | None:
    """The reason of a command that fails the host (operations.phase.fail_host), else None."""
    if type(command).__name__ != "FunctionCommand":
        return None
    if getattr(command.function, "__name__", "") != "fail_host" or not command.args:
        return None
    return one_line(command.args[0], width=400)


def commands_detail(commands: list[Any]) -> str:
    shown = [describe_command(c) for c in commands[:DETAIL_COMMANDS]]
    more = len(commands) - len(shown)
    return one_line("; ".join(shown) + (f" (+{more} more)" if more > 0 else ""), 400)


def classify(
    operation: str,
    *,
    conditional: bool,
    commands: list[Any],
    explained: list[tuple[str, str | None]],
    findings: list[str],
) -> list[Item]:
    """Items of one operation on one host, from what planning it produced: its commands (empty:
    no change), whether it carries `_if`, and what it said through operations.phase
    (`explain`: what it would change, in words, and about which host; `finding`: something
    left to an operator)."""
    items = [Item(operation, "finding", one_line(text, 400)) for text in findings]
    if not commands:
        return items
    if conditional:
        return items + [Item(operation, "conditional", "runs only if an earlier operation changes")]
    reasons = [r for r in map(failure_reason, commands) if r]
    if reasons:
        return items + [Item(operation, "fail", one_line("; ".join(reasons), DETAIL_MAX))]
    if any(about for _, about in explained):
        # One change per host it is about (a manager labelling several nodes).
        return items + [
            Item(operation, "change", one_line(text, DETAIL_MAX), about=about)
            for text, about in explained
        ]
    detail = "; ".join(text for text, _ in explained) if explained else commands_detail(commands)
    return items + [Item(operation, "change", one_line(detail, DETAIL_MAX))]


def attribute(hosts: list[HostResult]) -> None:
    """Move each item that is about another checked host to that host, saying which host's
    operation would make the change (`via`)."""
    by_name = {h.name: h for h in hosts}
    for h in hosts:
        kept = []
        for item in h.items:
            target = by_name.get(item.about or "")
            if target is None or target is h or target.status != "checked":
                kept.append(item)
                continue
            item.via = h.name
            target.items.append(item)
        h.items = kept


# --- Summary and renderings -------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(report: Report) -> str:
    """The last line of every run: what a scheduler's log shows."""
    if report.failure:
        return f"check failed: {report.failure}"
    if not report.hosts:
        return "check failed: the inventory names no host"
    failed = report.failed_hosts
    drift = (
        f"drift: {_plural(len(report.drifted_hosts), 'host')}, "
        f"{_plural(report.drift_count, 'item')}"
    )
    if failed:
        names = ", ".join(f"{h.name} ({h.status})" for h in failed)
        checked = len(report.hosts) - len(failed)
        tail = drift if report.drift_count else "no drift"
        return f"check failed: {names}; {tail} on the {_plural(checked, 'other host')}"
    if report.drift_count:
        return drift
    return f"no drift on {_plural(len(report.hosts), 'host')}"


def _item_json(item: Item) -> dict[str, Any]:
    data = asdict(item)
    data.pop("about", None)
    return data


def to_json(report: Report) -> dict[str, Any]:
    return {
        "inventory": report.inventory,
        "started": report.started,
        "duration_s": report.duration_s,
        "exit_code": report.exit_code,
        "summary": report.summary,
        "failure": report.failure,
        "totals": {
            "hosts": len(report.hosts),
            "hosts_with_drift": len(report.drifted_hosts),
            "drift_items": report.drift_count,
            "hosts_failed": len(report.failed_hosts),
            "conditional": sum(len(h.conditional) for h in report.hosts),
        },
        "hosts": [
            {
                "name": h.name,
                "status": h.status,
                "error": h.error,
                "drift": [_item_json(i) for i in h.drift],
                "conditional": [_item_json(i) for i in h.conditional],
            }
            for h in report.hosts
        ],
    }


def json_text(report: Report) -> str:
    return json.dumps(to_json(report), indent=2) + "\n"


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]


def text_report(report: Report) -> str:
    """The table on stdout: one row per item that counts (conditional operations are in the JSON
    only), and a row per host that could not be checked. The summary line is printed last,
    separately."""
    rows = []
    for h in report.hosts:
        if h.status != "checked":
            rows.append((h.name, f"({h.status})", h.error or ""))
            continue
        for item in h.drift:
            # Each part of a detail on its own line: a stack's reasons can be many.
            first, *more = f"{item.kind}: {item.detail}".split("; ")
            rows.append((h.name, _operation(item), first))
            rows += [("", "", f"  {part}") for part in more]
    if not rows:
        return ""
    return "\n".join(_table(rows, ("HOST", "OPERATION", "WHAT WOULD CHANGE"))) + "\n"


def _operation(item: Item) -> str:
    return f"{item.operation} (from {item.via})" if item.via else item.operation


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_report(report: Report) -> str:
    """A report for a ticket or a chat message: the summary as its title line, a table of
    items per host, the hosts that could not be checked, and what was not counted."""
    icon = {EXIT_NO_DRIFT: "OK", EXIT_DRIFT: "DRIFT", EXIT_CHECK_FAILED: "CHECK FAILED"}
    lines = [
        f"## Drift check: {icon[report.exit_code]}",
        "",
        f"**{_md(report.summary)}**",
        "",
        f"Inventory `{report.inventory}`"
        + (f", started {report.started}" if report.started else "")
        + (f", {report.duration_s:.0f} s" if report.duration_s is not None else "")
        + f", exit code {report.exit_code}.",
    ]
    if report.failed_hosts:
        lines += ["", "### Hosts not checked", ""]
        lines += [f"- **{h.name}** ({h.status}): {_md(h.error or '')}" for h in report.failed_hosts]
    for h in report.drifted_hosts:
        lines += ["", f"### {h.name}", "", "| Operation | Kind | What would change |",
                  "|---|---|---|"]
        lines += [f"| {_md(_operation(i))} | {i.kind} | {_md(i.detail)} |" for i in h.drift]
    clean = [h.name for h in report.hosts if h.status == "checked" and not h.drift]
    if clean:
        lines += ["", f"No drift: {', '.join(clean)}."]
    conditional = sum(len(h.conditional) for h in report.hosts)
    if conditional:
        lines += ["", f"Not counted: {_plural(conditional, 'operation')} that run only after an "
                  "earlier operation changes something (restarts, checks), listed in the JSON."]
    return "\n".join(lines) + "\n"
