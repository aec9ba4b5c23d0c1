"""HTTP at the socket level, for what `requests` cannot do: send headers and only part of a
body, then read the answer (a server that reads bodies before checking the caller never
answers), repeat a header, and find the server process that holds a connection."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def open_request(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body_part: bytes = b"",
    timeout: float = 10.0,
) -> socket.socket:
    """A connection that has sent the request line, `headers` (in order, repeats kept) and
    `body_part`, and sends nothing more until told."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body_part)
    return sock


def read_response(sock: socket.socket) -> RawResponse:
    """The answer on `sock` (raises TimeoutError if none comes within the socket's timeout)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body[:length])


def request(port: int, method: str, path: str, headers: list[tuple[str, str]], body=b""):
    """One whole request and its answer."""
    all_headers = [*headers, ("Content-Length", str(len(body)))]
    with open_request(port, method, path, all_headers, body) as sock:
        return read_response(sock)


def answer_so_far(sock: socket.socket) -> bytes:
    """What the server has answered on `sock` so far (b"" for nothing yet), left unread."""
    sock.setblocking(False)
    try:
        return sock.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return b""
    finally:
        sock.setblocking(True)


def api_process(port: int) -> psutil.Process:
    """The server process that answers HTTP on `port`: the one holding the other end of a
    connection this function opens (LitServe's main process and its manager share the
    listening socket, so listening says nothing)."""
    with open_request(port, "GET", "/health", []) as sock:
        read_response(sock)
        mine = sock.getsockname()[1]
        for proc in psutil.process_iter():
            try:
                connections = proc.net_connections(kind="tcp")
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            if any(c.raddr and c.raddr.port == mine and c.laddr.port == port for c in connections):
                return proc
    raise LookupError(f"no process holds the server end of a connection to port {port}")


@dataclass
class PeakRss:
    """Samples a process's resident memory every few milliseconds while in use."""

    pid: int
    interval_s: float = 0.005
    samples: list[int] = field(default_factory=list)

    def _rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise LookupError(f"no VmRSS for {self.pid}")

    def __enter__(self) -> PeakRss:
        self.baseline = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._rss())
            time.sleep(self.interval_s)  # sampling period, not synchronisation

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(self._rss())

    @property
    def growth(self) -> int:
        """Peak resident memory above the baseline, in bytes."""
        return max(self.samples) - self.baseline
