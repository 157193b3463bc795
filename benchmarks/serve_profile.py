"""Where does one prediction request's time go inside mlpipe's WSGI app, next to the bare ceiling app of
benchmarks/serve_vs_mlflow.py? In-process, no sockets: the app is called with a prepared environ, so
what gunicorn costs (accept, HTTP parsing, writing, closing; the same for both) is left out.

Prints microseconds per request for the ceiling function and for mlpipe's /invocations and OIP v2
infer (1-row LogisticRegression on breast_cancer, capture off, served as `mlpipe serve` would: its
linear.json scorer (mlpipe.linear) for small requests, else its ONNX export; metrics in a
multi-process folder), then cProfile's top functions of the mlpipe path by own time and by
cumulative time, so the next thing to cut is named. For the whole
worker under load (gunicorn's share included), sample a live worker instead, e.g.
`py-spy record -p <worker pid> -f raw` while wrk runs.

Usage: python benchmarks/serve_profile.py [--requests 20000] [--rows 1] [--top 25]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ceiling_app(environ, start_response):  # the same function benchmarks/serve_vs_mlflow.py serves
    n = int(environ.get("CONTENT_LENGTH") or 0)
    if n:
        json.loads(environ["wsgi.input"].read(n))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "20")])
    return [b'{"predictions": [0]}']


def environ_for(path: str, body: bytes) -> dict:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8000", "HTTP_CONNECTION": "close",
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
            "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.version": (1, 0)}


def run(app, path: str, body: bytes, n: int) -> float:
    status = []

    def start_response(s, headers, exc_info=None):
        status.append(s)
    t0 = time.perf_counter()
    for _ in range(n):
        status.clear()
        b"".join(app(environ_for(path, body), start_response))
    assert status[0].startswith("200"), status
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    import yaml
    from sklearn.datasets import load_breast_cancer
    frame = load_breast_cancer(as_frame=True).frame
    cols = [c for c in frame.columns if c != "target"]
    data = frame[cols].head(args.rows).values
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prom").mkdir()
        # metrics into mmap'd files as in a gunicorn worker (set before prometheus_client is imported)
        os.environ.update(MLPIPE_REGISTRY=str(tmp / "reg"), MLPIPE_FLEET_ROOT=str(tmp / "fleet"),
                          PROMETHEUS_MULTIPROC_DIR=str(tmp / "prom"))
        spec = {"name": "prof", "data": {"source": "sklearn:breast_cancer", "target": "target"},
                "split": {"test_size": 0.2, "random_state": 1}, "metrics": ["accuracy"],
                "model": {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 5000}}}
        (tmp / "prof.yml").write_text(yaml.safe_dump(spec))
        for cmd in (["train", str(tmp / "prof.yml")], ["models", "pull", "prof:1", "--dest", str(tmp / "m"), "--activate"]):
            subprocess.run([sys.executable, "-m", "mlpipe", *cmd], check=True, stdout=subprocess.DEVNULL)
        from mlpipe.serve import create_app
        app = create_app({"model_dir": str(tmp / "m"), "capture_sample": 0})
        cases = {
            "ceiling": (ceiling_app, "/invocations",
                        json.dumps({"dataframe_split": {"columns": cols, "data": data.tolist()}}).encode()),
            "mlpipe /invocations": (app, "/invocations",
                                    json.dumps({"dataframe_split": {"columns": cols, "data": data.tolist()}}).encode()),
            "mlpipe OIP v2": (app, "/v2/models/prof/infer", json.dumps({"inputs": [{
                "name": "input-0", "shape": list(data.shape), "datatype": "FP64", "data": data.ravel().tolist()}]}).encode()),
        }
        for name, (a, path, body) in cases.items():
            run(a, path, body, 500)  # warm up
            print(f"{name:<22}{run(a, path, body, args.requests):8.1f} us per request (in process, {args.rows} row(s))")
        for name in ("mlpipe /invocations", "mlpipe OIP v2"):
            a, path, body = cases[name]
            prof = cProfile.Profile()
            prof.enable()
            run(a, path, body, args.requests)
            prof.disable()
            for key in ("tottime", "cumulative"):
                print(f"\n--- {name}: top {args.top} by {key} ({args.requests} requests)")
                s = io.StringIO()
                pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(args.top)
                print(s.getvalue().split("\n\n", 1)[-1].strip())


if __name__ == "__main__":
    main()
