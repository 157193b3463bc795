"""yamllint and ansible-lint (production profile) run clean on the playbooks and roles."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_yamllint():
    r = subprocess.run([str(BIN / "yamllint"), "--strict", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ansible_lint_production_profile():
    r = subprocess.run([str(BIN / "ansible-lint"), "--nocolor", "--profile", "production"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr


def test_every_role_documents_and_checks_its_variables():
    for role in (ROOT / "roles").iterdir():
        for f in ("defaults/main.yml", "meta/argument_specs.yml", "handlers/main.yml", "README.md", "tasks/main.yml"):
            assert (role / f).is_file(), f"{role.name} has no {f}"
