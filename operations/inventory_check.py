"""The check every entry point runs before any host is touched: an inventory, its group data and
`--data`, each host's data against the configuration model (operations/config.py), then the
rules that need the whole inventory (keys one stack reads fleet-wide, models[].groups and
replicas against the hosts, the Swarm managers) and the secret files on the control machine.

One line per problem. A problem that is the same on every host, from a source every host
shares (--data, a group_data file), is said once, naming that source:

    configuration error: --data (every host): unknown key 'modls_dir' = '/x': did you mean 'models_dir'?
    configuration error: host gpu-03: key 'swarm_advertise_address' = '999.1.1.1': expected an IPv4 ...

    problems = check_inventory(globals())    # [] when everything is good
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from operations import gateway_access, rules
from operations.config import Settings, host_problems
from operations.inventory_data import (
    HOST_DATA, HostData, all_group_data, current_data_items, inventory_groups, merged_hosts,
    parse_data,
)

# Keys one Swarm service reads the same on every node: the stack is one file for the fleet.
FLEET_WIDE_KEYS = ("models_dir", "models", "stack_name", "stack_engine_images", "stack_gateway_image",
                   "stack_gateway_port", "stack_publish_mode", "stack_secret_uids",
                   "stack_engine_firewall", "stack_engine_allowed_sources", "monitoring_enabled",
                   "monitoring_node_exporter", "monitoring_dcgm_exporter",
                   "monitoring_node_exporter_port", "monitoring_dcgm_exporter_port",
                   "monitoring_gateway_metrics_port")

# Files on the control machine whose content becomes a Docker secret.
# (The gateway's keys and certificate: operations/gateway_access.py access_problems.)
SECRET_FILE_KEYS = ("hf_token_file", "monitoring_alert_receiver_file",
                    "monitoring_grafana_admin_password_file")


def check_inventory(inventory_globals: dict[str, Any], data_items: list[str] | None = None) -> list[str]:
    """Every problem in an inventory, its group data and the `--data` items in force
    (`data_items`, default: inventory_data.current_data_items()), one line each."""
    inventory_file = inventory_globals["__file__"]
    overrides, problems = parse_data(current_data_items() if data_items is None else data_items)
    hosts = merged_hosts(inventory_globals, all_group_data(inventory_file), overrides)
    if not hosts:
        return problems + [f"{inventory_file}: the inventory names no hosts"]

    found: list[tuple[str, str, str]] = []  # (host, key, text)
    settings: dict[str, Settings] = {}
    for name, merged in hosts.items():
        valid, host_found = host_problems(merged.data)
        found += [(name, key, text) for key, text in host_found]
        if valid is not None:
            settings[name] = valid
    found += secret_file_problems(settings)
    found += [(name, key, text) for name, valid in settings.items()
              for key, text in gateway_access.access_problems(valid)]
    problems += fold(found, hosts)
    problems += fleet_wide_problems(hosts)
    if settings:
        problems += model_placement_problems(inventory_globals, hosts, next(iter(settings.values())))
    problems += manager_problems(inventory_globals, hosts)
    return problems


def fold(found: list[tuple[str, str, str]], hosts: dict[str, HostData]) -> list[str]:
    """One line per (host, problem), except a problem every host has from the same shared
    source (not its own inventory data): then one line naming that source."""
    by_problem: dict[tuple[str, str], list[str]] = {}
    for name, key, text in found:
        by_problem.setdefault((key, text), []).append(name)
    lines = []
    for (key, text), names in by_problem.items():
        sources = {hosts[name].sources.get(key) for name in names}
        shared = len(sources) == 1 and HOST_DATA not in sources
        if len(hosts) > 1 and set(names) == set(hosts) and shared:
            source = sources.pop()
            lines.append(f"{source} (every host): {text}" if source else f"every host: {text}")
        else:
            lines += [f"host {name}: {text}" for name in names]
    return lines


def secret_file_problems(settings: dict[str, Settings]) -> list[tuple[str, str, str]]:
    """Each configured secret file, checked once per path, reported for the hosts naming it."""
    checked: dict[str, str | None] = {}
    found = []
    for name, valid in settings.items():
        for key in SECRET_FILE_KEYS:
            path = getattr(valid, key)
            if path is None:
                continue
            if path not in checked:
                checked[path] = rules.secret_file_problem(path)
            if checked[path]:
                found.append((name, key, f"key '{key}' = {path!r}: expected {checked[path]}"))
    return found


def fleet_wide_problems(hosts: dict[str, HostData]) -> list[str]:
    """A key the stack applies fleet-wide must not differ between hosts (an engine's weights
    mount, say, is one path for every node the Swarm may place it on)."""
    problems = []
    names = sorted(hosts)
    first = names[0]
    for key in FLEET_WIDE_KEYS:
        for name in names[1:]:
            if hosts[name].data.get(key) != hosts[first].data.get(key):
                problems.append(
                    f"host {name}: key '{key}' = {hosts[name].data.get(key)!r}: expected the same "
                    f"value on every host ({first} has {hosts[first].data.get(key)!r}): one stack "
                    "serves the fleet")
                break
    return problems


def model_placement_problems(inventory_globals: dict[str, Any], hosts: dict[str, HostData],
                             settings: Settings) -> list[str]:
    """models[].groups must name groups of this inventory; a served model's replicas (one per
    node) must not outnumber the hosts of its groups that stay in the Swarm. (`models` is the
    same on every host: fleet_wide_problems says so otherwise.)"""
    file_group = Path(inventory_globals["__file__"]).stem
    known = {"all", file_group, *inventory_groups(inventory_globals)}
    problems = []
    for index, spec in enumerate(settings.models):
        missing = [group for group in spec.groups if group not in known]
        if missing:
            problems.append(
                f"models[{index}].groups = {spec.groups!r}: expected groups of "
                f"{Path(inventory_globals['__file__']).name} ({', '.join(sorted(known))}); "
                f"{', '.join(missing)} is not one")
            continue
        members = [name for name, merged in hosts.items()
                   if ({"all", file_group} | set(merged.groups)) & set(spec.groups)
                   and not merged.data.get("swarm_retire")]
        if spec.serve and spec.replicas > len(members):
            problems.append(
                f"models[{index}].replicas = {spec.replicas}: expected at most one replica per "
                f"host of its groups ({', '.join(spec.groups)}: {len(members)} host(s) that stay "
                "in the Swarm)")
    return problems


def manager_problems(inventory_globals: dict[str, Any], hosts: dict[str, HostData]) -> list[str]:
    if "swarm_managers" not in inventory_globals:
        return []
    from operations.swarm import manager_group_problems  # pyinfra's API: only when needed

    groups = inventory_groups(inventory_globals)
    retiring = {name for name, merged in hosts.items() if merged.data.get("swarm_retire")}
    return [
        f"{inventory_globals['__file__']}: {problem}"
        for problem in manager_group_problems(groups.get("swarm_managers", []),
                                              groups.get("gpu_nodes", []), retiring)
    ]
