"""The weights relay (operations/weights_relay.py) as hosts run it: real processes on loopback,
header and bytes on stdin, events on stdout. A chain of three, a relay killed mid-stream (the host
after it resumes from the one before, from the byte it had reached), a wrong token, a seed that
does not hold the wanted revision, and a late joiner catching up from disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from operations import weights_relay

RELAY = str(Path(weights_relay.__file__))
TOKEN = "ab" * 32
SUMS = "0" * 64 + "  a.bin\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_files(root: Path) -> list[dict]:
    sizes = {"a.bin": 3 * 1024 * 1024 + 17, "empty.txt": 0, "sub/b.bin": 1024 * 1024, "c.json": 900}
    files = []
    for index, (path, size) in enumerate(sizes.items()):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(bytes((index * 31 + i) % 251 for i in range(size)))
        files.append({"path": path, "size": size})
    return files


class Proc:
    def __init__(self, header: dict):
        self.proc = subprocess.Popen([sys.executable, RELAY], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.proc.stdin.write(json.dumps(header).encode() + b"\n")
        self.proc.stdin.flush()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())

    def wait_line(self, prefix: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix) or line.startswith("FAILED"):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no {prefix} line: {self.lines}")

    def source(self, upstreams):
        self.source_line({"upstreams": upstreams})

    def source_line(self, line: dict):
        self.proc.stdin.write(json.dumps(line).encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(30)


def header(mode, directory, port, files, **extra):
    return {"mode": mode, "dir": str(directory), "token": TOKEN, "files": files,
            "listen": ["127.0.0.1", port], "allowed": ["127.0.0.1"], "sums": SUMS,
            "stall_s": 2, "give_up_s": 10, **extra}


def feed(proc: Proc, source: Path, files: list[dict], pause: float = 0.0):
    try:
        for entry in files:
            data = (source / entry["path"]).read_bytes()
            for start in range(0, len(data), 256 * 1024):
                proc.proc.stdin.write(data[start:start + 256 * 1024])
                proc.proc.stdin.flush()
                time.sleep(pause)
    except BrokenPipeError:
        pass  # the relay was killed: what the test is about


def same_tree(a: Path, b: Path, files: list[dict]) -> bool:
    return all((a / f["path"]).read_bytes() == (b / f["path"]).read_bytes() for f in files)


def chain_of_three(tmp_path):
    """Three relays on loopback, each listening, told its sources as the control machine tells
    them: the head reads stdin, the others the hosts before them, the last one first.
    Returns (cache directory, files, host directories, relays, what each printed on listening)."""
    source = tmp_path / "cache"
    files = make_files(source)
    ports = [free_port() for _ in range(3)]
    dirs = [tmp_path / f"h{i}" for i in range(3)]
    relays = [Proc(header("receive", d, p, files)) for d, p in zip(dirs, ports)]
    listening = [relay.wait_line("LISTENING") for relay in relays]
    for index, relay in enumerate(relays):
        relay.source([["127.0.0.1", port] for port in reversed(ports[:index])])
    return source, files, dirs, relays, listening


def test_a_chain_of_three_ends_with_identical_files(tmp_path):
    source, files, dirs, relays, listening = chain_of_three(tmp_path)
    for relay, line in zip(relays, listening):
        assert line.startswith("LISTENING 127.0.0.1:")
        # the token came on stdin: nothing in the process list shows it
        assert TOKEN not in Path(f"/proc/{relay.proc.pid}/cmdline").read_text()
    feed(relays[0], source, files)
    total = sum(f["size"] for f in files)
    for relay in relays:
        assert relay.wait_line("RECEIVED").split()[:2] == ["RECEIVED", str(total)]
    assert [r.stop() for r in relays] == [0, 0, 0]
    for d in dirs:
        assert same_tree(source, d, files)
        assert (d / "empty.txt").exists()
    served = [int(r.wait_line("SERVED").split()[1]) for r in relays]
    assert served == [total, total, 0]  # each host sent the stream once, to the next


def test_a_relay_killed_mid_stream_its_downstream_resumes_from_the_head(tmp_path):
    source, files, dirs, relays, listening = chain_of_three(tmp_path)
    middle = listening[1].split()[1]  # "127.0.0.1:<port>" of the relay about to be killed
    feeder = threading.Thread(target=feed, args=(relays[0], source, files, 0.05))
    feeder.start()
    time.sleep(0.4)
    relays[1].proc.kill()  # the middle host dies while the stream flows
    feeder.join()
    total = sum(f["size"] for f in files)
    assert relays[2].wait_line("RECEIVED").split()[1] == str(total)
    assert any(line.startswith(f"UPSTREAM {middle} ") for line in relays[2].lines)
    assert relays[0].stop() == 0 and relays[2].stop() == 0
    assert same_tree(source, dirs[2], files)


def test_a_wrong_token_gets_nothing(tmp_path):
    source = tmp_path / "cache"
    files = make_files(source)
    (source / ".gpufleet-sha256sums").write_text(SUMS)
    port = free_port()
    seed = Proc(header("seed", source, port, files))
    assert seed.wait_line("LISTENING").startswith("LISTENING")
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(f"{weights_relay.PROTOCOL} {'cd' * 32} 0\n".encode())
        assert conn.makefile("rb").read() == b"NO token\n"
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(f"{weights_relay.PROTOCOL} {TOKEN} 5\n".encode())
        reader = conn.makefile("rb")
        assert reader.readline() == f"OK {sum(f['size'] for f in files)}\n".encode()
        assert reader.read(10) == (source / "a.bin").read_bytes()[5:15]
    seed.stop()


@pytest.mark.parametrize("sums, damage, reason", [
    ("other", None, "differs from the wanted revision"),
    (SUMS, "c.json", "c.json has 10 bytes, not 900"),
    (None, None, "no .gpufleet-sha256sums"),
])
def test_a_seed_that_does_not_hold_the_revision_refuses(tmp_path, sums, damage, reason):
    source = tmp_path / "cache"
    files = make_files(source)
    if sums is not None:
        (source / ".gpufleet-sha256sums").write_text(sums)
    if damage:
        (source / damage).write_bytes(b"x" * 10)
    seed = Proc(header("seed", source, free_port(), files))
    line = seed.wait_line("LISTENING")
    assert line.startswith("FAILED") and reason in line
    assert seed.proc.wait(10) == 3


def test_a_late_joiner_catches_up_from_disk_and_hard_links_are_not_written_through(tmp_path):
    source = tmp_path / "cache"
    files = make_files(source)
    (source / ".gpufleet-sha256sums").write_text(SUMS)
    port = free_port()
    seed = Proc(header("seed", source, port, files))
    seed.wait_line("LISTENING")
    late = tmp_path / "late"
    live = tmp_path / "live"
    live.mkdir()
    late.mkdir()
    (live / "c.json").write_bytes(b"live copy")
    os.link(live / "c.json", late / "c.json")  # staging held a hard link to the live model
    relay = Proc(header("receive", late, free_port(), files))
    relay.wait_line("LISTENING")
    relay.source([["127.0.0.1", port]])
    assert relay.wait_line("RECEIVED").startswith("RECEIVED")
    assert relay.stop() == 0 and seed.stop() == 0
    assert same_tree(source, late, files)
    assert (live / "c.json").read_bytes() == b"live copy"


def feed_from(proc: Proc, source: Path, files: list[dict], offset: int):
    data = b"".join((source / f["path"]).read_bytes() for f in files)
    proc.proc.stdin.write(data[offset:])
    proc.proc.stdin.flush()


def test_when_every_host_upstream_is_gone_the_relay_asks_for_the_rest_on_stdin(tmp_path):
    source = tmp_path / "cache"
    files = make_files(source)
    ports = [free_port() for _ in range(2)]
    dirs = [tmp_path / f"h{i}" for i in range(2)]
    head = Proc(header("receive", dirs[0], ports[0], files))
    tail = Proc(header("receive", dirs[1], ports[1], files, give_up_s=3))
    head.wait_line("LISTENING"), tail.wait_line("LISTENING")
    head.source([])
    tail.source([["127.0.0.1", ports[0]]])
    feeder = threading.Thread(target=feed, args=(head, source, files[:1], 0.05))
    feeder.start()
    time.sleep(0.3)
    head.proc.kill()  # the head dies with part of the first file sent on
    feeder.join()
    starved = tail.wait_line("STARVED", timeout=20).split()
    assert starved[0] == "STARVED" and 0 < int(starved[1]) < sum(f["size"] for f in files)
    tail.source([])  # the control machine: "from stdin", then the rest from that byte
    feed_from(tail, source, files, int(starved[1]))
    assert tail.wait_line("RECEIVED").startswith("RECEIVED")
    assert tail.stop() == 0
    assert same_tree(source, dirs[1], files)


def test_a_seeder_downloads_from_the_hub_itself_resuming_a_cut_file_and_serves_the_chain(tmp_path):
    """weights_source "seeder": the head's bytes come from the Hub (here the lab's stand-in, with
    its token and a connection dropped mid-file), the next host's from the head."""
    from scripts.lab.hub import server, synthetic

    repo, revision = synthetic.write_synthetic(tmp_path / "hub", 3, 3)
    hub = server.serve_in_thread(tmp_path / "hub", token="hub-secret")
    try:
        files_dir = tmp_path / "hub" / repo / revision
        files = [{"path": p.name, "size": p.stat().st_size} for p in sorted(files_dir.iterdir())
                 if p.suffix == ".safetensors"]
        request = urllib.request.Request(hub.base_url + "/_lab/faults", method="POST",
                                         data=json.dumps({"mode": "drop", "file": files[1]["path"],
                                                          "times": 1}).encode())
        urllib.request.urlopen(request, timeout=10).read()
        ports = [free_port(), free_port()]
        head = Proc(header("receive", tmp_path / "h0", ports[0], files))
        tail = Proc(header("receive", tmp_path / "h1", ports[1], files))
        head.wait_line("LISTENING"), tail.wait_line("LISTENING")
        head.source_line({"upstreams": [], "hub": {"base": f"{hub.base_url}/{repo}/resolve/{revision}/",
                                                   "token": "hub-secret"}})
        tail.source([["127.0.0.1", ports[0]]])
        assert head.wait_line("RECEIVED").startswith("RECEIVED")
        assert tail.wait_line("RECEIVED").startswith("RECEIVED")
        assert any(line.startswith(f"HUB {files[1]['path']} lost at byte") for line in head.lines)
        assert head.stop() == 0 and tail.stop() == 0
        for directory in ("h0", "h1"):
            assert same_tree(files_dir, tmp_path / directory, files)
        assert not any("hub-secret" in line for line in head.lines + tail.lines)
    finally:
        hub.shutdown()
        hub.server_close()
