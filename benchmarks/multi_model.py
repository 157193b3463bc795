"""What does each additional model cost a multi-model host, and does a host with many models answer as
fast as a host with one? `mlpipe serve --models-dir` (gunicorn, 2 sync workers) with 1 model and with
1 + N models (LogisticRegression on breast_cancer, 30 features, each its own registered model), side by
side in one run:

  memory      the server's proportional set size (PSS: shared pages split between the processes that
              share them), master and workers summed, from /proc/<pid>/smaps_rollup, after warm-up
  throughput  wrk on /models/<first>/invocations (one-row requests, Connection: close), the same model
              on both hosts, interleaved rounds

Goal (issue 12): each additional small model costs <= 30 MB; a host with 20 models answers as fast as
a host with one. Nothing here asserts a figure.

Usage: python benchmarks/multi_model.py [--models 20] [--seconds 5] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import free_port, start_serve, stop_group, wrk  # noqa: E402

BIN = Path(sys.executable).parent


def pss_mb(pid: int) -> float:
    """PSS of a process and its children (the gunicorn master and its workers), in MB."""
    pids = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(p) for p in child.read_text().split()]
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=20, help="additional models on the larger host")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    import yaml
    from sklearn.datasets import load_breast_cancer
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-multi-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MLPIPE_REGISTRY": str(tmp / "reg"), "MLPIPE_FLEET_ROOT": str(tmp / "root"),
               "PATH": f"{BIN}:{os.environ['PATH']}", "MLPIPE_CAPTURE_SAMPLE": "0"}
        names = [f"lr-{i:02d}" for i in range(args.models + 1)]
        for i, name in enumerate(names):
            spec = {"name": name, "data": {"source": "sklearn:breast_cancer", "target": "target"},
                    "split": {"test_size": 0.2, "random_state": i},
                    "model": {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 5000}},
                    "metrics": ["accuracy"]}
            (tmp / f"{name}.yml").write_text(yaml.safe_dump(spec))
            subprocess.run([sys.executable, "-m", "mlpipe", "train", str(tmp / f"{name}.yml")], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run([sys.executable, "-m", "mlpipe", "models", "pull", f"{name}:1", "--dest",
                            str(tmp / "many" / name), "--activate"], env=env, check=True, stdout=subprocess.DEVNULL)
        (tmp / "one").mkdir()
        shutil.copytree(tmp / "many" / names[0], tmp / "one" / names[0], symlinks=True)
        frame = load_breast_cancer(as_frame=True).frame
        cols = [c for c in frame.columns if c != "target"]
        body = json.dumps({"dataframe_split": {"columns": cols, "data": frame[cols].head(1).values.tolist()}})
        hosts = {"1 model": tmp / "one", f"{len(names)} models": tmp / "many"}
        memory: dict = {}
        rps: dict = {k: [] for k in hosts}
        p99: dict = {k: [] for k in hosts}
        for rnd in range(args.rounds):
            for label, root in (list(hosts.items()) if rnd % 2 == 0 else list(hosts.items())[::-1]):
                port = free_port()
                proc = start_serve([str(BIN / "mlpipe"), "serve", "--models-dir", str(root), "--port", str(port),
                                    "--workers", "2"], port, env, tmp / "serve.log")
                try:
                    base = f"http://127.0.0.1:{port}"
                    for name in names if label != "1 model" else names[:1]:  # every model once on every worker
                        for _ in range(4):
                            requests.post(f"{base}/models/{name}/invocations", data=body,
                                          headers={"Content-Type": "application/json"}, timeout=10).raise_for_status()
                    time.sleep(0.5)
                    memory.setdefault(label, []).append(pss_mb(proc.pid))
                    r = wrk(f"{base}/models/{names[0]}/invocations", body, args.seconds, args.connections, tmp)
                    if r.get("errors"):
                        print(f"warning: {label}: {r['errors']} failed requests")
                    rps[label].append(r["rps"])
                    p99[label].append(r["p99"])
                finally:
                    stop_group(proc)
    one, many = hosts
    per_model = (statistics.mean(memory[many]) - statistics.mean(memory[one])) / args.models
    print(f"\nmulti-model host: mlpipe serve --models-dir, 2 gunicorn workers, LogisticRegression models "
          f"(breast_cancer, 30 features, scored by their linear.json); wrk -c{args.connections} {args.seconds} s x {args.rounds} "
          f"rounds (load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f})\n")
    print(f"{'host':12} {'PSS MB':>8} {'req/s':>8} {'p99 ms':>8}")
    for label in hosts:
        print(f"{label:12} {statistics.mean(memory[label]):>8.1f} {statistics.mean(rps[label]):>8.0f} "
              f"{statistics.mean(p99[label]):>8.2f}")
    ratio = statistics.mean(rps[many]) / statistics.mean(rps[one])
    print(f"\neach additional model: {per_model:.1f} MB for the host (both workers) (goal <= 30 MB)")
    print(f"{many} host answers at {ratio:.2f} of the 1-model host's throughput (goal: as fast, ~1.00)")


if __name__ == "__main__":
    main()
