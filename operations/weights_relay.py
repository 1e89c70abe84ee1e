#!/usr/bin/env python3
"""The weights relay: the program each host runs, for the length of one transfer, to receive a
model's files and pass them on to the next host while they arrive (a pipelined chain).

It is copied to hosts by the weights phase (python3 standard library only) and started by the
control machine over SSH, as the deploy user: never as root, never as a service. Everything it
needs comes on stdin, never on a command line: one JSON line (the one-shot token of this chain,
the files in stream order with their sizes, where to listen, which peers may connect); once it
listens, a second line saying where to receive from (peers, the Hub, or stdin); then, on the
host the control machine feeds, the files' bytes. It prints one line per event on stdout, and exits when
stdin closes: the control machine closes it once every host of the chain has its bytes, or when
it dies (SSH closes the channel). Nothing listens longer.

The stream is the files' bytes concatenated in the order given, so a position in it is one
number. A receiver asks a peer for the stream from the position it has reached:
    -> GPUFLEET-RELAY/1 <token> <offset>\\n        <- OK <total>\\n, then bytes offset..total
A peer serves what it has written so far and waits for the rest, so the chain moves at the speed
of its slowest link, not the sum of its links. A receiver whose upstream breaks or stalls asks the
next peer of its list (hosts earlier in the chain) from the same position; sha256 is checked by
the deploy after the transfer, not trusted from here.

Roles (field "mode" of the header):
  receive  receive the stream into "dir" and serve it: from the "upstreams" of the second line
           (host:port, tried in order); with none, from its "hub" ({"base": URL prefix of the
           revision's files, "token": bearer token or null}), else from stdin
  seed     serve files already on disk in "dir" (a verified copy), after checking that its
           sha256sums file is the one given ("sums") and that every file has its size
Events: LISTENING <addr>:<port> | UPSTREAM <addr:port> lost at byte <n> | REFUSED <addr> |
        STARVED <n> (no upstream left: a new source line follows, then maybe bytes from n) |
        HUB <path> lost at byte <n> |
        RECEIVED <bytes> <seconds> | SERVED <bytes> <clients> | FAILED <reason>.
Exit status 0 when received (or seeding) and stopped cleanly, else 3.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

PROTOCOL = "GPUFLEET-RELAY/1"
CHUNK = 1 << 20
SUMS_NAME = ".gpufleet-sha256sums"  # operations/weights_plan.SUMS_NAME (this file runs alone)


def say(*words) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


class Stream:
    """The files of one transfer as one byte stream: positions, and how much is on disk."""

    def __init__(self, directory: str, files: list[dict], have: int = 0):
        self.directory = directory
        self.files = files
        self.starts = []
        position = 0
        for entry in files:
            self.starts.append(position)
            position += int(entry["size"])
        self.total = position
        self.have = have
        self.changed = threading.Condition()
        self.closed = False

    def locate(self, offset: int) -> tuple[int, int]:
        """(file index, offset in that file) of a stream position below total."""
        index = 0
        while index + 1 < len(self.files) and self.starts[index + 1] <= offset:
            index += 1
        return index, offset - self.starts[index]

    def path(self, index: int) -> str:
        return os.path.join(self.directory, self.files[index]["path"])

    def advance(self, count: int) -> None:
        with self.changed:
            self.have += count
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_beyond(self, offset: int, timeout: float) -> int:
        """How much is on disk, once it is more than offset (or the wait timed out)."""
        with self.changed:
            self.changed.wait_for(lambda: self.have > offset or self.closed, timeout)
            return self.have


class Writer:
    """Writes the stream into files, in order. A file is unlinked before it is created: the path
    may be a hard link to the live copy of an older revision, which must not change."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.handle = None
        self.index = -1

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            index, within = self.stream.locate(self.stream.have)
            if index != self.index:
                self._open(index)
            room = int(self.stream.files[index]["size"]) - within
            piece = view[:room]
            self.handle.write(piece)
            self.handle.flush()
            self.stream.advance(len(piece))
            view = view[len(piece):]
        self._skip_empty()

    def _skip_empty(self) -> None:
        # Empty files have no bytes in the stream: create them as the position passes them.
        for index, entry in enumerate(self.stream.files):
            if int(entry["size"]) == 0 and self.stream.starts[index] <= self.stream.have:
                if not os.path.exists(self.stream.path(index)):
                    self._create(index).close()

    def _create(self, index: int):
        path = self.stream.path(index)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return open(path, "xb")

    def _open(self, index: int) -> None:
        if self.handle:
            self.handle.close()
        within = self.stream.have - self.stream.starts[index]
        if within == 0:
            self.handle = self._create(index)
        else:  # resuming inside this file, after an upstream broke
            self.handle = open(self.stream.path(index), "r+b")
            self.handle.truncate(within)
            self.handle.seek(within)
        self.index = index

    def close(self) -> None:
        self._skip_empty()
        if self.handle:
            self.handle.close()
            self.handle = None


