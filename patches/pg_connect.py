"""Connections to the registry's PostgreSQL database (psycopg 3), and the one translation of
database failures into registry errors.

psycopg is an optional dependency (`pip install 'conceptguard[postgres]'`): it is imported
only when a `postgresql://` registry is opened, so a server on a local registry starts
without it.

Connections are pooled per registry object and per process: a connection is used by one
thread at a time, and the idle ones are closed before the process forks (LitServe forks its
API process from `serve`'s main process), so no two processes ever share a session's socket.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from patches.errors import RegistryCorrupt, RegistryError, RegistryStateMissing, RegistryUnreadable

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A database that does not answer must not hold a worker for long: the batch path then
# answers 503 (fail closed) instead of leaving requests to time out.
CONNECT_TIMEOUT_S = 3
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms without an acknowledgement: the connection is dead
}
IDLE_CONNECTIONS = 4  # kept open per registry object and process; more are closed after use


def import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise RegistryError(
            "a postgresql:// registry needs psycopg 3, which is not installed: "
            "pip install 'conceptguard[postgres]'"
        ) from None
    return psycopg


def redacted(dsn: str) -> str:
    """`dsn` without its password (URLs and key=value strings alike): what may be shown."""
    if "://" not in dsn:
        return " ".join(
            "password=***" if part.lower().startswith("password=") else part for part in dsn.split()
        )
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{host}"
    query = "&".join(
        "password=***" if item.lower().startswith("password=") else item
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def registry_error(exc: Exception, what: str) -> RegistryError:
    """The registry error for database failure `exc` while doing `what`. Messages reach
    tenants inside 503 answers: they name the failure's class, never hosts or credentials
    (the server log has the details)."""
    psycopg = import_psycopg()
    errors = psycopg.errors
    if isinstance(exc, errors.UndefinedTable | errors.InvalidSchemaName):
        return RegistryStateMissing(
            "there is no registry in this database (no conceptguard schema); create one with "
            "`conceptguard registry init`"
        )
    logger.warning("registry database: %s failed: %s", what, str(exc).strip())
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return RegistryUnreadable(
            f"the registry database cannot be reached ({type(exc).__name__} while {what}); "
            "nothing is served or changed until it can"
        )
    return RegistryCorrupt(
        f"the registry database refused {what} ({type(exc).__name__}: "
        f"{getattr(exc, 'sqlstate', None) or 'no SQLSTATE'})"
    )


_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _close_idle_before_fork() -> None:
    for pool in list(_pools):
        pool.close()


os.register_at_fork(before=_close_idle_before_fork)


class ConnectionPool:
    """Autocommit connections to `dsn`, handed to one user at a time; transactions are
    opened explicitly (`transaction`, `snapshot_read`)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._psycopg = import_psycopg()
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection] = []
        self._pid = os.getpid()
        _pools.add(self)

    def connect(self) -> psycopg.Connection:
        """A new connection of its own (a listener's); the caller closes it."""
        return self._psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="conceptguard",
            **KEEPALIVES,
        )

    def _take(self) -> tuple[psycopg.Connection, bool]:
        with self._lock:
            if self._pid != os.getpid():
                # Inherited through a fork while in use: never touch the parent's sessions.
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), True
        return self.connect(), False

    def _give_back(self, connection: psycopg.Connection) -> None:
        usable = (
            not connection.closed
            and connection.info.transaction_status == self._psycopg.pq.TransactionStatus.IDLE
        )
        with self._lock:
            if usable and self._pid == os.getpid() and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    def run(self, what: str, work: Callable[[psycopg.Connection], T], retry: bool = False) -> T:
        """`work(connection)` for `what`; database failures become registry errors. With
        `retry` (reads only), a pooled connection found dead - the server restarted while
        it was idle - is replaced once by a new one before the failure counts."""
        psycopg = self._psycopg
        while True:
            try:
                connection, reused = self._take()
            except psycopg.Error as exc:
                raise registry_error(exc, what) from None
            try:
                result = work(connection)
            except psycopg.Error as exc:
                connection.close()
                dead = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
                if retry and reused and dead:
                    retry = False
                    continue
                raise registry_error(exc, what) from None
            except BaseException:
                # A refusal (PatchInUse...) rolled its transaction back: the connection is
                # idle and pooled again; one left inside a transaction is closed.
                self._give_back(connection)
                raise
            self._give_back(connection)
            return result

    def close(self) -> None:
        """Close the idle connections (in-use ones close when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
            mine = self._pid == os.getpid()
        for connection in idle if mine else ():
            connection.close()


@contextmanager
def snapshot_read(connection: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """A read-only transaction that sees one snapshot of the database throughout."""
    connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield connection
    except BaseException:
        if not connection.closed:
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
