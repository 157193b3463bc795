"""Each role's molecule scenario (syntax, converge, idempotence, verify, cleanup) on this machine, and
the other scenarios some roles have (model_server/systemd and load_balancer/systemd: the systemd mode,
in check mode). ec2_fleet's scenario runs against a moto_server this module starts on a free loopback
port for it (the AWS environment only: AWS_ENDPOINT_URL and dummy credentials) and stops afterwards."""
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procs import free_port, stop, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLES = sorted(p.parent.parent.parent.name for p in ROOT.glob("roles/*/molecule/default/molecule.yml"))
# (role, scenario) of every scenario other than "default"
SCENARIOS = sorted((p.parent.parent.parent.name, p.parent.name) for p in ROOT.glob("roles/*/molecule/*/molecule.yml")
                   if p.parent.name != "default")


# roles whose scenarios talk to AWS: they get a moto_server of their own
AWS_ROLES = {"ec2_fleet"}


@contextlib.contextmanager
def moto_server():
    """moto_server on a free loopback port; yields the AWS environment that points at it."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        try:
            wait_port("127.0.0.1", port, proc)
            yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        finally:
            stop(proc)


def molecule_test(role: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin", "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1",
           "ANSIBLE_CONFIG": ""}
    with contextlib.ExitStack() as stack:
        if role in AWS_ROLES:
            # nothing from the caller's AWS environment (AWS_PROFILE, a real endpoint) reaches the run
            env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
            env.update(stack.enter_context(moto_server()))
        return subprocess.run([str(BIN / "molecule"), "test", *args], cwd=ROOT / "roles" / role, env=env,
                              capture_output=True, text=True, timeout=900)


def test_every_role_has_a_scenario():
    assert sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir()) == ROLES


def test_the_systemd_scenarios_are_found():
    assert {("model_server", "systemd"), ("load_balancer", "systemd")} <= set(SCENARIOS)


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
