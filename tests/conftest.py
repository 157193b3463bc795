"""Shared fixtures. Real servers (redis-server, moto_server) run as child processes on free ports
and are stopped (and reaped) by the fixture that started them."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent


from procs import free_port, stop, wait_port  # noqa: E402,F401  (shared with benchmarks/)

# Servers, CLIs and monitors started by the tests capture predictions and write logs: never into the
# user's ~/.mlpipe. One folder per test process (xdist workers each import this file); a test that
# wants its own database sets MLPIPE_CAPTURE_DB itself.
_SCRATCH = Path(__import__("tempfile").mkdtemp(prefix="mlpipe-tests-"))
os.environ.setdefault("MLPIPE_CAPTURE_DB", f"sqlite:///{_SCRATCH}/capture.db")
os.environ.setdefault("MLPIPE_LOG_DIR", str(_SCRATCH / "logs"))


def which(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin:/usr/bin")
    if not path:
        pytest.fail(f"{name} is not installed: run 'make test' (it installs what the suite needs)")
    return path


@contextlib.contextmanager
def haproxy_backend(tmp_path: Path, servers: list[str]):
    """A real HAProxy (child process, -db) with one backend ``mlpipe`` of ``servers`` (each "NAME
    HOST:PORT [options]", health-checked on GET / every 100 ms) and its admin socket, whose path it
    yields once the frontend listens."""
    sock, front = tmp_path / "haproxy.sock", free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend f
    bind 127.0.0.1:{front}
    default_backend mlpipe
backend mlpipe
    option httpchk GET /
    default-server inter 100ms fall 1 rise 1
""" + "".join(f"    server {s} check\n" for s in servers))
    proc = subprocess.Popen([which("haproxy"), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", front, proc)
        yield str(sock)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([which("moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        wait_port("127.0.0.1", port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("MLPIPE_REGISTRY", raising=False)
    monkeypatch.delenv("MLPIPE_CACHE", raising=False)


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    import boto3
    monkeypatch.setenv("MLPIPE_S3_ENDPOINT_URL", moto_endpoint)
    name = f"mlpipe-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An unregistered artifact folder of examples/hello-world.yml (trained once per module)."""
    from mlpipe import spec, train
    d = tmp_path_factory.mktemp("art") / "v"
    train.train(spec.load(EXAMPLES / "hello-world.yml"), d, message="m")
    return d


@pytest.fixture
def registry_path(tmp_path):
    return tmp_path / "registry"


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec (a dict or YAML text) to a file and return its path."""
    import yaml

    def _write(content, name: str = "spec.yml") -> Path:
        p = tmp_path / name
        p.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return p
    return _write


def small_spec(name: str = "toy", **overrides) -> dict:
    spec = {"name": name,
            "data": {"source": "sklearn:breast_cancer", "target": "target"},
            "split": {"test_size": 0.25, "random_state": 3, "stratify": True},
            "model": {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 3000}},
            "metrics": ["accuracy", "f1_macro"],
            "gate": {"min": {"accuracy": 0.8}}}
    spec.update(overrides)
    return spec


def run_cli(*args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mlpipe", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def train_into(registry, spec_dict: dict, write_spec, message: str = "", extra_args=()) -> dict:
    """Train a spec dict into a registry through the real CLI; returns the manifest."""
    import json as _json
    p = write_spec(spec_dict, name=f"{spec_dict['name']}-{uuid.uuid4().hex[:6]}.yml")
    r = run_cli("train", p, "-m", message, "--registry", registry, "--json", *extra_args)
    assert r.returncode == 0, r.stderr
    return _json.loads(r.stdout)


class Server:
    """`mlpipe serve` (gunicorn) as a child process on a free port."""

    def __init__(self, model_dir, tmp_path, env=None, workers=2, host="127.0.0.1", multi=False):
        self.host, self.port = host, free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.pidfile = tmp_path / f"gunicorn-{self.port}.pid"
        self.log = open(tmp_path / f"gunicorn-{self.port}.log", "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlpipe", "serve", "--models-dir" if multi else "--model-dir", str(model_dir), "--host", host,
             "--port", str(self.port), "--workers", str(workers), "--pidfile", str(self.pidfile)],
            env={**os.environ, **(env or {})}, stdout=self.log, stderr=self.log)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> float:
        import requests
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError("server not ready in time")

    def stop(self):
        stop(self.proc)
        self.log.close()
