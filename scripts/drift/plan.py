"""Plan the whole deploy against an inventory, in this process, and never execute it: what
`pyinfra INVENTORY deploy.py --dry` does, read from pyinfra's own state rather than its printed
table (which cannot tell what would change, and exits 0 whatever it finds).

The steps are pyinfra 3.10's CLI (pyinfra_cli.cli._main) up to its change detection: load the
inventory (our validation runs there), connect to every host, load deploy.py once per host with
change detection on (every operation body runs to its first command, against facts read now),
and stop. Two differences, both for a nightly job:
- a host whose planning raises (a fact that cannot be read, an SSH drop) fails alone, with the
  reason, and the other hosts are still checked (the CLI aborts the whole run);
- each operation that would change something is planned to its end, so the report can say what
  it would do (pyinfra stops at the first command).

Nothing here runs an operation's commands: State.is_executing stays False, so no command is sent
to a host and no `_if` callback is asked; only facts (read-only commands) are.
"""

from __future__ import annotations

import os

# pyinfra's CLI patches the standard library for gevent as its very first import; planning the
# hosts concurrently over paramiko needs the same, before anything imports ssl or socket users.
import pyinfra_cli  # noqa: F401  (import for its side effect)

import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gevent
import pyinfra
from pyinfra import logger
from pyinfra.api import Config, State
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_config, ctx_host, ctx_inventory, ctx_state
from pyinfra_cli.exceptions import CliError
from pyinfra_cli.inventory import make_inventory
from pyinfra_cli.util import exec_file

from operations.config import ConfigError
from scripts.drift.report import HostResult, Item, Report, attribute, classify, one_line

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_FILE = "deploy.py"


def _cause(error: BaseException) -> str:
    """One line for an error, unwrapped from pyinfra's CLI wrappers (which keep the original in
    `.exception`)."""
    cause = getattr(error, "exception", None) or error.__cause__ or error
    return one_line(f"{type(cause).__name__}: {cause}", 300)


class CheckFailed(Exception):
    """The check cannot start (bad configuration, no inventory): one line, no traceback."""


class _HostErrors(logging.Handler):
    """Keeps the last error pyinfra logged for each host ("[node-3] Could not connect ...",
    "could not load fact ..."), to say why a host could not be checked."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.last: dict[str, str] = {}

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("[") and "] " in message:
            name, _, text = message[1:].partition("] ")
            self.last[name] = one_line(text.strip(), 300)


def _setup_logging(verbose: bool) -> _HostErrors:
    """pyinfra's log goes to stderr (warnings and errors only, unless verbose): stdout is the
    report's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    errors = _HostErrors()
    logger.handlers[:] = [handler, errors]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return errors


class _Tee:
    """stderr that also keeps what was written: our inventory validation prints its problems
    there (one line each) before it stops, and the summary repeats the first."""

    def __init__(self, stream):
        self.stream = stream
        self.text = ""

    def write(self, text):
        self.text += text
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def config_failure(stderr_text: str) -> str:
    """The summary of a refused configuration, from the lines the validation printed."""
    prefix = "configuration error: "
    problems = [line[len(prefix):] for line in stderr_text.splitlines() if line.startswith(prefix)]
    if not problems:
        return "bad configuration (see the lines above)"
    if len(problems) == 1:
        return f"bad configuration: {problems[0]}"
    return f"bad configuration: {len(problems)} problems (above), the first: {problems[0]}"


def _load_inventory(inventory_path: str, state: State, data_items: list[str],
                    override_data: dict[str, Any]):
    """pyinfra's inventory loading; our validation runs inside it and stops with SystemExit
    after printing its one-line problems (`configuration error: ...`) on stderr."""
    from operations.inventory_data import overriding

    tee = _Tee(sys.stderr)
    sys.stderr = tee
    try:
        # The inventory validates itself with the --data items too, before anything connects.
        with overriding(data_items):
            return make_inventory(inventory_path, cwd=state.cwd, override_data=override_data)
    except SystemExit as stop:
        if isinstance(stop.code, str):  # e.g. inventories/lab.py: "lab gpulab is not up ..."
            raise CheckFailed(stop.code) from None
        raise CheckFailed(config_failure(tee.text)) from None
    except CliError as error:
        raise CheckFailed(one_line(str(error), 300)) from None
    except Exception as error:  # an error in the inventory file's own code
        raise CheckFailed(f"cannot load {inventory_path}: {_cause(error)}") from None
    finally:
        sys.stderr = tee.stream


