"""Child-process servers for the benchmarks (the same way the tests start them)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
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


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group (start_new_session), its workers included."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_serve(cmd: list[str], port: int, env: dict, log: Path, timeout: float = 180) -> subprocess.Popen:
    """`mlpipe serve ...` in its own process group (stop it with stop_group), once /v2/health/ready
    answers 200 on 127.0.0.1:``port``; its output appended to ``log``."""
    import time

    import requests
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlpipe serve exited ({proc.returncode}): {log.read_text()[-1500:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.05)
    stop_group(proc)
    raise RuntimeError(f"mlpipe serve not ready on port {port}: {log.read_text()[-1500:]}")


def wrk(url: str, body: str, seconds: int, connections: int, tmp: Path) -> dict:
    """One wrk run (POST ``body``, Connection: close): req/s, p50/p99 in ms, requests and errors."""
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      'wrk.headers["Connection"] = "close"\n' f"wrk.body = [==[{body}]==]\n")
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(label):
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms("50%"), "p99": ms("99%"),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "non2xx": int(errors.group(1)) if errors else 0, "socket_errors": sum(map(int, sock.groups())) if sock else 0,
            "errors": (int(errors.group(1)) if errors else 0) + (sum(map(int, sock.groups())) if sock else 0)}
