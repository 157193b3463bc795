"""The systemd units, rendered by Ansible from the roles' templates with the roles' own defaults and
vars, pass `systemd-analyze verify` and are hardened (no systemd needs to run): the model server's
(roles/model_server) and HAProxy's (roles/load_balancer, load_balancer_supervisor: systemd)."""
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, stop, wait_port, which

BIN = Path(sys.executable).parent
ROLE = ROOT / "roles" / "model_server"
LB_ROLE = ROOT / "roles" / "load_balancer"

PLAYBOOK = """---
- name: Render a role's unit
  hosts: localhost
  gather_facts: false
  vars_files:
    - {role}/defaults/main.yml
    - {role}/vars/main.yml
  tasks:
    - name: Render the unit
      ansible.builtin.template:
        src: {role}/templates/{template}
        dest: "{{{{ unit_dest }}}}"
        mode: "0644"
"""


def render(tmp_path: Path, role: Path = ROLE, template: str = "mlpipe.service.j2", name: str = "mlpipe-credit-risk.service",
           **extra: str) -> str:
    playbook = tmp_path / "render.yml"
    playbook.write_text(PLAYBOOK.format(role=role, template=template))
    dest = tmp_path / name
    args = {"unit_dest": str(dest), "mlpipe_common_root": "/srv/mlpipe", "mlpipe_common_venv": str(BIN.parent),
            "mlpipe_common_user": "mlpipe", **extra}
    cmd = [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
           "-e", f"ansible_python_interpreter={sys.executable}"]
    for k, v in args.items():
        cmd += ["-e", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "ANSIBLE_CONFIG": "", "ANSIBLE_NOCOLOR": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return str(dest)


def verify(unit: str) -> subprocess.CompletedProcess:
    return subprocess.run([which("systemd-analyze"), "verify", unit], capture_output=True, text=True, timeout=60)


def directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in Path(unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_is_valid_and_hardened(tmp_path):
    unit = render(tmp_path)
    r = verify(unit)
    # verify exits 0 on unknown keys too: they are only warned about, naming the file
    assert r.returncode == 0 and unit not in r.stdout + r.stderr, r.stdout + r.stderr
    d = directives(unit)
    assert d["User"] == ["mlpipe"] and d["Group"] == ["mlpipe"]
    assert d["ExecStart"][0].startswith(f"{BIN}/gunicorn -c python:mlpipe.gunicorn_conf -p /srv/mlpipe/run/mlpipe-credit-risk/gunicorn.pid")
    # it writes only its pidfile folder, the model folder (.last-good) and the folder of its SQLite capture
    # database (by default the host's own); /tmp is private
    assert d["ReadWritePaths"] == ["/srv/mlpipe/run/mlpipe-credit-risk /srv/mlpipe/models /srv/mlpipe/capture"]  # every model's folder: one added later writes its .last-good
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "CapabilityBoundingSet": ""}.items():
        assert d.get(key) == [value], (key, d.get(key))


def test_unit_with_a_postgresql_capture_database_writes_no_capture_folder(tmp_path):
    """Capture into PostgreSQL needs no folder on the host: ReadWritePaths keeps the two of the server."""
    unit = render(tmp_path, model_server_capture_db="postgresql://mlpipe@db.internal/capture")
    assert verify(unit).returncode == 0
    assert directives(unit)["ReadWritePaths"] == ["/srv/mlpipe/run/mlpipe-credit-risk /srv/mlpipe/models"]


def test_unit_without_a_service_user_is_valid(tmp_path):
    unit = render(tmp_path, model_server_user="")
    r = verify(unit)
    assert r.returncode == 0 and unit not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "User" not in directives(unit)


def test_a_broken_unit_fails_verify(tmp_path):
    """The check can fail: a unit whose ExecStart does not exist is refused."""
    unit = render(tmp_path, mlpipe_common_venv="/nonexistent/venv")
    assert verify(unit).returncode != 0


def render_lb(tmp_path: Path, **extra: str) -> str:
    return render(tmp_path, role=LB_ROLE, template="haproxy.service.j2", name="mlpipe-haproxy.service",
                  load_balancer_supervisor="systemd", **extra)


def test_haproxy_unit_is_valid_and_reloads_in_place(tmp_path):
    haproxy = which("haproxy")
    unit = render_lb(tmp_path, load_balancer_haproxy_bin=haproxy)
    r = verify(unit)
    assert r.returncode == 0 and unit not in r.stdout + r.stderr, r.stdout + r.stderr
    d = directives(unit)
    # master-worker with sd_notify, as Debian's haproxy.service; our configuration and pidfile
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == [f"{haproxy} -Ws -f /srv/mlpipe/etc/haproxy.cfg -p /srv/mlpipe/run/haproxy.pid"]
    # a reload checks the configuration first, then USR2 to the master (new workers, old ones finish)
    assert d["ExecReload"] == [f"{haproxy} -Ws -f /srv/mlpipe/etc/haproxy.cfg -c -q", "/bin/kill -USR2 $MAINPID"]
    assert d["KillMode"] == ["mixed"] and d["Restart"] == ["always"] and d["WantedBy"] == ["multi-user.target"]
    assert d["ReadWritePaths"] == ["/srv/mlpipe/run"]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes"}.items():
        assert d.get(key) == [value], (key, d.get(key))
    # without load_balancer_user HAProxy runs as the unit's user (root) with every capability, as before
    assert "CapabilityBoundingSet" not in d and "User" not in d


def test_haproxy_unit_with_a_user_bounds_the_root_master(tmp_path):
    haproxy = which("haproxy")
    unit = render_lb(tmp_path, load_balancer_haproxy_bin=haproxy, load_balancer_user="haproxy")
    r = verify(unit)
    assert r.returncode == 0 and unit not in r.stdout + r.stderr, r.stdout + r.stderr
    d = directives(unit)
    # the workers drop to the user (haproxy.cfg); the master keeps what starting and signalling them takes
    assert d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_KILL"]
    assert d["ExecStart"] == [f"{haproxy} -Ws -f /srv/mlpipe/etc/haproxy.cfg -p /srv/mlpipe/run/haproxy.pid"]
    assert d["NoNewPrivileges"] == ["yes"] and d["ReadWritePaths"] == ["/srv/mlpipe/run"]


def render_lb_config(tmp_path: Path, name: str = "haproxy.cfg", **extra: str) -> str:
    return render(tmp_path, role=LB_ROLE, template="haproxy.cfg.j2", name=name, **extra)


def global_section(cfg: str) -> list[str]:
    lines = Path(cfg).read_text().split("\ndefaults\n")[0].splitlines()
    return [line.strip() for line in lines if line.startswith("    ") and not line.strip().startswith("#")]


def test_haproxy_config_drops_root_only_with_a_user(tmp_path):
    haproxy = which("haproxy")
    plain = render_lb_config(tmp_path, name="plain.cfg")
    assert not [line for line in global_section(plain) if line.split()[0] in ("user", "group")]
    assert "stats socket /srv/mlpipe/run/haproxy.sock mode 600 level admin expose-fd listeners" in global_section(plain)
    cfg = render_lb_config(tmp_path, name="user.cfg", load_balancer_user="haproxy")
    assert {"user haproxy", "group haproxy"} <= set(global_section(cfg))
    # the admin socket is unchanged: root's (the master creates it), deploys use it through become
    assert "stats socket /srv/mlpipe/run/haproxy.sock mode 600 level admin expose-fd listeners" in global_section(cfg)
    other = render_lb_config(tmp_path, name="group.cfg", load_balancer_user="haproxy", load_balancer_group="nogroup")
    assert {"user haproxy", "group nogroup"} <= set(global_section(other))
    for path in (plain, cfg, other):
        r = subprocess.run([haproxy, "-c", "-q", "-f", path], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (path, r.stdout + r.stderr)
    # HAProxy refuses a user that does not exist
    missing = render_lb_config(tmp_path, name="missing.cfg", load_balancer_user="no-such-user-mlpipe")
    assert subprocess.run([haproxy, "-c", "-q", "-f", missing], capture_output=True, timeout=60).returncode != 0


def ask(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        return b"".join(iter(lambda: s.recv(65536), b"")).decode()


def children(pid: int) -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(p.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def proc_status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(key)


def running(pid: int) -> bool:
    """pid is a live HAProxy (not a zombie, not a reused pid)."""
    try:
        return proc_status(pid, "State")[0] != "Z" and proc_status(pid, "Name") == "haproxy"
    except (OSError, KeyError):
        return False


def wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.skipif(os.geteuid() != 0, reason="HAProxy drops root only when it starts as root")
def test_haproxy_with_a_user_runs_its_workers_unprivileged_within_the_units_bounds(tmp_path):
    """The unit's ExecStart under its CapabilityBoundingSet and NoNewPrivileges (setpriv, no systemd needed), with
    the role's configuration: the workers run as the user, the root master answers a reload (USR2: new worker,
    a drained server stays drained through the server-state file) and a stop, and root uses the admin socket."""
    haproxy, setpriv = which("haproxy"), which("setpriv")
    try:
        user = pwd.getpwnam("haproxy")
    except KeyError:
        pytest.fail("no user haproxy: run 'make deps' (Debian's haproxy package makes it)")
    root, port = tmp_path / "lb", free_port()
    for sub in ("etc", "run"):
        (root / sub).mkdir(parents=True)
    args = {"mlpipe_common_root": str(root), "load_balancer_haproxy_bin": haproxy, "load_balancer_user": "haproxy",
            "load_balancer_bind_host": "127.0.0.1", "load_balancer_port": str(port),
            # one backend server (this inventory's localhost), on a port where nothing listens
            "load_balancer_servers_group": "all", "load_balancer_backend_port": str(free_port())}
    d = directives(render_lb(tmp_path, **args))
    render_lb_config(tmp_path, name="lb/etc/haproxy.cfg", **args)
    bounds = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in d["CapabilityBoundingSet"][0].split()])
    sock, state = root / "run" / "haproxy.sock", root / "run" / "haproxy.state"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with open(tmp_path / "haproxy.log", "wb") as log:
        master = subprocess.Popen([setpriv, "--no-new-privs", "--bounding-set", bounds, *d["ExecStart"][0].split()],
                                  stdout=log, stderr=log, env=env)
    workers: set[int] = set()
    try:
        wait_port("127.0.0.1", port, master)
        workers = wait_for(lambda: children(master.pid))
        assert proc_status(master.pid, "Uid").split()[0] == "0"
        assert int(proc_status(master.pid, "CapBnd"), 16) == sum(1 << n for n in (10, 7, 6, 5))  # net_bind_service setuid setgid kill
        for w in workers:
            assert proc_status(w, "Uid").split() == [str(user.pw_uid)] * 4
            assert proc_status(w, "Gid").split() == [str(user.pw_gid)] * 4
            assert int(proc_status(w, "CapEff"), 16) == 0
        assert int((root / "run" / "haproxy.pid").read_text()) == master.pid
        st = sock.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
        assert "Name: HAProxy" in ask(sock, "show info")

        # the role's reload: drain a server, save the state (the handler, as root), ExecReload (check, USR2)
        assert ask(sock, "set server mlpipe/localhost state drain").strip() == ""
        state.write_text(ask(sock, "show servers state"))
        r = subprocess.run(d["ExecReload"][0].split(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        os.kill(master.pid, signal.SIGUSR2)
        new = wait_for(lambda: (lambda c: c if c and not c & workers else None)(children(master.pid)))
        workers |= new
        for w in new:
            assert proc_status(w, "Uid").split()[0] == str(user.pw_uid)
        rows = [line.split() for line in ask(sock, "show servers state mlpipe").splitlines()[2:] if line.strip()]
        assert [(row[3], int(row[6]) & 8) for row in rows] == [("localhost", 8)], rows

        # a stop (systemd: SIGTERM to the master) ends the workers too
        master.terminate()
        assert master.wait(10) in (0, 143, -signal.SIGTERM)
        wait_for(lambda: not [w for w in workers if running(w)], timeout=10)
    finally:
        stop(master)
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)


def test_haproxy_unit_with_a_missing_binary_fails_verify(tmp_path):
    unit = render_lb(tmp_path, load_balancer_haproxy_bin="/nonexistent/haproxy")
    assert verify(unit).returncode != 0
