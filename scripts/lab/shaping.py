"""Links like a datacenter's, for the lab (LAB STAND-IN for real NICs and an uplink): the kernel's
traffic control (a tbf qdisc, ../shared/LAB-NOTES.md) caps what each lab host receives and what
this machine (the control machine) sends into the lab network, so that bandwidth, not the two
shared cores, bounds a transfer.

    python3 scripts/lab.py shape --host-mbit 200 --uplink-mbit 200   # every host, and the uplink
    python3 scripts/lab.py shape --off                                 # back to unshaped

- A host's link: a tbf on the outer side of its veth (what the host receives, from the control
  machine or from another host). Every transfer to a host crosses it.
- The control machine's uplink: a tbf on the lab bridge itself, which carries only what this
  machine sends into the lab network (traffic between two lab hosts does not cross the bridge
  device's own qdisc).

Rates must stay well below what the cores can encrypt (OpenSSH moved about 200 MB/s here), or
the CPU, not the link, is what gets measured: a few hundred Mbit/s at most.
"""

from __future__ import annotations

import re
import subprocess

MAX_MBIT = 2000


class ShapeError(Exception):
    pass


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ShapeError(f"{' '.join(argv)}: {(result.stderr or result.stdout).strip()}")
    return result


def tbf_args(mbit: int) -> list[str]:
    """A tbf for `mbit`: a burst of at least one timer tick's worth of bytes at that rate (the
    kernel refuses less), a queue of at most 50 ms (a switch port's, not a bufferbloated one)."""
    if not 1 <= mbit <= MAX_MBIT:
        raise ShapeError(f"rate {mbit} Mbit/s: expected 1 to {MAX_MBIT}")
    burst = max(32 * 1024, mbit * 1_000_000 // 8 // 100)
    return ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms"]


def parse_ifindex_names(ip_link_output: str) -> dict[int, str]:
    """`ip -o link` lines ("17: veth1a2b@if16: <...") -> {17: "veth1a2b"}."""
    names = {}
    for line in ip_link_output.splitlines():
        match = re.match(r"^(\d+):\s+([^:@\s]+)", line)
        if match:
            names[int(match.group(1))] = match.group(2)
    return names


def host_link(container: str) -> str:
    """The outer end of a lab host's veth (what the host receives leaves through it)."""
    peer = _run("docker", "exec", container, "cat", "/sys/class/net/eth0/iflink").stdout.strip()
    names = parse_ifindex_names(_run("ip", "-o", "link").stdout)
    if not peer.isdigit() or int(peer) not in names:
        raise ShapeError(f"{container}: no outer veth for eth0 (iflink {peer!r})")
    return names[int(peer)]


def bridge_device(network: str) -> str:
    network_id = _run("docker", "network", "inspect", "-f", "{{.Id}}", network).stdout.strip()
    return f"br-{network_id[:12]}"


def shape(device: str, mbit: int | None) -> str:
    """Cap what leaves `device` at `mbit` (None: remove the cap). Returns what it did."""
    if mbit is None:
        _run("tc", "qdisc", "del", "dev", device, "root", check=False)
        return f"{device}: unshaped"
    _run("tc", "qdisc", "replace", "dev", device, "root", *tbf_args(mbit))
    return f"{device}: {mbit} Mbit/s"


def current(device: str) -> str:
    """The device's root qdisc as tc shows it ("tbf ... rate 200Mbit ..." or "noqueue ...")."""
    return _run("tc", "qdisc", "show", "dev", device, check=False).stdout.strip()


def shape_lab(containers: list[str], network: str, host_mbit: int | None,
              uplink_mbit: int | None) -> list[str]:
    done = [shape(host_link(c), host_mbit) + f" (into {c})" for c in containers]
    done.append(shape(bridge_device(network), uplink_mbit) + " (the control machine's uplink)")
    return done
