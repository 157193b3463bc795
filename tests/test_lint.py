"""yamllint and ansible-lint (production profile) run clean on the project's tracked files.

Only what git tracks is linted (``git ls-files``): a file a user drops into the checkout (a scratch
``foo.yml``, a half-written task file) is theirs, not the project's, and must not fail these tests.
"""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ANSIBLE_PATHS = ("playbooks", "roles")
BAD_YAML = "key: [unclosed\nother:   value  \n"


def _git_files(root: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted(f for f in out.split("\0") if f)


def tracked(root: Path, *pathspecs: str) -> list[str]:
    """Tracked files (that exist in the work tree) matching the pathspecs."""
    return [f for f in _git_files(root, "--", *pathspecs) if (root / f).is_file()]


def yamllint(root: Path) -> subprocess.CompletedProcess:
    files = tracked(root, "*.yml", "*.yaml")
    assert files, f"no tracked YAML files under {root}"
    return subprocess.run([str(BIN / "yamllint"), "--strict", "--", *files], cwd=root, capture_output=True, text=True)


def ansible_lint(root: Path) -> subprocess.CompletedProcess:
    """The tracked files under playbooks/ and roles/. ansible-lint also follows a playbook into its roles
    and lints every task file it finds there, so the untracked ones are excluded by name."""
    files = tracked(root, *ANSIBLE_PATHS)
    assert files, f"no tracked files under {', '.join(ANSIBLE_PATHS)} in {root}"
    untracked = _git_files(root, "--others", "--", *ANSIBLE_PATHS)
    return subprocess.run([str(BIN / "ansible-lint"), "--nocolor", "--profile", "production", *files,
                           *[f"--exclude={f}" for f in untracked]],
                          cwd=root, capture_output=True, text=True, timeout=600)


def test_yamllint():
    r = yamllint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ansible_lint_production_profile():
    r = ansible_lint(ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr


def test_untracked_files_in_the_checkout_are_not_linted(tmp_path):
    """A copy of the checkout (its tracked files, as they are in the work tree) with a stray bad YAML
    file in the root and an untracked broken task file in a role: both lints still pass."""
    copy = tmp_path / "checkout"
    for f in tracked(ROOT):
        (copy / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, copy / f)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "--", *tracked(ROOT)], cwd=copy, check=True)
    (copy / "foo.yml").write_text(BAD_YAML)
    (copy / "roles" / "model_deploy" / "tasks" / "scratch.yml").write_text("---\n- name: half written\n  shell: " + BAD_YAML)
    assert "foo.yml" not in tracked(copy) and "roles/model_deploy/tasks/scratch.yml" not in tracked(copy)
    # the stray files are bad, and linting the folder (what these tests did before) finds them
    before = subprocess.run([str(BIN / "yamllint"), "--strict", "."], cwd=copy, capture_output=True, text=True)
    assert before.returncode != 0 and "foo.yml" in before.stdout and "scratch.yml" in before.stdout

    r = yamllint(copy)
    assert r.returncode == 0, r.stdout + r.stderr
    r = ansible_lint(copy)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr
    assert "foo.yml" not in r.stdout + r.stderr and "scratch.yml" not in r.stdout + r.stderr


def test_every_role_documents_and_checks_its_variables():
    for role in (ROOT / "roles").iterdir():
        if not role.is_dir() or not tracked(ROOT, str(role.relative_to(ROOT))):
            continue  # not a role of the project (an untracked folder)
        for f in ("defaults/main.yml", "meta/argument_specs.yml", "handlers/main.yml", "README.md", "tasks/main.yml"):
            assert (role / f).is_file(), f"{role.name} has no {f}"
