"""mlpipe's server against `mlflow models serve`, Seldon MLServer and a bare gunicorn WSGI ceiling,
side by side in one run (issue 12, item 6).

The same fitted models (LogisticRegression and RandomForest(100) on breast_cancer), requests of 1 and
100 rows from one load generator (wrk, same settings for every server), every request with
`Connection: close` so each server spreads the load over its workers (MLflow's uvicorn would
otherwise pin a keep-alive connection to one worker). The servers:

  mlpipe         `mlpipe serve --workers 2 --capture-sample 0` (gunicorn, 2 sync workers), capture off
                 so it does what the others do; measured on both protocols from one server:
                 /invocations (MLflow `dataframe_split`) and /v2/models/<name>/infer (OIP v2, one
                 FP64 tensor [rows, 30])
  mlpipe cap     the same with capture at the spec default (10% of requests recorded into SQLite),
                 /invocations only: for information
  mlflow         `mlflow models serve -w 2` (from .venv-bench), /invocations
  mlserver       `mlserver start` with mlserver_sklearn.SKLearnModel (from .venv-mlserver),
                 /v2/models/<name>/infer with the same OIP body as mlpipe's; parallel_workers=2 (its
                 way to use 2 cores: one asyncio HTTP process hands requests to 2 inference
                 processes), debug off (no access log, as mlpipe), metrics on as in mlpipe, gRPC and
                 metrics on free ports
  ceiling        gunicorn, 2 sync workers, a bare WSGI function that reads the body, json-parses it
                 and returns a constant (the dataframe_split body): the most a Python WSGI server can do
  flask          the same behind Flask (the ceiling of earlier runs of this benchmark), for information

Every server runs `--rounds` times (fresh process each time), interleaved and in alternating order
so drift in the machine's load hits all alike; the table shows the mean of the rounds. The ceiling
runs in every model's group right after mlpipe, and each ratio is the mean of the rounds' ratios
(with the lowest and highest round), so a ratio compares runs close in time: on a shared machine
the absolute figures drift far more than that. Beside throughput, each run records the CPU time
(user + system) the server's processes used per request answered (CPU us/req, from /proc, over the
wrk run): it hardly depends on what else the machine is doing, so "mlpipe's CPU per request against
the ceiling's" is the steadier figure on a shared machine. The load average is printed before and
after. MLflow and MLServer are benchmark-only dependencies, each in
its own virtualenv (`make bench` creates them); a missing one is skipped with a note.

Usage: python benchmarks/serve_vs_mlflow.py [--seconds 8] [--rounds 2] [--connections 8]
         [--models lr,rf] [--mlflow-python .venv-bench/bin/python] [--mlserver-python .venv-mlserver/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
from _servers import free_port, stop_group, wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CEILING_APP = textwrap.dedent('''
    import json
    ANSWER = b'{"predictions": [0]}'
    HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))]
    def app(environ, start_response):
        n = int(environ.get("CONTENT_LENGTH") or 0)
        if n:
            json.loads(environ["wsgi.input"].read(n))
        start_response("200 OK", HEADERS)
        return [ANSWER]
''')
FLASK_APP = textwrap.dedent('''
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
MODELS = {
    "lr": ("LogisticRegression", {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 5000}}),
    "rf": ("RandomForest(100)", {"estimator": "sklearn.ensemble.RandomForestClassifier",
                                 "params": {"n_estimators": 100, "random_state": 0}}),
}
ROWS = (1, 100)


def start(cmd: list[str], url: str, env: dict, log: Path, cwd: Path | None = None) -> tuple[subprocess.Popen, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-1500:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return proc, time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.05)
    stop_group(proc)
    raise RuntimeError(f"{cmd} not ready: {log.read_text()[-1500:]}")


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group: a server's
    master, workers and helpers (each server starts in its own session)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp; utime and stime follow at 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--models", default="lr,rf", help="comma-separated: lr (LogisticRegression), rf (RandomForest(100))")
    ap.add_argument("--mlflow-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    ap.add_argument("--mlserver-python", default=str(ROOT / ".venv-mlserver" / "bin" / "python"))
    args = ap.parse_args()
    mlflow_bin = Path(args.mlflow_python).parent if Path(args.mlflow_python).exists() else None
    mlserver_bin = Path(args.mlserver_python).parent if Path(args.mlserver_python).exists() else None
    for what, b, venv in (("mlflow", mlflow_bin, args.mlflow_python), ("mlserver", mlserver_bin, args.mlserver_python)):
        if b is None:
            print(f"note: {venv} not found, {what} is skipped (make bench creates its virtualenv)")
    import yaml
    from sklearn.datasets import load_breast_cancer
    frame = load_breast_cancer(as_frame=True).frame
    cols = [c for c in frame.columns if c != "target"]
    bodies = {("inv", n): json.dumps({"dataframe_split": {"columns": cols, "data": frame[cols].head(n).values.tolist()}})
              for n in ROWS}
    bodies |= {("oip", n): json.dumps({"inputs": [{"name": "input-0", "shape": [n, len(cols)], "datatype": "FP64",
                                                   "data": frame[cols].head(n).values.ravel().tolist()}]}) for n in ROWS}
    load_before = loadavg()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MLPIPE_REGISTRY": str(tmp / "reg"), "MLPIPE_FLEET_ROOT": str(tmp / "fleet"),
               "PATH": f"{BIN}:{os.environ['PATH']}"}
        models = {}
        for key in args.models.split(","):
            label, model = MODELS[key.strip()]
            name = f"bench-{key.strip()}"
            spec = {"name": name, "data": {"source": "sklearn:breast_cancer", "target": "target"},
                    "split": {"test_size": 0.2, "random_state": 1}, "model": model, "metrics": ["accuracy"]}
            (tmp / f"{name}.yml").write_text(yaml.safe_dump(spec))
            subprocess.run([sys.executable, "-m", "mlpipe", "train", str(tmp / f"{name}.yml")], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run([sys.executable, "-m", "mlpipe", "models", "pull", f"{name}:1", "--dest", str(tmp / "m" / name),
                            "--activate"], env=env, check=True, stdout=subprocess.DEVNULL)
            joblib_file = tmp / "m" / name / "1" / "model.joblib"
            if mlflow_bin:
                subprocess.run([args.mlflow_python, "-c", SAVE_MLFLOW, str(joblib_file), str(tmp / "mlflow" / name)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if mlserver_bin:
                (tmp / "mlserver" / name).mkdir(parents=True)
                (tmp / "mlserver" / name / "model-settings.json").write_text(json.dumps(
                    {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
                     "parameters": {"uri": str(joblib_file), "version": "1"}}))
            models[label] = name
        (tmp / "ceiling.py").write_text(CEILING_APP)
        (tmp / "flask_app.py").write_text(FLASK_APP)

        def gunicorn(label, server, app):
            port = free_port()
            return label, server, [("inv", "/invocations")], port, dict(
                cmd=[str(BIN / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(tmp), app],
                url=f"http://127.0.0.1:{port}/ping", env=env)

        # per model: (label, server, the (protocol, path) pairs wrk measures on it, port, start() arguments); the
        # ceiling is measured in every model's group, next to mlpipe, so a ratio compares runs close in time
        def servers():
            for label, name in models.items():
                port = free_port()
                yield label, "mlpipe", [("inv", "/invocations"), ("oip", f"/v2/models/{name}/infer")], port, dict(
                    cmd=[str(BIN / "mlpipe"), "serve", "--model-dir", str(tmp / "m" / name), "--port", str(port),
                         "--workers", "2", "--capture-sample", "0"], url=f"http://127.0.0.1:{port}/v2/health/ready", env=env)
                yield gunicorn(label, "ceiling", "ceiling:app")
                port = free_port()
                yield label, "mlpipe cap", [("inv", "/invocations")], port, dict(
                    cmd=[str(BIN / "mlpipe"), "serve", "--model-dir", str(tmp / "m" / name), "--port", str(port),
                         "--workers", "2", "--capture-db", f"sqlite:///{tmp}/capture-{name}.db"],
                    url=f"http://127.0.0.1:{port}/v2/health/ready", env=env)
                if mlflow_bin:
                    port = free_port()
                    yield label, "mlflow", [("inv", "/invocations")], port, dict(
                        cmd=[str(mlflow_bin / "mlflow"), "models", "serve", "-m", str(tmp / "mlflow" / name),
                             "--env-manager", "local", "-w", "2", "-h", "127.0.0.1", "-p", str(port)],
                        url=f"http://127.0.0.1:{port}/ping", env={**os.environ, "PATH": f"{mlflow_bin}:{os.environ['PATH']}"})
                if mlserver_bin:
                    port, folder = free_port(), tmp / "mlserver" / name
                    (folder / "settings.json").write_text(json.dumps(
                        {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                         "parallel_workers": 2, "debug": False, "metrics_dir": str(folder / ".metrics"),
                         "environments_dir": str(folder / ".envs")}))
                    yield label, "mlserver", [("oip", f"/v2/models/{name}/infer")], port, dict(
                        cmd=[str(mlserver_bin / "mlserver"), "start", str(folder)], cwd=folder,
                        url=f"http://127.0.0.1:{port}/v2/models/{name}/ready",
                        env={**os.environ, "PATH": f"{mlserver_bin}:{os.environ['PATH']}"})
            yield gunicorn("-", "flask", "flask_app:app")

        results: dict = {}
        ready: dict = {}
        for rnd in range(args.rounds):
            plan = list(servers())
            for label, server, paths, port, how in (plan if rnd % 2 == 0 else plan[::-1]):
                proc, t = start(how["cmd"], how["url"], how["env"], tmp / f"{server.replace(' ', '-')}.log", how.get("cwd"))
                ready.setdefault(server, []).append(t)
                try:
                    for proto, path in paths:
                        url = f"http://127.0.0.1:{port}{path}"
                        check = requests.post(url, data=bodies[(proto, 1)], headers={"Content-Type": "application/json"})
                        assert check.status_code == 200, f"{server} {path}: {check.status_code} {check.text[:500]}"
                        for rows in ROWS:
                            cpu = group_cpu(proc.pid)
                            r = wrk(url, bodies[(proto, rows)], args.seconds, args.connections, tmp)
                            r["cpu_us"] = (group_cpu(proc.pid) - cpu) / max(r["requests"], 1) * 1e6
                            results.setdefault((label, server, proto, rows), []).append(r)
                finally:
                    stop_group(proc)
            print(f"round {rnd + 1}/{args.rounds} done, load average {loadavg()}", file=sys.stderr)

    def agg(key):
        runs = results.get(key)
        if not runs:
            return None
        return {k: statistics.mean(r[k] for r in runs) for k in ("rps", "p50", "p99", "cpu_us")} | {
            "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs)}

    print(f"\nwrk -t2 -c{args.connections} -d{args.seconds}s, Connection: close, 2 workers each, mean of {args.rounds} "
          f"interleaved rounds; {os.cpu_count()} CPUs; load average (1/5/15 min) before {load_before}, after {loadavg()}\n")
    print(f"{'model':<20}{'rows':>5}  {'server':<12}{'protocol':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}")
    proto_name = {"inv": "/invocations", "oip": "OIP v2 infer"}
    order = ["mlpipe", "mlpipe cap", "mlflow", "mlserver", "ceiling", "flask"]
    for key in sorted(results, key=lambda k: (k[0] == "-", k[0], k[3], order.index(k[1]), k[2])):
        label, server, proto, rows = key
        a = agg(key)
        print(f"{label:<20}{rows:>5}  {server:<12}{proto_name[proto]:<14}{a['rps']:>9.0f}{a['p50']:>9.2f}{a['p99']:>9.2f}"
              f"{a['cpu_us']:>12.0f}{a['errors']:>8}")

    def ratio(ours, theirs, what="rps", times=False):
        """Mean of the per-round ratios [lowest-highest]: each round's two runs were close in time."""
        a, b = results.get(ours), results.get(theirs)
        if not a or not b:
            return "n/a"
        rs = [y[what] / x[what] if what == "cpu_us" else x[what] / y[what] for x, y in zip(a, b)]
        fmt = ((lambda v: f"x{v:.1f}") if times else (lambda v: f"{v:.0%}") if what in ("rps", "cpu_us")
               else (lambda v: f"{v:.2f}"))
        return f"{fmt(statistics.mean(rs))} [{fmt(min(rs))}-{fmt(max(rs))}]"

    print("\nratios, mean of the rounds' ratios [lowest-highest round]")
    for label in models:
        for rows in ROWS:
            inv, oip = (label, "mlpipe", "inv", rows), (label, "mlpipe", "oip", rows)
            ceiling = (label, "ceiling", "inv", rows)
            ms = (label, "mlserver", "oip", rows)
            print(f"  {label} {rows} row(s): mlpipe throughput {ratio(oip, ms, times=True)} MLServer's (OIP; p99 "
                  f"{ratio(oip, ms, 'p99')}; by CPU per request {ratio(oip, ms, 'cpu_us', times=True)}), "
                  f"{ratio(inv, (label, 'mlflow', 'inv', rows), times=True)} MLflow's (/invocations; p99 "
                  f"{ratio(inv, (label, 'mlflow', 'inv', rows), 'p99')});\n      {ratio(inv, ceiling)} of the ceiling "
                  f"(/invocations), {ratio(oip, ceiling)} (OIP); by server CPU per request {ratio(inv, ceiling, 'cpu_us')} "
                  f"(/invocations), {ratio(oip, ceiling, 'cpu_us')} (OIP);\n      capture at the spec default 10%: "
                  f"{ratio((label, 'mlpipe cap', 'inv', rows), inv)} of capture off")
    flask, bare = agg(("-", "flask", "inv", 1)), agg((next(iter(models)), "ceiling", "inv", 1))
    print(f"  the ceiling behind Flask (1 row): {flask['rps'] / bare['rps']:.0%} of the bare ceiling's throughput "
          f"(not adjacent runs), {bare['cpu_us'] / flask['cpu_us']:.0%} by CPU per request")
    for server, ts in ready.items():
        print(f"  start to ready, {server:<10} median {statistics.median(ts):.2f} s (max {max(ts):.2f} s)")
    print("\ngoals (issue 12): LogisticRegression 1 row >= 85% of the ceiling and ahead of MLServer; "
          "earlier: >= 15x MLflow, RandomForest 1 row >= 25x MLflow, p99 <= 0.1 of MLflow's, start to ready < 2 s")


if __name__ == "__main__":
    main()