class Server:
    """Serves the stream to peers that present the token, from what is on disk."""

    def __init__(self, stream: Stream, token: str, allowed: set[str], listen: tuple, stall_s: float):
        self.stream = stream
        self.token = token.encode()
        self.allowed = allowed
        self.stall_s = stall_s
        self.served = 0
        self.clients = 0
        self.lock = threading.Lock()
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(16)
        self.address = self.sock.getsockname()[:2]

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            if self.allowed and peer[0] not in self.allowed:
                say("REFUSED", peer[0])
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.stall_s)
        try:
            offset = self._greet(conn)
            if offset is None:
                return
            with self.lock:
                self.clients += 1
            self._send_from(conn, offset)
        except OSError:
            pass
        finally:
            conn.close()

    def _greet(self, conn: socket.socket):
        line = conn.makefile("rb").readline(512).decode("ascii", "replace").split()
        if len(line) != 3 or line[0] != PROTOCOL or not hmac.compare_digest(line[1].encode(), self.token):
            conn.sendall(b"NO token\n")
            return None
        offset = int(line[2]) if line[2].isdigit() else -1
        if not 0 <= offset <= self.stream.total:
            conn.sendall(b"NO offset\n")
            return None
        conn.sendall(f"OK {self.stream.total}\n".encode())
        return offset

    def _send_from(self, conn: socket.socket, offset: int) -> None:
        stream = self.stream
        while offset < stream.total:
            have = stream.wait_beyond(offset, self.stall_s)
            if have <= offset:
                return  # nothing new for a whole stall window: this host's own source is gone
            index, within = stream.locate(offset)
            size = int(stream.files[index]["size"])
            count = min(have - offset, size - within)
            with open(stream.path(index), "rb") as handle:
                # socket.sendfile: the kernel's sendfile(2), waiting (up to the socket's timeout)
                # whenever the peer's window is full, where a bare os.sendfile would fail EAGAIN.
                sent = conn.sendfile(handle, within, count) if count else 0
            if sent != count:
                return
            offset += count
            with self.lock:
                self.served += count


def receive_stdin(stream: Stream, writer: Writer) -> None:
    source = sys.stdin.buffer
    while stream.have < stream.total:
        data = source.read(min(CHUNK, stream.total - stream.have))
        if not data:
            raise ConnectionError(f"stdin closed at byte {stream.have} of {stream.total}")
        writer.write(data)


