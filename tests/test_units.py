"""The model server's systemd unit, rendered by Ansible from the role's template with the role's own
defaults and vars, passes `systemd-analyze verify` and is hardened (no systemd needs to run)."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, which

BIN = Path(sys.executable).parent
ROLE = ROOT / "roles" / "model_server"

PLAYBOOK = """---
- name: Render the model server's unit
  hosts: localhost
  gather_facts: false
  vars_files:
    - {role}/defaults/main.yml
    - {role}/vars/main.yml
  tasks:
    - name: Render the unit
      ansible.builtin.template:
        src: {role}/templates/mlpipe.service.j2
        dest: "{{{{ unit_dest }}}}"
        mode: "0644"
"""


def render(tmp_path: Path, **extra: str) -> str:
    playbook = tmp_path / "render.yml"
    playbook.write_text(PLAYBOOK.format(role=ROLE))
    dest = tmp_path / "mlpipe-credit-risk.service"
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
