"""An inventory loaded the way the deploy loads it, and its hosts reached with pyinfra's API, for
scripts that run outside a deploy (smoke.py, loadtest.py).

pyinfra's CLI package is not imported: it monkey-patches the whole process for gevent at import,
and the load test runs asyncio. The inventory file is executed as pyinfra would (it validates
itself: a bad configuration exits 2 with one line per problem), its data merged with group_data
by operations.inventory_data, and `--data KEY=VALUE` overrides applied on top, as pyinfra's
`--data` (and checked with the inventory, before anything connects).

    fleet = load_fleet("inventories/lab.py", ["smoke_deadline_s=30"])
    settings = fleet.settings()                 # the first manager's typed settings
    manager, stack = fleet.read_from_manager(SmokeStack, stack_name=settings.stack_name)
"""

from __future__ import annotations

import os
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from operations import config, inventory_data  # noqa: E402


def reexec_in_venv() -> None:
    """`python scripts/x.py` with a Python that lacks the pinned dependencies: run again with
    the repository's .venv, if there is one."""
    try:
        import httpx  # noqa: F401
        import pyinfra  # noqa: F401
    except ImportError as error:
        venv = REPO / ".venv" / "bin" / "python"
        # Told apart by sys.prefix: a venv's python is a symlink to this very binary, so the
        # resolved executables are the same file.
        if venv.exists() and Path(sys.prefix).resolve() != venv.parents[1].resolve():
            os.execv(str(venv), [str(venv), *sys.argv])
        print(f"{Path(sys.argv[0]).name}: {error.name} is not installed: run "
              "`python3 scripts/lab.py bootstrap` (it makes .venv)", file=sys.stderr)
        sys.exit(1)


@dataclass
class Fleet:
    inventory_file: str
    hosts: dict[str, dict[str, Any]]  # name -> merged data, inventory order
    groups: dict[str, list[str]]
    _state: Any = field(default=None, repr=False)

    @property
    def managers(self) -> list[str]:
        return self.groups.get("swarm_managers") or list(self.hosts)[:1]

    def settings(self, name: str | None = None) -> config.Settings:
        """Typed settings of one host (default: the first manager); ConfigError if refused."""
        name = name or self.managers[0]
        return config.validate_host_data(name, self.hosts[name])

    def pyinfra_host(self, name: str):
        """The pyinfra Host of one inventory host, connected (raises on failure)."""
        if self._state is None:
            from pyinfra.api import Config, Inventory, State

            names = [(n, data) for n, data in self.hosts.items()]
            groups = {g: (members, {}) for g, members in self.groups.items()}
            inventory = Inventory((names, {}), **groups)
            self._state = State(inventory, Config())
        host = self._state.inventory.get_host(name)
        if not host.connected:
            host.connect(raise_exceptions=True, show_errors=False)
        return host

    def read_fact(self, name: str, fact, **kwargs):
        host = self.pyinfra_host(name)
        return host.get_fact(fact, _sudo=bool(host.data.get("_sudo")), **kwargs)

    def run(self, name: str, command: str, timeout: int = 300) -> tuple[bool, list[str], list[str]]:
        """Run one command on a host (with its sudo); (ok, stdout lines, stderr lines)."""
        from pyinfra.api import StringCommand

        host = self.pyinfra_host(name)
        ok, output = host.run_shell_command(
            StringCommand(command), print_output=False, print_input=False,
            _sudo=bool(host.data.get("_sudo")), _timeout=timeout,
        )
        return ok, output.stdout_lines, output.stderr_lines

    def read_from_manager(self, fact, **kwargs) -> tuple[str, Any]:
        """(manager, fact) from the first manager that answers with no `error`; RuntimeError
        with every manager's reason otherwise."""
        reasons = []
        for name in self.managers:
            try:
                value = self.read_fact(name, fact, **kwargs)
            except Exception as error:  # unreachable manager: try the next one
                reasons.append(f"{name}: {error}")
                continue
            if isinstance(value, dict) and value.get("error"):
                reasons.append(f"{name}: {value['error']}")
                continue
            return name, value
        raise RuntimeError("no manager answered: " + "; ".join(reasons))


def load_fleet(inventory_file: str, data: list[str] | None = None) -> Fleet:
    """Execute the inventory file with `data` (`--data KEY=VALUE` items) in force: it validates
    itself, --data included, before anything connects (operations.inventory_check; on a refused
    configuration it prints one line per problem and exits 2, as pyinfra's run does). Then the
    hosts' data merged as pyinfra merges it."""
    path = str(Path(inventory_file).resolve())
    with inventory_data.overriding(data or []):
        namespace = runpy.run_path(path, run_name="inventory")
    namespace["__file__"] = path
    overrides, problems = inventory_data.parse_data(data or [])
    if problems:  # an inventory that does not validate itself: still refused, the same way
        raise config.ConfigError(problems)
    merged = inventory_data.merged_hosts(namespace, inventory_data.all_group_data(path), overrides)
    fleet = Fleet(path, {name: host.data for name, host in merged.items()},
                  inventory_data.inventory_groups(namespace))
    for name in fleet.hosts:
        fleet.settings(name)  # ConfigError: the same lines the inventory would have printed
    return fleet


def fleet_or_refuse(inventory_file: str, data: list[str]) -> tuple[Fleet, Any]:
    """The fleet and its first host's settings, or the configuration's one-line refusals and
    exit 2 (operations.config.refuse), as a deploy would refuse them: the scripts' entry."""
    try:
        fleet = load_fleet(inventory_file, data)
        return fleet, fleet.settings()
    except config.ConfigError as error:
        config.refuse(error.lines)
        raise  # unreachable: refuse() exits
