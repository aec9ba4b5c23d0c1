"""Wakes the readers of a PostgreSQL registry when any process writes to it.

Every write NOTIFYs the registry's channel in its transaction (`pg_schema.commit_write`). A
`ChangeListener` is one thread holding one LISTEN connection; it sets an Event on every
notification, so an idle server worker catches up (and starts building the new stacks) at
once instead of at its next idle tick - a registration reaches every replica on every node
together. The Event carries no data: the reader's refresh asks the change feed what changed,
so a lost or merged notification costs nothing but a later refresh.

When the connection breaks (the database restarts, the network drops) the Event is set too -
the reader's refresh then finds the database unreachable and fails its tenants closed - and
the thread reconnects with a backoff; on reconnecting it sets the Event again, because
writes may have committed while nobody listened.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from patches.pg_connect import ConnectionPool
from patches.pg_schema import CHANNEL

logger = logging.getLogger(__name__)

# How long one wait for notifications lasts, so `close` is seen soon.
STOP_CHECK_S = 0.5
RECONNECT_MIN_S = 0.25
RECONNECT_MAX_S = 5.0


class ChangeListener:
    """A daemon thread that LISTENs on the registry's channel and sets `changed`."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.changed = threading.Event()
        self.listening = threading.Event()  # a LISTEN connection is up (for tests, benches)
        self._pool = pool
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name="conceptguard-registry-listener"
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * STOP_CHECK_S + 1)

    def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:  # any failure: wake the reader, then try again
                logger.warning("registry change listener: %s; reconnecting", type(exc).__name__)
                # A connection that was up starts the backoff over.
                backoff = RECONNECT_MIN_S if self.listening.is_set() else 2 * backoff
                backoff = min(backoff, RECONNECT_MAX_S)
            finally:
                self.listening.clear()
                self.changed.set()
            self._stop.wait(backoff)

    def _listen(self) -> None:
        connection = self._pool.connect()
        try:
            connection.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            self.changed.set()  # whatever committed while nobody listened
            while not self._stop.is_set():
                for _ in connection.notifies(timeout=STOP_CHECK_S):
                    self.changed.set()
        finally:
            with contextlib.suppress(Exception):
                connection.close()
