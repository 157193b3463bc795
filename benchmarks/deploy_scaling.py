"""Wall time of a rolling deploy on 3 and 6 local hosts, and where it goes.

For each fleet size: a fresh local fleet (HAProxy + N model servers on 127.0.0.11.., ansible_connection
local), v1 deployed, then the measured run: deploy v2 with the default batches [1, 50%, 100%].
ansible.posix.profile_tasks times every task; the tasks that do the work are the switch (pull,
verify, symlink), the graceful reload, waiting for the new version, and the live check
(`mlpipe evaluate --endpoint`). Everything else (facts, stats, set_fact, drain/enable, ledger
writes, includes, and time between tasks) is counted as Ansible overhead.

Usage: python benchmarks/deploy_scaling.py [--sizes 3 6]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _servers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORK = ("Pull, verify and switch to the new version", "Reload the model server gracefully",
        "Wait until the host answers with the new version", "Check health, version, latency and the gate's metrics")


def inventory(d: Path, n: int) -> Path:
    inv = d / "inventory"
    shutil.copytree(ROOT / "inventory" / "local" / "group_vars", inv / "group_vars")
    hosts = {"all": {"children": {
        "load_balancers": {"hosts": {"lb1": {"ansible_host": "127.0.0.10"}}},
        "model_servers": {"hosts": {f"ms{i}": {"ansible_host": f"127.0.0.{10 + i}"} for i in range(1, n + 1)}},
        "trainers": {"hosts": {"trainer1": {"ansible_host": "127.0.0.30"}}}}}}
    (inv / "hosts.yml").write_text(yaml.safe_dump(hosts))
    return inv


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    return r


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MLPIPE_FLEET_ROOT": str(tmp / "fleet"), "MLPIPE_REGISTRY": str(tmp / "fleet" / "registry"),
               "MLPIPE_VENV": str(BIN.parent), "MLPIPE_PYTHON": sys.executable, "MLPIPE_SERVER_PORT": str(free_port()),
               "MLPIPE_LB_PORT": str(free_port()), "PATH": f"{BIN}:{os.environ['PATH']}:/usr/sbin",
               "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
        (tmp / "fleet").mkdir()
        inv = inventory(tmp, n)
        pb = [str(BIN / "ansible-playbook"), "-i", str(inv)]
        try:
            run(pb + ["playbooks/site.yml"], env)
            for v in (1, 2):
                run([sys.executable, "-m", "mlpipe", "train", str(ROOT / "examples" / "credit-risk.yml"), "-m", f"v{v}"], env)
            run(pb + ["playbooks/deploy.yml", "-e", "model=credit-risk", "-e", "version=1"], env)
            prof = {**env, "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks", "PROFILE_TASKS_TASK_OUTPUT_LIMIT": "all"}
            t = time.perf_counter()
            r = run(pb + ["playbooks/deploy.yml", "-e", "model=credit-risk", "-e", "version=2"], prof)
            wall = time.perf_counter() - t
        finally:
            for conf in (tmp / "fleet").glob("*/etc/supervisord.conf"):
                subprocess.run(["supervisorctl", "-c", str(conf), "shutdown"], capture_output=True)
            for pid in (tmp / "fleet").glob("*/run/haproxy.pid"):
                subprocess.run(["kill", pid.read_text().split()[0]], capture_output=True)
        tasks = {}
        for m in re.finditer(r"^(.+?) -+ ([\d.]+)s$", r.stdout, re.M):
            tasks[m.group(1).strip()] = tasks.get(m.group(1).strip(), 0.0) + float(m.group(2))
        work = {w: sum(s for name, s in tasks.items() if w in name) for w in WORK}
        return {"hosts": n, "wall": wall, "work": work}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 6])
    args = ap.parse_args()
    results = [measure(n) for n in args.sizes]
    labels = {WORK[0]: "switch (pull, verify, symlink)", WORK[1]: "graceful reload", WORK[2]: "wait for new version",
              WORK[3]: "live check (mlpipe evaluate)"}
    print("rolling deploy of v2 over v1, batches [1, 50%, 100%], ansible_connection local\n")
    print(f"{'':34}" + "".join(f"{str(r['hosts']) + ' hosts':>16}" for r in results))
    print(f"{'wall time':34}" + "".join(f"{r['wall']:>15.1f}s" for r in results))
    for w in WORK:
        print(f"  {labels[w]:32}" + "".join(f"{r['work'][w]:>15.1f}s" for r in results))
    for r in results:
        r["overhead"] = r["wall"] - sum(r["work"].values())
    print(f"  {'Ansible overhead':32}" + "".join(f"{r['overhead']:>15.1f}s" for r in results))
    print(f"{'share in Ansible overhead':34}" + "".join(f"{r['overhead'] / r['wall']:>16.0%}" for r in results))
    if len(results) == 2:
        a, b = results
        print(f"\n{b['hosts']} hosts / {a['hosts']} hosts: wall x{b['wall'] / a['wall']:.2f}, "
              f"overhead x{b['overhead'] / a['overhead']:.2f} (batches run in parallel within a batch, so "
              f"doubling the hosts adds less than double)")


if __name__ == "__main__":
    main()