def _plan_host(state: State, host, deploy_file: str) -> str | None:
    """Load the deploy for one host; the reason it could not be planned, or None."""
    try:
        with ctx_config.use(state.config.copy()), ctx_host.use(host):
            exec_file(deploy_file)
    except SystemExit:  # settings_for refused the host's data (lines already printed)
        return "bad configuration (see the lines above)"
    except ConfigError as refused:  # a rule that needed the hosts' facts (operations/fleet_fit.py)
        for line in refused.lines:
            print(f"configuration error: {line}", file=sys.stderr)
        return config_failure("\n".join(f"configuration error: {line}" for line in refused.lines))
    except (KeyboardInterrupt, gevent.GreenletExit):
        raise
    except BaseException as error:  # anything: the other hosts must still be checked
        return f"planning failed: {_cause(error)}"
    return None


def _plan_all(state: State, deploy_file: str) -> dict[str, str]:
    """Plan every active host concurrently, as pyinfra does; {host name: why it failed}."""
    state.current_deploy_filename = deploy_file
    state.current_op_file_number = 0
    hosts = list(state.inventory.get_active_hosts())
    greenlets = {state.pool.spawn(_plan_host, state, host, deploy_file): host for host in hosts}
    gevent.joinall(list(greenlets))
    return {greenlets[g].name: g.value for g in greenlets if g.value}


def _notes_by_op(state: State) -> dict[tuple[str, str | None], dict[str, list]]:
    """{(host, operation hash): {EXPLAIN: [(text, about)], FINDING: [text]}}."""
    from operations.phase import EXPLAIN, notes_of

    notes: dict[tuple[str, str | None], dict[str, list]] = {}
    for host_name, op_hash, kind, text, about in notes_of(state):
        said = notes.setdefault((host_name, op_hash), {}).setdefault(kind, [])
        said.append((text, about) if kind == EXPLAIN else text)
    return notes


def _full_commands(state: State, host, op_data) -> list[Any]:
    """Every command the operation would issue, planned now (not executed)."""
    with ctx_state.use(state), ctx_host.use(host):
        return list(op_data.command_generator())


def _host_items(state: State, host) -> list[Item]:
    from operations.phase import EXPLAIN, FINDING

    planned = []
    host_ops = state.ops.get(host, {})
    for op_hash in host.op_hash_order:
        op_data = host_ops.get(op_hash)
        if op_data is None:
            continue
        conditional = bool(op_data.global_arguments.get("_if"))
        commands: list[Any] = []
        if op_data.operation_meta._maybe_is_change:
            # A conditional operation is not planned further: it is never counted, and its
            # body would read its facts a second time for nothing.
            commands = ["(conditional)"] if conditional else _full_commands(state, host, op_data)
        planned.append((op_hash, conditional, commands))

    notes = _notes_by_op(state)  # read after planning to the end: explanations come with it
    items: list[Item] = []
    for op_hash, conditional, commands in planned:
        said = notes.get((host.name, op_hash), {})
        items += classify(
            " / ".join(sorted(state.op_meta[op_hash].names)),
            conditional=conditional,
            commands=commands,
            explained=said.get(EXPLAIN, []),
            findings=said.get(FINDING, []),
        )
    return items


