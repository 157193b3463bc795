"""mlpipe's server against `mlflow models serve` and a bare gunicorn + Flask ceiling, side by side.

The same fitted models (LogisticRegression and RandomForest(100) on breast_cancer), 2 workers each,
MLflow `dataframe_split` requests of 1 and 100 rows from one load generator (wrk), every request
with `Connection: close` so both servers spread the load over both workers (MLflow's uvicorn would
otherwise pin a keep-alive connection to one worker). Each server is measured twice, interleaved.
The ceiling is a gunicorn + Flask app that parses the JSON and returns a fixed answer.

mlflow runs from its own virtualenv (`make bench` creates .venv-bench): it is a benchmark-only
dependency and must not pin mlpipe's libraries.

Usage: python benchmarks/serve_vs_mlflow.py [--seconds 8] [--connections 8] [--mlflow-python .venv-bench/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from _servers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BARE_APP = textwrap.dedent('''
    import json
    from flask import Flask, Response, request
    app = Flask("bare")
    @app.post("/invocations")
    def inv():
        json.loads(request.get_data())
        return Response('{"predictions": [0]}', mimetype="application/json")
    @app.get("/ping")
    def ping():
        return "ok"
''')
SAVE_MLFLOW = textwrap.dedent('''
    import sys, joblib, mlflow.sklearn
    # cloudpickle: MLflow's long-standing default (3.x's skops format refuses tree models without a trust list)
    mlflow.sklearn.save_model(joblib.load(sys.argv[1]), sys.argv[2], serialization_format="cloudpickle")
''')


def start(cmd: list[str], url: str, env: dict, log: Path) -> tuple[subprocess.Popen, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-1500:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return proc, time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{cmd} not ready")


def stop(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wrk(url: str, body: str, seconds: int, connections: int, tmp: Path) -> dict:
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      'wrk.headers["Connection"] = "close"\n' f"wrk.body = [==[{body}]==]\n")
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(label):
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms("50%"), "p99": ms("99%"),
            "non2xx": int(errors.group(1)) if errors else 0, "socket_errors": sum(map(int, sock.groups())) if sock else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--mlflow-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    args = ap.parse_args()
    if not Path(args.mlflow_python).exists():
        sys.exit(f"{args.mlflow_python} not found: run 'make bench' (it creates the mlflow virtualenv)")
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MLPIPE_REGISTRY": str(tmp / "reg"), "PATH": f"{bindir}:{os.environ['PATH']}"}
        specs = {
            "LogisticRegression": {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 5000}},
            "RandomForest(100)": {"estimator": "sklearn.ensemble.RandomForestClassifier", "params": {"n_estimators": 100, "random_state": 0}},
        }
        import yaml
        from sklearn.datasets import load_breast_cancer
        frame = load_breast_cancer(as_frame=True).frame
        cols = [c for c in frame.columns if c != "target"]
        bodies = {n: json.dumps({"dataframe_split": {"columns": cols, "data": frame[cols].head(n).values.tolist()}}) for n in (1, 100)}
        models = {}
        for i, (label, model) in enumerate(specs.items()):
            name = f"bench-{i}"
            spec = {"name": name, "data": {"source": "sklearn:breast_cancer", "target": "target"},
                    "split": {"test_size": 0.2, "random_state": 1}, "model": model, "metrics": ["accuracy"]}
            (tmp / f"{name}.yml").write_text(yaml.safe_dump(spec))
            subprocess.run([sys.executable, "-m", "mlpipe", "train", str(tmp / f"{name}.yml")], env=env, check=True, stdout=subprocess.DEVNULL)
            subprocess.run([sys.executable, "-m", "mlpipe", "models", "pull", f"{name}:1", "--dest", str(tmp / "m" / name), "--activate"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            subprocess.run([args.mlflow_python, "-c", SAVE_MLFLOW, str(tmp / "m" / name / "1" / "model.joblib"), str(tmp / "mlflow" / name)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            models[label] = name
        (tmp / "bare.py").write_text(BARE_APP)
        mlflow_bin = Path(args.mlflow_python).parent

        def servers(name):
            port = free_port()
            yield "mlpipe", [str(bindir / "mlpipe"), "serve", "--model-dir", str(tmp / "m" / name), "--port", str(port), "--workers", "2"], port, "/v2/health/ready", env
            port = free_port()
            yield "mlflow", [str(mlflow_bin / "mlflow"), "models", "serve", "-m", str(tmp / "mlflow" / name), "--env-manager", "local",
                             "-w", "2", "-h", "127.0.0.1", "-p", str(port)], port, "/ping", {**os.environ, "PATH": f"{mlflow_bin}:{os.environ['PATH']}"}

        results: dict = {}
        ready: dict = {}
        for rnd in range(2):
            for label, name in models.items():
                for server, cmd, port, health, senv in servers(name):
                    proc, t = start(cmd, f"http://127.0.0.1:{port}{health}", senv, tmp / f"{server}.log")
                    ready.setdefault(server, []).append(t)
                    try:
                        check = requests.post(f"http://127.0.0.1:{port}/invocations", data=bodies[1], headers={"Content-Type": "application/json"})
                        assert check.status_code == 200, check.text
                        for rows, body in bodies.items():
                            r = wrk(f"http://127.0.0.1:{port}/invocations", body, args.seconds, args.connections, tmp)
                            results.setdefault((label, server, rows), []).append(r)
                    finally:
                        stop(proc)
            port = free_port()
            proc, _ = start([str(bindir / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp), "bare:app"],
                            f"http://127.0.0.1:{port}/ping", env, tmp / "bare.log")
            try:
                for rows, body in bodies.items():
                    results.setdefault(("ceiling", "bare", rows), []).append(
                        wrk(f"http://127.0.0.1:{port}/invocations", body, args.seconds, args.connections, tmp))
            finally:
                stop(proc)

    def agg(key):
        runs = results[key]
        return {k: statistics.mean(r[k] for r in runs) for k in ("rps", "p50", "p99")} | {
            "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs)}

    print(f"wrk -t2 -c{args.connections} -d{args.seconds}s, Connection: close, 2 workers each, mean of 2 interleaved runs\n")
    print(f"{'model':<20}{'rows':>5}  {'server':<8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for (label, server, rows) in sorted(results, key=lambda k: (k[0], k[2], k[1])):
        a = agg((label, server, rows))
        print(f"{label:<20}{rows:>5}  {server:<8}{a['rps']:>9.0f}{a['p50']:>9.2f}{a['p99']:>9.2f}{a['errors']:>8}")
    print("\nratios")
    for label in models:
        for rows in (1, 100):
            ours, theirs, bare = agg((label, "mlpipe", rows)), agg((label, "mlflow", rows)), agg(("ceiling", "bare", rows))
            print(f"  {label:<20} {rows:>3} row(s): throughput x{ours['rps'] / theirs['rps']:.1f} MLflow, "
                  f"{ours['rps'] / bare['rps']:.0%} of the bare ceiling; p99 {ours['p99'] / theirs['p99']:.3f} of MLflow's")
    for server, ts in ready.items():
        print(f"  start to ready, {server:<7} median {statistics.median(ts):.2f} s (max {max(ts):.2f} s)")
    print("\ntargets: LogisticRegression 1 row >= 15x MLflow and >= 70% of the ceiling; RandomForest 1 row >= 25x MLflow;"
          " p99 <= 0.1 of MLflow's; start to ready < 2 s")


if __name__ == "__main__":
    main()
