"""The local fleet for end-to-end tests: sshd on the loopback addresses (a child process), and
helpers to run playbooks over SSH and to stop the daemons the playbooks start."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ADDRESSES = ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]


def sshd_config(d: Path, port: int) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    conf = d / "sshd_config"
    conf.write_text("\n".join([f"ListenAddress {a}:{port}" for a in ADDRESSES] + [
        f"HostKey {d / 'host_key'}", f"AuthorizedKeysFile {d / 'authorized_keys'}", f"PidFile {d / 'sshd.pid'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "LogLevel ERROR", "MaxStartups 100:30:200", "MaxSessions 100",
        "Subsystem sftp internal-sftp", ""]))
    return conf


class Fleet:
    def __init__(self, tmp: Path, ssh_port: int, server_port: int, lb_port: int):
        self.tmp, self.ssh_port, self.server_port, self.lb_port = tmp, ssh_port, server_port, lb_port
        self.root = tmp / "fleet"
        self.registry = self.root / "registry"
        self.env = {**os.environ, "MLPIPE_TRANSPORT": "ssh", "MLPIPE_SSH_PORT": str(ssh_port),
                    "MLPIPE_SSH_KEY": str(tmp / "client_key"), "MLPIPE_FLEET_ROOT": str(self.root),
                    "MLPIPE_REGISTRY": str(self.registry), "MLPIPE_PYTHON": sys.executable,
                    "MLPIPE_VENV": str(BIN.parent), "MLPIPE_SERVER_PORT": str(server_port),
                    "MLPIPE_LB_PORT": str(lb_port), "PATH": f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin",
                    "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
        self.lb_url = f"http://127.0.0.10:{lb_port}"

    def playbook(self, name: str, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN / "ansible-playbook"), f"playbooks/{name}", *extra], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        (self.tmp / "playbook.log").open("a").write(f"\n===== {name} {' '.join(extra)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def mlpipe(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlpipe", *args, "--registry", str(self.registry)],
                              capture_output=True, text=True, env=self.env, timeout=300)

    def host_url(self, host: str) -> str:
        return f"http://{ADDRESSES[int(host[-1])]}:{self.server_port}"

    def versions(self) -> dict[str, int | None]:
        import requests
        out = {}
        for h in ("ms1", "ms2", "ms3"):
            try:
                out[h] = requests.get(f"{self.host_url(h)}/metadata", timeout=5).json()["version"]
            except Exception:
                out[h] = None
        return out

    def events(self, model: str) -> list[dict]:
        return json.loads(self.mlpipe("models", "history", model, "--json").stdout)

    def down(self) -> None:
        """Stop what site.yml started (supervisord + gunicorn per host, HAProxy)."""
        for conf in self.root.glob("*/etc/supervisord.conf"):
            subprocess.run(["supervisorctl", "-c", str(conf), "shutdown"], capture_output=True, timeout=60)
        for pidfile in list(self.root.glob("*/run/haproxy.pid")) + list(self.root.glob("*/run/gunicorn.pid")):
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
            except (ValueError, OSError):
                pass


class Load:
    """A bounded request loop through HAProxy (threads, a time limit), counting every answer."""

    def __init__(self, url: str, body: dict, threads: int = 3, max_seconds: float = 300):
        self.url, self.body, self.threads, self.max_seconds = url, body, threads, max_seconds
        self.counts: collections.Counter = collections.Counter()
        self.failures: list = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _loop(self):
        import requests
        s = requests.Session()
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                r = s.post(f"{self.url}/invocations", json=self.body, timeout=10)
                key = r.json().get("model_version") if r.status_code == 200 else f"HTTP {r.status_code}"
            except Exception as exc:
                key = f"{type(exc).__name__}"
            with self._lock:
                self.counts[key] += 1
                if not str(key).isdigit():
                    self.failures.append(key)

    def __enter__(self):
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.threads)]
        for t in self._threads:
            t.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        time.sleep(0.5)
        self._stop.set()
        for t in self._threads:
            t.join(30)
