"""What does a skipped `mlpipe retrain` cost on a big CSV, next to a retrain that trains?

cron runs `mlpipe retrain SPEC` every hour or so; most runs find too few new rows and skip. A skip
still reads the whole source, hashes every row and compares the hashes with the rows the champion
(the `retrain.promote` alias) was trained on. This measures, on a 1M-row CSV (20 numeric features
and a binary target, written once into a temp dir):

  (a) a skipped run with no new data                       (exit 0, "no new data since v1")
  (b) a skipped run after appending fewer than min_new_rows  (exit 0, "N new rows since v1, needs M")
  (c) a full `mlpipe retrain SPEC --force` that trains, gates and registers a challenger
  floor: a process that only runs pandas.read_csv on the file, and one that only starts the CLI

All are whole processes, run interleaved, the median of N runs each; the skips are printed as
ratios to the full run, and the read_csv floor as a share of each skip.

Usage: python benchmarks/retrain_skip.py [--runs 3] [--rows 1000000] [--new-rows 500] [--min-new-rows 1000]
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

READ_CSV = "import sys, pandas as pd; pd.read_csv(sys.argv[1])"


def make_csv(path: Path, rows: int, seed: int, features: int = 20) -> None:
    """Random numeric features (4 decimals: rows are distinct and the file is ~150 bytes a row)
    and a target that depends on a few of them."""
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).round(4)
    logit = X[:, 0] - 0.8 * X[:, 1] + 0.5 * X[:, 2] * X[:, 3] + rng.normal(scale=0.5, size=rows)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(features)])
    df["target"] = (logit > 0).astype(int)
    df.to_csv(path, index=False, float_format="%.4f")


def spec(name: str, csv: Path, min_new_rows: int) -> dict:
    return {"name": name, "data": {"source": f"csv:{csv}", "target": "target"},
            "split": {"test_size": 0.2, "random_state": 1, "stratify": True},
            "model": {"estimator": "sklearn.tree.DecisionTreeClassifier",
                      "params": {"max_depth": 10, "random_state": 1}},
            "metrics": ["accuracy", "f1_macro"],
            "gate": {"min": {"accuracy": 0.6}},
            "retrain": {"min_new_rows": min_new_rows, "cooldown": "0s", "promote": "production", "deploy": False}}


def timed(cmd: list[str], env: dict, want_rc: tuple[int, ...], want_out: str | None = None) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if p.returncode not in want_rc or (want_out and want_out not in p.stdout):
        sys.exit(f"{' '.join(cmd[-3:])}: exit {p.returncode} (wanted {want_rc}, output with {want_out!r})\n"
                 f"{p.stdout}{p.stderr}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--new-rows", type=int, default=500, help="rows appended for (b); fewer than --min-new-rows")
    ap.add_argument("--min-new-rows", type=int, default=1000)
    args = ap.parse_args()
    if args.new_rows >= args.min_new_rows:
        sys.exit("--new-rows must be fewer than --min-new-rows (run (b) must skip)")
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-retrain-") as tmp:
        tmp = Path(tmp)
        base, grown = tmp / "data.csv", tmp / "data-grown.csv"
        t = time.perf_counter()
        make_csv(base, args.rows, seed=0)
        make_csv(tmp / "new.csv", args.new_rows, seed=1)
        with open(grown, "wb") as out:  # the same file with new rows appended (header once)
            out.write(base.read_bytes())
            out.writelines((tmp / "new.csv").read_bytes().splitlines(keepends=True)[1:])
        size = base.stat().st_size
        print(f"wrote {args.rows:,} rows x 20 features + target ({size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        # one model, two specs: the champion's own data, and the same data with new rows appended
        (tmp / "same.yml").write_text(yaml.safe_dump(spec("bench-retrain", base, args.min_new_rows)))
        (tmp / "grown.yml").write_text(yaml.safe_dump(spec("bench-retrain", grown, args.min_new_rows)))
        env = {**os.environ, "MLPIPE_REGISTRY": str(tmp / "reg"), "PYTHONUNBUFFERED": "1"}
        env.pop("MLPIPE_CACHE", None)
        mlpipe = [sys.executable, "-m", "mlpipe"]
        # the champion: v1 trained on data.csv, promoted to production (exit 10)
        first = timed(mlpipe + ["retrain", str(tmp / "same.yml"), "--force"], env, (10,), "promoted")
        print(f"champion v1 trained and promoted in {first:.1f} s", file=sys.stderr)

        runs = {k: [] for k in ("read_csv", "cli", "same", "grown", "full")}
        for i in range(args.runs):
            runs["read_csv"].append(timed([sys.executable, "-c", READ_CSV, str(base)], env, (0,)))
            runs["cli"].append(timed(mlpipe + ["retrain", "--help"], env, (0,)))
            runs["same"].append(timed(mlpipe + ["retrain", str(tmp / "same.yml")], env, (0,), "no new data"))
            runs["grown"].append(timed(mlpipe + ["retrain", str(tmp / "grown.yml")], env, (0,),
                                       f"{args.new_rows} new rows since v"))
            # a challenger on the same rows: promoted or rejected by the gate, either way it trained
            runs["full"].append(timed(mlpipe + ["retrain", str(tmp / "same.yml"), "--force"], env, (10, 11), "challenger"))
            print(f"run {i + 1}/{args.runs}: " + " ".join(f"{k}={v[-1]:.2f}s" for k, v in runs.items()), file=sys.stderr)
        m = {k: statistics.median(v) for k, v in runs.items()}
        full = m["full"]
        print(f"retrain on a {args.rows:,}-row CSV ({size / 1e6:.0f} MB, 20 features + binary target), "
              f"DecisionTree(max_depth=10), min_new_rows={args.min_new_rows}, median of {args.runs}, interleaved")
        print(f"  (c) full retrain --force (trains, gates, registers)   {full:7.2f} s   ratio 1.00")
        for key, label in (("same", "(a) skipped: no new data"),
                           ("grown", f"(b) skipped: {args.new_rows} new rows < {args.min_new_rows}")):
            print(f"  {label:<52} {m[key]:7.2f} s   ratio to full {m[key] / full:5.2f}   "
                  f"read_csv is {m['read_csv'] / m[key]:4.0%} of it")
        print(f"  floor: a process that only runs pandas.read_csv       {m['read_csv']:7.2f} s   ratio to full {m['read_csv'] / full:5.2f}")
        print(f"  floor: a process that only starts the CLI (--help)    {m['cli']:7.2f} s")
        over = m["same"] - m["read_csv"]
        print(f"  a skip costs {over:.2f} s beyond reading the CSV (imports, row hashes, the champion's hashes, ledger)")


if __name__ == "__main__":
    main()
