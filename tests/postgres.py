"""A real PostgreSQL server as a child process of the tests (Debian's ``postgresql`` package).

initdb and postgres refuse to run as root, so when the tests run as root the server runs as the
``postgres`` user (``subprocess.Popen(user=...)``: the child is postgres itself, not a wrapper, so
signals reach it and the test reaps it: PID 1 in a container reaps nothing). Data and socket folders
live in a temporary folder owned by that user; the server listens on 127.0.0.1 on a free port with
trust authentication (tests only).

    with postgres_server() as pg:        # or the session fixture ``pg_server`` (import it)
        url = pg.url                       # postgresql://postgres@127.0.0.1:PORT/mlpipe
        pg.stop()                          # the database is down: clients get "connection refused"
        pg.start()                         # back on the same port with the same data
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from procs import free_port

BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")
MISSING = "PostgreSQL is not installed (no initdb/postgres in /usr/lib/postgresql/*/bin): run 'make deps' (apt package postgresql)"


def bin_dir() -> Path | None:
    for d in BIN_DIRS:
        if (Path(d) / "postgres").is_file() and (Path(d) / "initdb").is_file():
            return Path(d)
    return None


class PostgresServer:
    """One cluster in its own temporary folder; start()/stop() as often as a test needs."""

    def __init__(self, db: str = "mlpipe", port: int | None = None, user: str = "postgres"):
        self.bin = bin_dir()
        if self.bin is None:
            raise RuntimeError(MISSING)
        self.db = db
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._as = user if os.geteuid() == 0 else None  # run as this user (only root has to switch)
        self.base = Path(tempfile.mkdtemp(prefix="mlpipe-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "run"
        self.log_path = self.base / "postgres.log"
        self.sockets.mkdir()
        if self._as:
            pw = pwd.getpwnam(self._as)
            for p in (self.base, self.sockets):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--no-sync", "--no-instructions"])
        self.start()
        self._create_db()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.db}"

    def _popen_kw(self) -> dict:
        kw = {"cwd": str(self.base), "env": {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "TZ": "UTC"}}
        if self._as:
            kw.update(user=self._as, group=pwd.getpwnam(self._as).pw_gid, extra_groups=[])
        return kw

    def _run(self, args: list[str]) -> None:
        r = subprocess.run(args, capture_output=True, text=True, timeout=120, **self._popen_kw())
        if r.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (again) on the same port and wait until it accepts queries."""
        if self.running:
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.sockets), "-h", "127.0.0.1",
                 "-p", str(self.port), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log, stderr=log, **self._popen_kw())
        finally:
            log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg2
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode} on port {self.port}: {self.log_tail()}")
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                 connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres did not accept connections on port {self.port} within {timeout}s: "
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)

    def _create_db(self) -> None:
        self.create_database(self.db)

    def create_database(self, name: str) -> str:
        """Another empty database on this server (one per test keeps tests apart); its URL."""
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, no waiting for them), then reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(db: str = "mlpipe"):
    """A running PostgreSQL for the block; stopped, reaped and deleted afterwards."""
    server = PostgresServer(db=db)
    try:
        yield server
    finally:
        server.cleanup()


try:
    import pytest
except ImportError:  # the benchmarks import this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def pg_server():
        """One PostgreSQL for the session (``from postgres import pg_server`` in a test module).
        A test that stops it must start it again (``pg.start()``) before it ends."""
        if bin_dir() is None:
            pytest.fail(MISSING)
        with postgres_server() as server:
            yield server
