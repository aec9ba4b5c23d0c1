"""A real PostgreSQL server for tests: initdb in a temporary directory, a free port on
127.0.0.1, trust authentication on loopback only, stopped when the test process exits.

One server per test process (started on first use); every test gets a database of its own
(`fresh_dsn`). As root (CI), the server runs as the `postgres` user (or `nobody`), because
PostgreSQL refuses to run as root. Tests skip, saying why, only when no server binary can be
found; `.ci/run` installs Debian's `postgresql` package where it is missing.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_process import free_port

SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/usr/local/bin", "/usr/bin")
NO_SERVER = (
    "no PostgreSQL server binary (postgres + initdb) found on PATH or in "
    "/usr/lib/postgresql/*/bin: install Debian's postgresql package (.ci/run does)"
)


def server_binaries() -> tuple[Path, Path] | None:
    """(postgres, initdb) of the newest server found, or None."""
    candidates = []
    found = shutil.which("postgres")
    if found:
        candidates.append(Path(found).resolve().parent)
    for pattern in SEARCH:
        candidates += sorted((Path(p) for p in glob.glob(pattern)), reverse=True)
    for directory in candidates:
        postgres, initdb = directory / "postgres", directory / "initdb"
        if postgres.is_file() and initdb.is_file():
            return postgres, initdb
    return None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account to run the server as when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root with neither a 'postgres' nor a 'nobody' account")


@dataclass
class PostgresServer:
    postgres: Path
    initdb: Path
    directory: Path
    port: int
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_user(self) -> dict:
        user = _unprivileged_user()
        if user is None:
            return {}

        def drop() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        return {"preexec_fn": drop}

    def init(self) -> None:
        user = _unprivileged_user()
        data = self.directory / "data"
        data.mkdir(mode=0o700)
        if user is not None:
            for path in (self.directory, data):
                os.chown(path, user.pw_uid, user.pw_gid)
        subprocess.run(
            [str(self.initdb), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **self._as_user(),
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server on its port; returns once it accepts connections."""
        import psycopg

        self.log = self.directory / "server.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.postgres),
                    "-D",
                    str(self.directory / "data"),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "max_connections=300",
                    # Tests kill clients, never the server machine: durability is not tested.
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "shared_buffers=64MB",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as_user(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log.read_text()[-3000:]}")
            try:
                psycopg.connect(self.admin_dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (fast shutdown: open sessions are ended)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


_server: PostgresServer | None = None
_names = itertools.count()


def shared_server() -> PostgresServer:
    """This test process's server, started on first use; skips the test without one."""
    global _server
    if _server is None:
        binaries = server_binaries()
        if binaries is None:
            pytest.skip(NO_SERVER)
        directory = Path(tempfile.mkdtemp(prefix="cg-postgres-"))
        os.chmod(directory, 0o755)
        server = PostgresServer(*binaries, directory, free_port())
        server.init()
        server.start()
        atexit.register(server.remove)
        _server = server
    return _server


def own_server() -> PostgresServer:
    """A started server of the caller's own, to stop and start again; the caller removes it.
    Skips the test without a server binary."""
    binaries = server_binaries() or pytest.skip(NO_SERVER)
    shared_server()  # fails the same way as every other test when there is none
    directory = Path(tempfile.mkdtemp(prefix="cg-postgres-own-"))
    directory.chmod(0o755)
    server = PostgresServer(*binaries, directory, free_port())
    server.init()
    server.start()
    return server


def fresh_dsn(prefix: str = "t") -> str:
    """A new, empty database on the shared server: its DSN."""
    return shared_server().create_database(f"{prefix}_{os.getpid()}_{next(_names)}")
