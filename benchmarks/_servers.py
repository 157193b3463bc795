"""Child-process servers for the benchmarks (the same way the tests start them)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from procs import free_port, stop, wait_port  # noqa: E402,F401  (the same helpers the test fixtures use)


def _which(name: str) -> str:
    p = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")
    if not p:
        sys.exit(f"{name} not found: run 'make test' once (it installs the Debian packages)")
    return p


@contextlib.contextmanager
def child(args: list[str], port: int):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc, timeout=30)
        yield proc
    finally:
        stop(proc)


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
