"""Each role's molecule scenario (syntax, converge, idempotence, verify, cleanup) on this machine, and
the other scenarios some roles have (model_server/systemd: the systemd mode, in check mode)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLES = sorted(p.parent.parent.parent.name for p in ROOT.glob("roles/*/molecule/default/molecule.yml"))
# (role, scenario) of every scenario other than "default"
SCENARIOS = sorted((p.parent.parent.parent.name, p.parent.name) for p in ROOT.glob("roles/*/molecule/*/molecule.yml")
                   if p.parent.name != "default")


def molecule_test(role: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin", "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1",
           "ANSIBLE_CONFIG": ""}
    return subprocess.run([str(BIN / "molecule"), "test", *args], cwd=ROOT / "roles" / role, env=env, capture_output=True,
                          text=True, timeout=900)


def test_every_role_has_a_scenario():
    assert sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir()) == ROLES


def test_the_systemd_scenario_is_found():
    assert ("model_server", "systemd") in SCENARIOS


@pytest.mark.e2e
@pytest.mark.parametrize("role", ROLES)
def test_molecule(role):
    r = molecule_test(role)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@pytest.mark.e2e
@pytest.mark.parametrize(("role", "scenario"), SCENARIOS, ids=[f"{r}-{s}" for r, s in SCENARIOS])
def test_molecule_scenario(role, scenario):
    r = molecule_test(role, "-s", scenario)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
