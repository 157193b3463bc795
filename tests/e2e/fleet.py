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


def sshd_config(d: Path, port: int, address: str | None = None) -> Path:
    """An sshd config for one loopback address (one sshd per host, so one host can be made
    unreachable) or, without ``address``, for all of them. Keys are made once per folder."""
    if not (d / "host_key").exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
    conf = d / f"sshd_config{'-' + address if address else ''}"
    conf.write_text("\n".join([f"ListenAddress {a}:{port}" for a in ([address] if address else ADDRESSES)] + [
        f"HostKey {d / 'host_key'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        f"PidFile {d / ('sshd-' + (address or 'all') + '.pid')}",
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
        self.sshd: dict[str, subprocess.Popen] = {}
        self.headers: dict = {}  # sent by versions() (bearer token once the servers want one)

    def start_sshd(self, address: str) -> None:
        """sshd for one host's address (a child process; stop_sshd makes that host unreachable)."""
        from procs import wait_port
        conf = sshd_config(self.tmp, self.ssh_port, address)
        self.sshd[address] = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                              stderr=open(self.tmp / f"sshd-{address}.log", "ab"))
        wait_port(address, self.ssh_port, self.sshd[address])

    def stop_sshd(self, address: str) -> None:
        from procs import stop
        proc = self.sshd.pop(address, None)
        if proc is not None:
            # its open sessions too (Ansible keeps a persistent connection): they are its children
            subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], capture_output=True)
            stop(proc)

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
                out[h] = requests.get(f"{self.host_url(h)}/metadata", headers=self.headers, timeout=5).json()["version"]
            except Exception:
                out[h] = None
        return out

    def deploy(self, version, *extra: str, model: str = "credit-risk") -> subprocess.CompletedProcess:
        return self.playbook("deploy.yml", "-e", f"model={model}", "-e", f"version={version}", *extra)

    def start_playbook(self, name: str, *extra: str) -> subprocess.Popen:
        """A playbook in the background (its own process group, so a Ctrl-C can be sent to it)."""
        log = open(self.tmp / f"bg-{name}-{time.monotonic_ns()}.log", "w+")
        proc = subprocess.Popen([str(BIN / "ansible-playbook"), f"playbooks/{name}", *extra], cwd=ROOT, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        proc.log = log
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
        proc.wait(timeout)
        proc.log.seek(0)
        return proc.log.read()

    def wait_for(self, what, timeout: float = 300, every: float = 0.2):
        """Poll ``what`` until it is true. A poll that raises (a server still binding its port
        after a restart, a ledger being written) counts as "not yet"; the last error is shown
        if it never comes true."""
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            try:
                got = what()
            except Exception as e:  # noqa: BLE001 - reported below if it never comes true
                got, error = None, e
            if got:
                return got
            time.sleep(every)
        raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {error!r})" if error else ""))

    def deployed_on(self, host: str, version: int, model: str = "credit-risk") -> bool:
        """The ledger's latest event for ``host`` says it was deployed ``version``."""
        last = [e for e in self.events(model) if e.get("host") == host and e["event"] in ("deployed", "host_rolled_back", "host_disabled")]
        return bool(last) and last[-1]["event"] == "deployed" and last[-1]["version"] == version

    def lb_up(self) -> list[str]:
        from mlpipe.fleet import lb_status
        return lb_status(str(self.root / "lb1" / "run" / "haproxy.sock"), "mlpipe")["up"]

    def fleet_state(self, model: str = "credit-risk") -> dict:
        return json.loads(self.mlpipe("fleet", "state", model).stdout)

    def supervisorctl(self, host: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["supervisorctl", "-c", str(self.root / host / "etc" / "supervisord.conf"), *args],
                              capture_output=True, text=True, timeout=60)

    def events(self, model: str) -> list[dict]:
        """The model's ledger, read in this process (the tests poll it while a deploy runs: a
        new interpreter per poll is slow enough on a loaded machine to miss a batch)."""
        from mlpipe.registry import Registry
        return Registry(str(self.registry)).events(model)

    def down(self) -> None:
        """Stop what site.yml started (supervisord + gunicorn per host, HAProxy)."""
        for conf in self.root.glob("*/etc/supervisord.conf"):
            subprocess.run(["supervisorctl", "-c", str(conf), "shutdown"], capture_output=True, timeout=60)
        for pidfile in list(self.root.glob("*/run/haproxy.pid")) + list(self.root.glob("*/run/**/gunicorn.pid")):
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
            except (ValueError, OSError):
                pass


class Load:
    """A bounded request loop through HAProxy (threads, a time limit), counting every answer."""

    def __init__(self, url: str, body: dict, threads: int = 3, max_seconds: float = 300, headers: dict | None = None):
        self.url, self.body, self.threads, self.max_seconds = url, body, threads, max_seconds
        self.headers = headers or {}
        self.counts: collections.Counter = collections.Counter()
        self.failures: list = []
        self.failure_times: list = []  # time.monotonic() of each failure
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _loop(self):
        import requests
        s = requests.Session()
        s.headers.update(self.headers)
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
                    self.failure_times.append(time.monotonic())

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


# ------------------------------------------------------------------------- helpers of the e2e tests
def recap_changed(stdout: str) -> int:
    return sum(int(part.split("=")[1]) for line in stdout.split("PLAY RECAP")[-1].splitlines()
               for part in line.split() if part.startswith("changed="))


ALL = ["ms1", "ms2", "ms3"]


def holdout(fleet, bad_on: str | None = None) -> list[str]:
    """The check's data: the real holdout, or shuffled labels on one host only (a check that fails there)."""
    good, bad = f"csv:{fleet.root / 'holdout.csv'}", f"csv:{fleet.root / 'shuffled.csv'}"
    if bad_on is None:
        return ["-e", f"model_deploy_holdout={good}"]
    return ["-e", f"model_deploy_holdout={{{{ '{bad}' if inventory_hostname == '{bad_on}' else '{good}' }}}}"]


def serial(*batches) -> list[str]:
    return ["-e", json.dumps({"deploy_serial": list(batches)})]


def train(fleet, message: str) -> int:
    r = fleet.mlpipe("train", str(ROOT / "examples" / "credit-risk.yml"), "-m", message, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["version"]


def on(fleet, version: int) -> dict:
    return {h: version for h in ALL}


def setup_v1(fleet) -> None:
    """site.yml, then v1 trained and deployed to every host: where the failure modules start."""
    assert fleet.playbook("site.yml").returncode == 0
    assert train(fleet, "v1") == 1
    r = fleet.deploy(1, *holdout(fleet))
    assert r.returncode == 0, r.stdout[-3000:]
    assert fleet.versions() == on(fleet, 1)
    assert fleet.fleet_state()["live"] == 1
