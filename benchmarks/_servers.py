"""Child-process servers for the benchmarks (the same way the tests start them)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait(port: int, proc: subprocess.Popen, host: str = "127.0.0.1", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited early")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not start")


def _which(name: str) -> str:
    p = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")
    if not p:
        sys.exit(f"{name} not found: run 'make test' once (it installs the Debian packages)")
    return p


@contextlib.contextmanager
def child(args: list[str], port: int):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_server():
    port = free_port()
    with tempfile.TemporaryDirectory() as d, child([_which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                                   "--save", "", "--appendonly", "no", "--dir", d], port):
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def moto_server():
    port = free_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with child([_which("moto_server"), "-H", "127.0.0.1", "-p", str(port)], port):
        yield f"http://127.0.0.1:{port}"