def receive_peers(stream: Stream, writer: Writer, token: str, upstreams: list, stall_s: float,
                  give_up_s: float) -> bool:
    """From the first upstream that answers; on a break or a stall, the next, from the same byte.
    False when none has given a byte for give_up_s (every host before this one is gone)."""
    last_progress = time.monotonic()
    attempt = 0
    while stream.have < stream.total:
        host, port = upstreams[attempt % len(upstreams)]
        attempt += 1
        before = stream.have
        try:
            with socket.create_connection((host, port), timeout=stall_s) as conn:
                conn.sendall(f"{PROTOCOL} {token} {stream.have}\n".encode())
                reader = conn.makefile("rb")
                answer = reader.readline(128).split()
                if answer[:1] != [b"OK"] or answer[1:] != [str(stream.total).encode()]:
                    raise ConnectionError(f"{host}:{port} answered {b' '.join(answer).decode()!r}")
                while stream.have < stream.total:
                    data = reader.read1(min(CHUNK, stream.total - stream.have))
                    if not data:
                        raise ConnectionError(f"{host}:{port} closed at byte {stream.have}")
                    writer.write(data)
        except (OSError, ConnectionError, ValueError) as error:
            if stream.have > before:
                last_progress = time.monotonic()
            say("UPSTREAM", f"{host}:{port}", "lost at byte", stream.have, f"({error})")
            if time.monotonic() - last_progress > give_up_s:
                return False
            time.sleep(0.5 if attempt % len(upstreams) else 2)
    return True


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follow the Hub's redirects (to its CDN for large files) without sending the token to
    another host: a pre-signed CDN URL needs none, and must never see it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(
                req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def receive_hub(stream: Stream, writer: Writer, hub: dict, stall_s: float, attempts: int = 5) -> None:
    """The stream from the Hub (or a mirror) itself, file by file, resuming a cut file with a
    Range request. The token (if any) goes only in the Authorization header, to the Hub's host."""
    opener = urllib.request.build_opener(_SameHostAuth)
    failures = 0
    while stream.have < stream.total:
        index, within = stream.locate(stream.have)
        entry = stream.files[index]
        url = hub["base"] + urllib.parse.quote(entry["path"])
        request = urllib.request.Request(url, headers={"Range": f"bytes={within}-"})
        if hub.get("token"):
            request.add_header("Authorization", f"Bearer {hub['token']}")
        before = stream.have
        try:
            with opener.open(request, timeout=stall_s) as response:
                if within and response.status != 206:
                    raise ConnectionError(f"{url}: no range support (HTTP {response.status})")
                left = int(entry["size"]) - within
                while left:
                    data = response.read(min(CHUNK, left))
                    if not data:
                        raise ConnectionError(f"{url}: cut at byte {int(entry['size']) - left}")
                    writer.write(data)
                    left -= len(data)
        except (OSError, ConnectionError, urllib.error.URLError) as error:
            failures = 0 if stream.have > before else failures + 1
            reason = f"HTTP {error.code}" if isinstance(error, urllib.error.HTTPError) else str(error)
            say("HUB", entry["path"], "lost at byte", stream.have, f"({reason})")
            if failures >= attempts:
                raise ConnectionError(f"the hub failed {attempts} times at {entry['path']}: {reason}")
            time.sleep(min(2 ** failures, 30))


def check_seed(stream: Stream, sums: str) -> str | None:
    """Why this copy cannot seed the chain (None: it can). The sums file is written by the deploy
    once a copy is verified: the same text means the same revision and selection of files."""
    try:
        with open(os.path.join(stream.directory, SUMS_NAME), encoding="utf-8") as handle:
            if handle.read() != sums:
                return f"{SUMS_NAME} differs from the wanted revision's"
    except OSError:
        return f"no {SUMS_NAME}"
    for index, entry in enumerate(stream.files):
        try:
            size = os.stat(stream.path(index)).st_size
        except OSError:
            return f"{entry['path']} is missing"
        if size != int(entry["size"]):
            return f"{entry['path']} has {size} bytes, not {entry['size']}"
    return None


def read_source() -> dict:
    """The control machine's line saying where this host's bytes come from."""
    return json.loads(sys.stdin.buffer.readline(1 << 20) or b"{}")


def run(header: dict) -> int:
    files = header["files"]
    mode = header["mode"]
    stall_s = float(header.get("stall_s", 30))
    stream = Stream(header["dir"], files)
    if mode == "seed":
        problem = check_seed(stream, header.get("sums", ""))
        if problem:
            say("FAILED", "seed:", problem)
            return 3
        stream.have = stream.total
    host, port = header["listen"]
    try:
        server = Server(stream, header["token"], set(header.get("allowed") or []), (host, int(port)), stall_s)
    except OSError as error:
        say("FAILED", f"cannot listen on {host}:{port}:", error.strerror or error)
        return 3
    server.start()
    say("LISTENING", f"{server.address[0]}:{server.address[1]}")
    status = 0
    if mode != "seed":
        writer = Writer(stream)
        began = time.monotonic()
        try:
            source = read_source()
            upstreams = [(h, int(p)) for h, p in source.get("upstreams") or []]
            if upstreams and not receive_peers(stream, writer, header["token"], upstreams,
                                               stall_s, float(header.get("give_up_s", 60))):
                # Every host before this one is gone: the control machine says where the rest
                # comes from (its own stdin feed, or the Hub), and the hosts after it go on
                # receiving from this one.
                say("STARVED", stream.have)
                source, upstreams = read_source(), []
            if not upstreams and source.get("hub"):
                receive_hub(stream, writer, source["hub"], stall_s)
            elif not upstreams:
                receive_stdin(stream, writer)
            writer.close()
            say("RECEIVED", stream.have, f"{time.monotonic() - began:.2f}")
        except (OSError, ConnectionError, ValueError) as error:
            writer.close()
            say("FAILED", error)
            status = 3
    # Serve until the control machine closes stdin (or its SSH connection goes away).
    while sys.stdin.buffer.read(CHUNK):
        pass
    server.stop()
    stream.close()
    say("SERVED", server.served, server.clients)
    return status


def main() -> int:
    line = sys.stdin.buffer.readline(1 << 24)
    try:
        header = json.loads(line)
    except ValueError:
        say("FAILED", "no header on stdin")
        return 3
    return run(header)


if __name__ == "__main__":
    sys.exit(main())