def _host_result(state: State, host, planning_errors: dict[str, str], log: _HostErrors):
    if host not in state.activated_hosts:
        return HostResult(host.name, "unreachable", log.last.get(host.name, "could not connect"))
    if host.name in planning_errors or host in state.failed_hosts:
        why = planning_errors.get(host.name) or log.last.get(host.name) or "planning failed"
        if log.last.get(host.name) and log.last[host.name] not in why:
            why = f"{why} ({log.last[host.name]})"
        return HostResult(host.name, "error", why)
    try:
        return HostResult(host.name, items=_host_items(state, host))
    except Exception as error:
        return HostResult(host.name, "error", f"planning failed: {_cause(error)}")


def override_data(pairs: list[str]) -> dict[str, Any]:
    """`--data key=value` as pyinfra's CLI reads it (operations.inventory_data.parse_data, the
    parsing every entry point shares); a pair without `=` is refused."""
    from operations.inventory_data import parse_data

    data, problems = parse_data(pairs)
    if problems:
        raise CheckFailed(problems[0])
    return data


def _results(state: State, planning_errors: dict[str, str], log: _HostErrors) -> list[HostResult]:
    """Every inventory host's result, in inventory order. Hosts are finished concurrently: an
    operation that would change something is planned to its end, which reads its facts again."""
    limit = state.limit_hosts  # --limit: hosts outside it are not checked (nor reported)
    hosts = [h for h in state.inventory if limit is None or h in limit]
    greenlets = [state.pool.spawn(_host_result, state, h, planning_errors, log) for h in hosts]
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets]


def _limit(inventory, patterns: list[str] | None):
    """The hosts of `--limit` (names, groups or globs, comma-separated), matched as pyinfra's
    own --limit does; None: every host. Hosts outside are neither checked nor changed, but a
    host in the limit still reads facts from them (a manager's view of the Swarm)."""
    if not patterns:
        return None
    from pyinfra_cli.cli import _apply_inventory_limit

    names = [name for pattern in patterns for name in pattern.split(",") if name]
    hosts = _apply_inventory_limit(inventory, names)
    if not hosts:
        raise CheckFailed(f"--limit {','.join(names)} matches no host of the inventory")
    return hosts


def check(
    inventory_path: str,
    deploy_file: str = DEPLOY_FILE,
    verbose: bool = False,
    data: list[str] | None = None,
    limit: list[str] | None = None,
) -> Report:
    """Plan the deploy for every host of the inventory and report what would change. `data`:
    `key=value` overrides for every host, as pyinfra's `--data` (checked with the host's other
    keys when its deploy is planned)."""
    started = time.monotonic()
    report = Report(
        inventory=inventory_path,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    log = _setup_logging(verbose)
    inventory_path = str(Path(inventory_path).resolve())
    os.environ.setdefault("PYINFRA_PROGRESS", "off")
    # As the CLI: operation order from the deploy file's call stack, relative paths and
    # group_data/ from the repository root.
    pyinfra.is_cli = True
    os.chdir(REPO_ROOT)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))

    state = State(check_for_changes=True)
    state.cwd = str(REPO_ROOT)
    ctx_state.set(state)
    config = Config()
    ctx_config.set(config)
    config.lock_current_state()
    try:
        try:
            if not Path(inventory_path).is_file():
                raise CheckFailed(f"no inventory file {report.inventory}")
            inventory = _load_inventory(inventory_path, state, data or [],
                                        override_data(data or []))
            ctx_inventory.set(inventory)
            state.init(inventory, config, initial_limit=_limit(inventory, limit))
            state.set_stage(StateStage.Connect)
            try:
                connect_all(state)
            except PyinfraError:  # "No hosts remaining!": every host is reported unreachable
                pass
            planning_errors: dict[str, str] = {}
            if state.active_hosts:
                state.set_stage(StateStage.Prepare)
                planning_errors = _plan_all(state, str(REPO_ROOT / deploy_file))
            report.hosts = _results(state, planning_errors, log)
            attribute(report.hosts)
        except CheckFailed as error:
            report.failure = str(error)
    finally:
        if state.initialised:
            try:
                disconnect_all(state)
            except Exception:  # a connection that broke meanwhile: nothing left to close
                pass
        report.duration_s = round(time.monotonic() - started, 1)
    return report
