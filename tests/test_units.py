"""The systemd units, rendered by Ansible from the roles' templates with the roles' own defaults and
vars, pass `systemd-analyze verify` and are hardened (no systemd needs to run): the model server's
(roles/model_server) and HAProxy's (roles/load_balancer, load_balancer_supervisor: systemd)."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, which

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
    # it writes only its pidfile folder and the model folder (.last-good); /tmp is private
    assert d["ReadWritePaths"] == ["/srv/mlpipe/run/mlpipe-credit-risk /srv/mlpipe/models/credit-risk"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "CapabilityBoundingSet": ""}.items():
        assert d.get(key) == [value], (key, d.get(key))


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


def test_haproxy_unit_with_a_missing_binary_fails_verify(tmp_path):
    unit = render_lb(tmp_path, load_balancer_haproxy_bin="/nonexistent/haproxy")
    assert verify(unit).returncode != 0
