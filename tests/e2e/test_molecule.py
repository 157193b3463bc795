"""Each role's molecule scenario (syntax, converge, idempotence, verify, cleanup) on this machine."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLES = sorted(p.parent.parent.parent.name for p in ROOT.glob("roles/*/molecule/default/molecule.yml"))


def test_every_role_has_a_scenario():
    assert sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir()) == ROLES


@pytest.mark.e2e
@pytest.mark.parametrize("role", ROLES)
def test_molecule(role):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin", "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1",
           "ANSIBLE_CONFIG": ""}
    r = subprocess.run([str(BIN / "molecule"), "test"], cwd=ROOT / "roles" / role, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
