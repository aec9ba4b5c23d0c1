"""uvicorn's HTTP protocol, with a deadline on request headers.

uvicorn closes idle keep-alive connections, but a connection that sends only part of a
request's headers, or nothing at all, stays open for ever: a thousand of them hold a
thousand file descriptors and sockets. With this protocol every request has
`header_timeout_s` - from the connection's opening, or on a kept-alive connection from the
first byte of the next request - to complete its headers; then it is answered 408 and the
connection closed. Bodies have their own deadline in the routes (server/request_body.py).

`bind_listening_socket` binds the server's address (any interface address) before anything
else starts, so a port in use is refused at once.

It subclasses uvicorn's protocol class (httptools when installed, else h11) and uses only
what both share: `cycle` (the request being answered) and the asyncio Protocol methods.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import Any

from server.errors import error_payload


def _timeout_answer(seconds: float) -> bytes:
    body = json.dumps(
        error_payload("RequestTimeout", f"the request headers did not arrive within {seconds:g} s")
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _HeaderDeadline:
    """Mixed into a uvicorn HTTP protocol class (which provides `cycle` and `transport`)."""

    header_timeout_s: float
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._between_requests() and self._header_timer is None:
            self._arm()
        super().data_received(data)
        if not self._between_requests():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.write(_timeout_answer(self.header_timeout_s))
            self.transport.close()


def protocol_with_header_deadline(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (for `uvicorn.Config(http=...)`) with the deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # no httptools: uvicorn's h11 protocol
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type(
        "HeaderDeadlineProtocol", (_HeaderDeadline, base), {"header_timeout_s": header_timeout_s}
    )


def listening_address(value: str) -> str:
    """`--host`: an IP address (any of this machine's interfaces, or 0.0.0.0 / :: for all);
    ValueError naming what is expected otherwise."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address: give one of this machine's interface addresses "
            "(127.0.0.1, 10.0.0.5, ::1), or 0.0.0.0 / :: for every interface"
        ) from None


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound to `host`:`port` (OSError, e.g. the address in use or not
    on this machine); uvicorn listens on it in the API process."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
