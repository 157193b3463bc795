"""How much does `mlpipe train` cost over a plain scikit-learn script, and how fast are pulls?

1. `mlpipe train` (spec validation, data fingerprint, split, fit, metrics, manifest, sha256,
   registration) against a plain script that reads the same CSV, splits it the same way, fits the
   same estimator, scores the same metrics and dumps it with joblib. Both are whole processes
   (interpreter start and imports included), run interleaved, the median of N runs each.
   Target: ratio <= 1.10 on a model that trains for a few seconds, for the default (which compiles
   the model to ONNX and checks that it agrees with scikit-learn on the test split) and for
   --no-onnx. The ONNX step overlaps what it can: its imports run during the fit, it reuses the
   test-split predictions scoring made, and a forest's graph is built with numpy (the same bytes
   skl2onnx writes; tests compare them).
2. Registry pull latency of one version: file://, s3:// (moto_server on loopback) and Redis-cache
   hits in front of S3, as ratios to the file pull.

Usage: python benchmarks/train_overhead.py [--runs 3] [--trees 150]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _servers import moto_server, redis_server  # noqa: E402

PLAIN = """
import sys, joblib, pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import get_scorer
from sklearn.model_selection import train_test_split
df = pd.read_csv(sys.argv[1])
X, y = df.drop(columns=["target"]), df["target"]
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=1, stratify=y)
m = RandomForestClassifier(n_estimators=int(sys.argv[3]), random_state=1, n_jobs=1).fit(Xtr, ytr)
print({n: get_scorer(n)(m, Xte, yte) for n in ("accuracy", "f1_macro")})
joblib.dump(m, sys.argv[2])
"""


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--trees", type=int, default=150)
    ap.add_argument("--rows", type=int, default=20000)
    args = ap.parse_args()
    from sklearn.datasets import make_classification
    import pandas as pd
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        X, y = make_classification(n_samples=args.rows, n_features=30, n_informative=12, random_state=0)
        df = pd.DataFrame(X, columns=[f"f{i}" for i in range(30)])
        df["target"] = y
        df.to_csv(tmp / "data.csv", index=False)
        spec = {"name": "bench", "data": {"source": f"csv:{tmp / 'data.csv'}", "target": "target"},
                "split": {"test_size": 0.2, "random_state": 1, "stratify": True},
                "model": {"estimator": "sklearn.ensemble.RandomForestClassifier",
                          "params": {"n_estimators": args.trees, "random_state": 1, "n_jobs": 1}},
                "metrics": ["accuracy", "f1_macro"]}
        (tmp / "spec.yml").write_text(yaml.safe_dump(spec))
        (tmp / "plain.py").write_text(PLAIN)
        env = {**os.environ, "MLPIPE_REGISTRY": str(tmp / "reg")}
        mlpipe = [sys.executable, "-m", "mlpipe", "train", str(tmp / "spec.yml")]
        plain, ours, ours_onnx = [], [], []
        for _ in range(args.runs):
            plain.append(timed([sys.executable, str(tmp / "plain.py"), str(tmp / "data.csv"), str(tmp / "m.joblib"), str(args.trees)], env))
            ours.append(timed(mlpipe + ["--no-onnx"], env))
            ours_onnx.append(timed(mlpipe, env))
        p, o, oo = (statistics.median(x) for x in (plain, ours, ours_onnx))
        print(f"train ({args.rows} rows x 30 features, RandomForest({args.trees}), median of {args.runs}, interleaved)")
        print(f"  plain scikit-learn script   {p:7.2f} s")
        print(f"  mlpipe train (default)      {oo:7.2f} s   ratio {oo / p:5.2f}   (target <= 1.10; ONNX compile + agreement check included)")
        print(f"  mlpipe train --no-onnx      {o:7.2f} s   ratio {o / p:5.2f}   (target <= 1.10)")
        print(f"  the ONNX step adds          {oo - o:7.2f} s   ({(oo - o) / p:5.1%} of the plain script)")
        from mlpipe.registry import Registry
        reg = Registry(str(tmp / "reg"))
        info = reg.manifest("bench", reg.versions("bench")[-1])["onnx"]  # the last run was a default one
        if info.get("status") != "ok":
            sys.exit(f"the default run stored no model.onnx: {info}")
        print(f"  (its model.onnx: {info['precision']}, {info['check']}, {info['rows']} rows)")

        # --- pull latency: the big forest just trained, and a small typical model
        subprocess.run([sys.executable, "-m", "mlpipe", "train", str(Path(__file__).parent.parent / "examples" / "credit-risk.yml")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        with moto_server() as endpoint, redis_server() as redis_url:
            os.environ["MLPIPE_S3_ENDPOINT_URL"] = endpoint
            import boto3
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            for model in ("credit-risk", "bench"):
                pull_latency(tmp, model, redis_url)


def pull_latency(tmp: Path, model: str, redis_url: str, n: int = 15) -> None:
    import json
    from mlpipe.registry import Registry
    src = Registry(str(tmp / "reg"))
    manifest, blobs = src.fetch(model, 1)
    work = tmp / f"one-{model}"
    work.mkdir()
    for f, b in blobs.items():
        (work / f).write_bytes(b)
    (work / "manifest.json").write_text(json.dumps(manifest))
    regs = {"file": Registry(str(tmp / f"reg-{model}")), "s3": Registry(f"s3://bench/{model}"),
            "redis cache hit (over s3)": Registry(f"s3://bench/{model}", cache=redis_url)}
    regs["file"].register(work)
    regs["s3"].register(work)
    size = sum(m["size"] for m in manifest["files"].values())
    results = {}
    for label, reg in regs.items():
        slug = label.split()[0]
        reg.pull(f"{model}:1", tmp / "warm" / model / slug)  # fills the cache
        times = []
        for i in range(n):
            t = time.perf_counter()
            reg.pull(f"{model}:1", tmp / "pulls" / model / f"{slug}-{i}")
            times.append(time.perf_counter() - t)
        results[label] = statistics.median(times)
    base = results["file"]
    print(f"\nregistry pull of {model}:1 ({size / 1e6:.2f} MB, sha256-verified), median of {n}")
    for label, t in results.items():
        print(f"  {label:<28} {t * 1000:8.1f} ms   ratio to file {t / base:5.2f}")
    print(f"  redis-cache hit vs s3: {results['s3'] / results['redis cache hit (over s3)']:5.2f}x faster"
          f" (moto on loopback has no network latency; real S3 adds ~20-50 ms a request)")

if __name__ == "__main__":
    main()
