"""The attackers of `bench serve-load --mode hostile`: a tenant that sends only malformed and
oversized requests and holds slow connections, and an admin that keeps giving that tenant
large new patch stacks (each one built from scratch by every worker).

Every hostile request must be refused with a 4xx naming the problem; anything else (a 2xx, a
5xx, a connection error) is counted as unexpected. `windows_for`, `phase_figures` and
`compare` lay out a run's quiet and hostile windows and compare the other tenants' figures.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import requests

HOSTILE_TENANT = "mallory"
GENERATE = "/v1/images/generations"


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


def hostile_requests(native: int) -> list[tuple[str, bytes]]:
    """(label, body) of requests the server must refuse (400 or 413), for a model whose
    native side is `native`."""
    bomb = "[" * 50_000 + "]" * 50_000
    huge = 8 * native
    return [
        ("not-json", b'{"prompt": "a red circle", '),
        ("nesting-bomb", ('{"prompt": "x", "user": ' + bomb + "}").encode()),
        ("lone-surrogate", b'{"prompt": "a red \\ud800 circle"}'),
        ("control-chars", _json({"prompt": "a \x1b[31m red circle"})),
        ("unknown-field", _json({"prompt": "a red circle", "colour": "red"})),
        ("names-a-tenant", _json({"prompt": "a red circle", "tenant": "t0"})),
        ("prompt-too-long", _json({"prompt": "x" * 100_000})),
        ("too-many-images", _json({"prompt": "a red circle", "n": 64})),
        ("too-many-steps", _json({"prompt": "a red circle", "steps": 10_000})),
        ("size-too-large", _json({"prompt": "a red circle", "size": f"{huge}x{huge}"})),
        (
            "work-over-budget",
            _json(
                {
                    "prompt": "a red circle",
                    "n": 4,
                    "steps": 100,
                    "size": f"{2 * native}x{2 * native}",
                }
            ),
        ),
        ("body-over-1MiB", _json({"prompt": "a red circle", "user": "x" * (1 << 20)})),
    ]


def _stalled_connection(port: int, key: str, kind: str) -> socket.socket | None:
    """A connection that stops half-way: in its headers, or in its body."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if kind == "headers":
            sock.sendall(f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
        else:
            head = (
                f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"prompt": ')
        sock.setblocking(False)
        return sock
    except OSError:
        return None


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@dataclass
class HostileTenant:
    """Sends `rate` malformed or oversized requests per second, round robin over the
    catalogue, and keeps `stalled` connections open that stop in their headers or body
    (reopened as the server closes them)."""

    url: str
    port: int
    key: str
    native: int
    rate: float = 20.0
    stalled: int = 40
    results: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    reopened: int = 0
    sent: int = 0  # position in the catalogue, kept across runs

    def run(self, stop: float) -> list[_Attack]:
        """Attack until `stop` (time.monotonic(), one clock for every process here) from a
        process of its own - as a separate client would: in this process its threads would
        hold the benchmark clients' GIL and slow them down, not the server - and return what
        to join."""
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        settings = {k: getattr(self, k) for k in ("url", "port", "key", "native", "rate")}
        settings.update(stalled=self.stalled, sent=self.sent)
        process = context.Process(target=_attack, args=(settings, stop, queue), daemon=True)
        process.start()
        return [_Attack(self, process, queue)]

    def _merge(self, other: HostileTenant) -> None:
        self.results.update(other.results)
        self.unexpected += other.unexpected
        self.reopened += other.reopened
        self.sent = other.sent

    def _send(self, stop: float) -> None:
        catalogue = hostile_requests(self.native)
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        started, k = time.monotonic(), 0
        while time.monotonic() < stop:
            label, body = catalogue[self.sent % len(catalogue)]
            self.sent += 1
            try:
                response = session.post(self.url + GENERATE, data=body, headers=headers, timeout=30)
                status = response.status_code
            except requests.RequestException as exc:
                status, answer = 0, f"{label}: {exc!r}"[:200]
                session = requests.Session()
            else:
                answer = f"{label}: HTTP {status}: {response.text[:100]}"
            self.results[(label, status)] += 1
            if not 400 <= status < 500:
                self.unexpected.append(answer)
            k += 1
            # Pacing the attack to `rate` (never past `stop`), not synchronisation.
            time.sleep(max(0.0, min(stop, started + k / self.rate) - time.monotonic()))

    def _stall(self, stop: float) -> None:
        kinds = ["headers", "body"]
        open_: list[socket.socket] = []
        while time.monotonic() < stop:
            for sock in [s for s in open_ if _closed_by_server(s)]:
                sock.close()
                open_.remove(sock)
                self.reopened += 1
            while len(open_) < self.stalled:
                sock = _stalled_connection(self.port, self.key, kinds[len(open_) % 2])
                if sock is None:
                    break
                open_.append(sock)
            time.sleep(0.2)  # pacing
        for sock in open_:
            sock.close()


def _attack(settings: dict, stop: float, queue: Any) -> None:
    """The attacking process: both attacks until `stop`, then what happened."""
    tenant = HostileTenant(**settings)
    threads = [
        threading.Thread(target=tenant._send, args=(stop,)),
        threading.Thread(target=tenant._stall, args=(stop,)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put(tenant)


@dataclass
class _Attack:
    tenant: HostileTenant
    process: Any
    queue: Any

    def join(self, timeout: float | None = None) -> None:
        self.tenant._merge(self.queue.get(timeout=timeout))
        self.process.join(timeout=10)


@dataclass
class StackChurner:
    """Every `interval` s, gives the hostile tenant a new stack of `size` patches (a
    rotation of `pool`, so every stack is new and built from scratch)."""

    assign: Callable[[str, list[str]], Any]
    pool: list[str]
    size: int = 16
    interval: float = 2.0
    assigned: int = 0

    def run(self, stop: float) -> threading.Thread:
        """Churn until `stop` (time.monotonic()); the thread to join."""
        thread = threading.Thread(target=self._churn, args=(stop,), daemon=True)
        thread.start()
        return thread

    def _churn(self, stop: float) -> None:
        started, k = time.monotonic(), 0
        while time.monotonic() < stop:
            turn = self.assigned % len(self.pool)
            rotated = self.pool[turn:] + self.pool[:turn]
            self.assign(HOSTILE_TENANT, rotated[: self.size])
            self.assigned += 1
            k += 1
            due = min(stop, started + k * self.interval)
            time.sleep(max(0.0, due - time.monotonic()))  # pacing, never past `stop`

    def summary(self) -> dict[str, Any]:
        return {"stacks_assigned": self.assigned, "stack_size": self.size}


def windows_for(seconds: float, window: float, mode: str) -> list[tuple[float, float, str]]:
    """(start, end, phase) offsets covering the run: one phase, or quiet and hostile windows
    alternating (an even number, so both get the same time and the same drift of whatever
    else the machine does)."""
    if mode != "both":
        return [(0.0, seconds, mode)]
    count = max(2, round(seconds / window))
    count += count % 2
    width = seconds / count
    return [(i * width, (i + 1) * width, "hostile" if i % 2 else "quiet") for i in range(count)]


def phase_figures(samples: list, windows: list, t0: float, phase: str) -> dict:
    """The four tenants' figures for requests sent during `phase`'s windows."""
    chosen = [
        s
        for s in samples
        if any(t0 + a <= s.sent < t0 + b for a, b, name in windows if name == phase)
    ]
    latencies = [s.received - s.sent for s in chosen if s.status == 200]

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies, q)), 4) if latencies else None

    return {
        "seconds": round(sum(b - a for a, b, name in windows if name == phase), 1),
        "requests": len(chosen),
        "failed": sum(s.status != 200 for s in chosen),
        "latency_p50_s": pct(50),
        "latency_p99_s": pct(99),
        "latency_max_s": round(max(latencies), 4) if latencies else None,
        "examples_failed": [asdict(s) for s in chosen if s.status != 200][:5],
    }


def compare(quiet: dict[str, Any], hostile: dict[str, Any]) -> dict[str, Any]:
    """The acceptance check: the four tenants lose nothing while the fifth attacks."""
    ratio = hostile["latency_p99_s"] / quiet["latency_p99_s"]
    return {
        "p50_ratio": round(hostile["latency_p50_s"] / quiet["latency_p50_s"], 3),
        "p99_ratio": round(ratio, 3),
        "p99_within_1.5x": ratio <= 1.5,
        "others_failed_while_hostile": hostile["failed"],
    }
