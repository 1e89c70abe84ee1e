"""Where a host's data comes from, merged the way pyinfra merges it: group_data/all.py, the
inventory file's own group, the host's other groups, the host's data in the inventory, then
`--data KEY=VALUE` over all of them. Each key of each host remembers its source, so a refusal
can say where to fix it ("--data", "group_data/all.py", "inventory host data").

`--data` reaches the inventory's own validation (operations.config.validate_inventory) before
pyinfra connects: under pyinfra's CLI it is read from the running command line; a script that
executes an inventory itself names its overrides with `overriding(data)`.

    with overriding({"nvidia_allow_reboot": True}):
        runpy.run_path("inventories/prod.py")      # validates with the override applied
"""

from __future__ import annotations

import ast
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
GROUP_DATA_DIR = REPO_ROOT / "group_data"

DATA_FLAG = "--data"
HOST_DATA = "inventory host data"


@dataclass
class HostData:
    """One inventory host's merged data, the source of each key, and its groups."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)

    def set(self, values: dict[str, Any], source: str) -> None:
        for key, value in values.items():
            self.data[key] = value
            self.sources[key] = source


# --- group_data/ ------------------------------------------------------------------------------


def _imported_names(path: Path) -> set[str]:
    """Names bound by import statements: modules are not data (pyinfra drops them too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def load_group_data(directory: Path = GROUP_DATA_DIR) -> dict[str, dict[str, Any]]:
    """Read group_data/<group>.py the way pyinfra does: a file's top-level names, less the names
    its imports introduce and dunders. (pyinfra's own loader needs a running CLI state.)"""
    groups = {}
    for path in sorted(directory.glob("*.py")):
        names: dict[str, Any] = {"__file__": str(path)}
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), names)
        imported = _imported_names(path)
        groups[path.stem] = {
            key: value
            for key, value in names.items()
            if key not in imported and not key.startswith("__")
        }
    return groups


def group_data_dirs(inventory_file: str) -> list[Path]:
    """Where pyinfra looks for group data, in its order: group_data/ in the working directory,
    then beside the inventory's directory."""
    dirs = [Path.cwd() / "group_data"]
    beside_inventory = Path(inventory_file).resolve().parent / "group_data"
    if beside_inventory != dirs[0]:
        dirs.append(beside_inventory)
    return [directory for directory in dirs if directory.is_dir()]


def all_group_data(inventory_file: str) -> dict[str, dict[str, Any]]:
    """Every group's data for an inventory, the later directory's keys winning."""
    merged: dict[str, dict[str, Any]] = {}
    for directory in group_data_dirs(inventory_file):
        for group, data in load_group_data(directory).items():
            merged.setdefault(group, {}).update(data)
    return merged


# --- The inventory file -----------------------------------------------------------------------


def split_host(entry: Any) -> tuple[str, dict[str, Any]]:
    """An inventory entry: "name" or ("name", {data})."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
        return str(entry[0]), entry[1]
    return str(entry), {}


def inventory_groups(inventory_globals: dict[str, Any]) -> dict[str, list[str]]:
    """Group name -> host names, as the inventory file lists them (pyinfra's rule: every
    top-level list or tuple not starting with '_')."""
    return {
        name: [split_host(entry)[0] for entry in value]
        for name, value in inventory_globals.items()
        if not name.startswith("_") and isinstance(value, (list, tuple))
    }


def merged_hosts(inventory_globals: dict[str, Any], group_data: dict[str, dict[str, Any]],
                 overrides: dict[str, Any] | None = None) -> dict[str, HostData]:
    """Every host's data, inventory order: all < the inventory file's own group < other
    groups (in file order) < host data < --data overrides."""
    file_group = Path(inventory_globals["__file__"]).stem
    own: dict[str, dict[str, Any]] = {}
    memberships: dict[str, list[str]] = {}
    for group in inventory_groups(inventory_globals):
        for entry in inventory_globals[group]:
            name, data = split_host(entry)
            own.setdefault(name, {}).update(data)
            memberships.setdefault(name, []).append(group)

    hosts = {}
    for name, host_data in own.items():
        merged = HostData(name, groups=memberships[name])
        for group in ["all", file_group, *memberships[name]]:
            merged.set(group_data.get(group, {}), f"group_data/{group}.py")
        merged.set(host_data, HOST_DATA)
        merged.set(overrides or {}, DATA_FLAG)
        hosts[name] = merged
    return hosts


# --- --data KEY=VALUE -------------------------------------------------------------------------


def parse_cli_value(text: str) -> Any:
    """A --data value as pyinfra's CLI reads it (pyinfra_cli.util.parse_cli_arg, which is not
    imported: importing pyinfra_cli monkey-patches the process for gevent): true/false, a whole
    number, JSON, else the plain string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_data(items: list[str] | tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """(overrides, problems) of `--data KEY=VALUE` items; a later KEY wins, as in pyinfra."""
    data: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"--data {item!r}: expected KEY=VALUE, e.g. --data nvidia_allow_reboot=true")
            continue
        repeated = repeated_json_keys(text)
        if repeated:
            problems.append(f"--data {key}: key(s) {', '.join(repeated)} given more than once in "
                            "one JSON object: expected each once (JSON keeps only the last, "
                            "silently)")
            continue
        data[key] = parse_cli_value(text)
    return data, problems


def repeated_json_keys(text: str) -> list[str]:
    """Keys that appear twice in one object of a JSON value (`{"alice": "/a", "alice": "/b"}`:
    two clients of one name), which json.loads would merge without a word."""
    repeated: list[str] = []

    def pairs(items):
        names = [name for name, _ in items]
        repeated.extend(sorted({repr(n) for n in names if names.count(n) > 1}))
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=pairs)
    except ValueError:
        return []
    return repeated


_OVERRIDES: ContextVar[list[str] | None] = ContextVar("gpufleet_overrides", default=None)


@contextmanager
def overriding(items: list[str] | tuple[str, ...]) -> Iterator[None]:
    """Inventories executed inside see `--data` items `items` (a script's own command line)."""
    token = _OVERRIDES.set(list(items))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def current_data_items() -> list[str]:
    """The `--data` items in force: a script's (overriding), else those of the pyinfra command
    line running now, read from its click context (pyinfra applies them over every host's data
    after the inventory file has run), else none."""
    items = _OVERRIDES.get()
    if items is not None:
        return items
    try:
        import click
    except ImportError:  # pragma: no cover - click comes with pyinfra
        return []
    context = click.get_current_context(silent=True)
    if context is None:
        return []
    return list(context.params.get("data") or ())
