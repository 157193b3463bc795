"""How long does `mlpipe monitor` take, and how much memory, on a million captured predictions?

cron runs `mlpipe monitor SPEC` every few minutes per model; a busy model with capture at 100% can
have a million captured rows in its window. This trains a LogisticRegression on breast_cancer (30
numeric features, baseline statistics stored with the version) into a temp registry, fills a capture
database with --rows captured predictions of that model and version (inputs resampled from the data,
one feature shifted so drift is there to find; predictions from the model; written through
capture.Store.write in big batches, the serving hosts' own write path), attaches true labels to
--labelled of them (capture.Store.attach_labels), and then times, each in a fresh process (so peak
RSS is that run's own), interleaved, the median of --runs:

  monitor.run      monitor.run(spec, reg, store) in-process, with the window covering every row; its
                   breakdown (read: capture.Store.predictions, drift, quality) from wrappers around
                   monitor's own functions
  mlpipe monitor   the CLI (`mlpipe monitor SPEC --json --db URL`), what cron runs
  floor: predictions  only capture.Store.predictions(model, since, until, version): the read the monitor does
  floor: bare SELECT  only pandas.read_sql of the same rows and columns (the JSON inputs left unparsed)

The spec alerts on drift > 0.2 and accuracy < 0.8 (min_labelled 100); notify has no webhook, so a
breach is a log line and a ledger event. SQLite by default; --db postgres (or both) fills and
measures a PostgreSQL started as a child process (tests/postgres.py). Nothing here asserts a time.

Usage: python benchmarks/monitor_scale.py [--rows 1000000] [--labelled 100000] [--runs 3] [--db sqlite|postgres|both]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _servers  # noqa: E402,F401  (puts tests/ on sys.path for tests/postgres.py)

MODEL = "bench-monitor"
SHIFTED = "mean radius"   # the feature whose live values are shifted (by half a standard deviation)


def spec_doc() -> dict:
    return {"name": MODEL, "data": {"source": "sklearn:breast_cancer", "target": "target"},
            "split": {"test_size": 0.2, "random_state": 1},
            "model": {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 5000}},
            "metrics": ["accuracy"],
            "capture": {"sample": 1.0},
            "alerts": [{"when": "drift > 0.2", "do": ["notify"]},
                       {"when": "accuracy < 0.8", "min_labelled": 100, "do": ["notify"]}],
            "notify": {"repeat": "1h"},
            "monitor": {"window": "1d"}}


def fill(url: str, model_file: Path, rows: int, labelled: int, now: float, batch: int = 50_000) -> dict:
    """--rows captured predictions over the last hour, and labels for the first --labelled of them."""
    import joblib
    import numpy as np
    from sklearn.datasets import load_breast_cancer

    from mlpipe import capture
    data = load_breast_cancer(as_frame=True).frame
    features = [c for c in data.columns if c != "target"]
    model = joblib.load(model_file)
    rng = np.random.default_rng(0)
    store = capture.Store(url)
    t_write = t_gen = 0.0
    written = 0
    labels: list = []
    for start in range(0, rows, batch):
        t = time.perf_counter()
        n = min(batch, rows - start)
        idx = rng.integers(0, len(data), size=n)
        X = data[features].iloc[idx].reset_index(drop=True)
        X = X * rng.normal(1.0, 0.02, size=X.shape)  # resampled rows, a little noise
        X[SHIFTED] = X[SHIFTED] + 0.5 * data[SHIFTED].std()
        X = X.round(4)
        pred = model.predict(X)
        truth = data["target"].to_numpy()[idx]
        flip = rng.random(n) < 0.25  # live quality below the alert's 0.8
        truth = np.where(flip, 1 - truth, truth)
        inputs = X.to_json(orient="records", lines=True, double_precision=4).splitlines()
        ts = now - 3600 + 3600 * (start + np.arange(n)) / rows
        recs = [{"request_id": f"r{start + i:08d}", "row": 0, "model": MODEL, "version": 1,
                 "host": f"bench-{i % 3}", "ts": float(ts[i]), "latency_ms": 2.0, "inputs": inputs[i],
                 "prediction": int(pred[i])} for i in range(n)]
        take = max(0, min(n, labelled - start))
        labels += [(f"r{start + i:08d}", 0, int(truth[i])) for i in range(take)]
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        written += store.write(recs)
        t_write += time.perf_counter() - t
        print(f"  {written:,}/{rows:,} rows written ({written / t_write:,.0f} rows/s)", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    t = time.perf_counter()
    res = {"stored": 0, "matched": 0}
    for i in range(0, len(labels), 50_000):
        r = store.attach_labels(MODEL, labels[i:i + 50_000], source="benchmark")
        res = {k: res[k] + r[k] for k in res}
    t_labels = time.perf_counter() - t
    count = store.count(MODEL)
    store.close()
    size = ""
    if url.startswith("sqlite:///"):
        size = f", {Path(url[len('sqlite:///'):]).stat().st_size / 1e6:,.0f} MB file"
    return {"rows": count, "write_s": t_write, "gen_s": t_gen, "labels": res["matched"], "labels_s": t_labels,
            "size": size}


# ------------------------------------------------------------------------- measured, in a child process
def child(what: str, url: str, spec_path: str, now: float) -> dict:
    from mlpipe import capture
    out: dict = {}
    t0 = time.perf_counter()
    if what == "monitor":
        from mlpipe import monitor, spec as spec_mod
        from mlpipe.registry import Registry
        parts: dict = {}

        def timed(name, fn):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
            return wrapper
        store = capture.Store(url)
        store.records = timed("read: SELECT + JSON (Store.records)", store.records)
        monitor._window_frame = timed("read: Store.predictions", monitor._window_frame)
        monitor.drift = timed("drift (PSI + KS, 30 features + prediction)", monitor.drift)
        monitor.measure_quality = timed("quality (accuracy on labelled)", monitor.measure_quality)
        monitor.load_baseline = timed("baseline.json", monitor.load_baseline)
        lines: list = []
        t0 = time.perf_counter()
        report = monitor.run(spec_mod.load(spec_path), Registry(None), store, now=now, log=lines.append)
        out["parts"] = parts
        w = report["windows"]["1d"]
        out["rows"], out["labelled"] = w.get("rows"), w.get("labelled")
        out["summary"] = report["summary"].splitlines()[0]
        out["exit_code"] = report["exit_code"]
    elif what == "predictions":
        frame = capture.Store(url).predictions(MODEL, since=now - 86400, until=now + 1, version=1)
        out["rows"] = len(frame)
    elif what == "select":
        import pandas as pd
        import sqlalchemy as sa
        store = capture.Store(url)
        p, f = capture.predictions_table, capture.feedback_table
        q = sa.select(p.c.request_id, p.c.row, p.c.model, p.c.version, p.c.host, p.c.ts, p.c.latency_ms,
                      p.c.inputs, p.c.prediction, f.c.label).select_from(
            p.outerjoin(f, sa.and_(f.c.request_id == p.c.request_id, f.c.row == p.c.row, f.c.model == p.c.model))
        ).where(p.c.model == MODEL, p.c.ts >= now - 86400, p.c.ts < now + 1, p.c.version == 1)
        with store.engine.connect() as conn:
            frame = pd.read_sql(q, conn)
        out["rows"] = len(frame)
    out["seconds"] = time.perf_counter() - t0
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_child(cmd: list[str], env: dict, want_rc: tuple[int, ...]) -> dict:
    """Popen + os.wait4 so the peak RSS is this child's, not the largest of all children so far."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode not in want_rc:
        sys.exit(f"{' '.join(cmd[:6])} ...: exit {proc.returncode}\n{stdout[-2000:]}{stderr[-3000:]}")
    return {"wall": wall, "maxrss_mb": usage.ru_maxrss / 1024, "stdout": stdout, "stderr": stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--labelled", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"), default="sqlite")
    ap.add_argument("--child", nargs=4, metavar=("WHAT", "URL", "SPEC", "NOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, url, spec_path, now = args.child
        print(json.dumps(child(what, url, spec_path, float(now)), default=str))
        return

    import yaml
    load_before = os.getloadavg()
    pg = None
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-monitor-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MLPIPE_REGISTRY": str(tmp / "reg"), "MLPIPE_FLEET_ROOT": str(tmp / "root"),
               "MLPIPE_LOG_DIR": str(tmp / "logs"), "PYTHONUNBUFFERED": "1"}
        for k in ("MLPIPE_CAPTURE_DB", "MLPIPE_CACHE"):
            env.pop(k, None)
        os.environ.update({k: env[k] for k in ("MLPIPE_REGISTRY", "MLPIPE_FLEET_ROOT", "MLPIPE_LOG_DIR")})
        spec_path = tmp / f"{MODEL}.yml"
        spec_path.write_text(yaml.safe_dump(spec_doc(), sort_keys=False))
        subprocess.run([sys.executable, "-m", "mlpipe", "train", str(spec_path)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "mlpipe", "models", "pull", f"{MODEL}:1", "--dest", str(tmp / "m")],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        now = time.time()
        try:
            dbs: dict[str, str] = {}
            if args.db in ("sqlite", "both"):
                dbs["SQLite"] = f"sqlite:///{tmp / 'capture.db'}"
            if args.db in ("postgres", "both"):
                from postgres import PostgresServer
                pg = PostgresServer()
                dbs["PostgreSQL"] = pg.url
            fills = {}
            for label, url in dbs.items():
                print(f"filling {label} with {args.rows:,} captured rows", file=sys.stderr)
                fills[label] = fill(url, tmp / "m" / "1" / "model.joblib", args.rows, args.labelled, now)

            me = [sys.executable, str(Path(__file__).resolve()), "--child"]
            cases = {
                "monitor.run (in-process)": lambda url: (me + ["monitor", url, str(spec_path), str(now)], True, (0,)),
                "mlpipe monitor (CLI)": lambda url: ([sys.executable, "-m", "mlpipe", "monitor", str(spec_path),
                                                      "--json", "--db", url], False, (0, 14)),
                "floor: Store.predictions": lambda url: (me + ["predictions", url, str(spec_path), str(now)], True, (0,)),
                "floor: bare SELECT (read_sql)": lambda url: (me + ["select", url, str(spec_path), str(now)], True, (0,)),
            }
            results: dict = {}
            for i in range(args.runs):
                order = list(cases.items()) if i % 2 == 0 else list(cases.items())[::-1]
                for label, url in dbs.items():
                    for case, make in order:
                        cmd, is_child, rcs = make(url)
                        r = run_child(cmd, env, rcs)
                        if is_child:
                            r["child"] = json.loads(r["stdout"].strip().splitlines()[-1])
                        else:
                            rep = json.loads(r["stdout"])
                            r["child"] = {"rows": rep["windows"]["1d"].get("rows"), "exit_code": rep["exit_code"],
                                          "labelled": rep["windows"]["1d"].get("labelled"),
                                          "summary": rep["summary"].splitlines()[0]}
                        results.setdefault((label, case), []).append(r)
                        print(f"run {i + 1}/{args.runs} {label} {case}: {r['wall']:.1f} s, "
                              f"peak RSS {r['maxrss_mb']:,.0f} MB", file=sys.stderr)
        finally:
            if pg is not None:
                pg.cleanup()
    load_after = os.getloadavg()

    print(f"\nmlpipe monitor on {args.rows:,} captured rows (breast_cancer, 30 numeric features, LogisticRegression), "
          f"{args.labelled:,} of them labelled; window 1d covers every row; each case a fresh process, "
          f"median of {args.runs}, interleaved")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} (2 cores)")
    for label in dbs:
        f = fills[label]
        print(f"\n{label}: {f['rows']:,} rows{f['size']}; filled through Store.write in {f['write_s']:.1f} s "
              f"({f['rows'] / f['write_s']:,.0f} rows/s), {f['labels']:,} labels attached in {f['labels_s']:.1f} s")
        floor = statistics.median(r["wall"] for r in results[(label, "floor: bare SELECT (read_sql)")])
        print(f"  {'case':<32}{'wall s':>8}{'rows/s':>12}{'peak RSS MB':>13}{'x bare SELECT':>15}{'rows':>10}{'labelled':>10}")
        for case in cases:
            runs = results[(label, case)]
            wall = statistics.median(r["wall"] for r in runs)
            rss = max(r["maxrss_mb"] for r in runs)
            c = runs[-1]["child"]
            print(f"  {case:<32}{wall:>8.1f}{args.rows / wall:>12,.0f}{rss:>13,.0f}{wall / floor:>15.2f}"
                  f"{c.get('rows', ''):>10}{c.get('labelled', '') if c.get('labelled') is not None else '':>10}")
        mon = results[(label, "monitor.run (in-process)")]
        inproc = statistics.median(r["child"]["seconds"] for r in mon)
        print(f"  breakdown of monitor.run (median seconds inside the process; {inproc:.1f} s from the call to the report):")
        names = list(mon[0]["child"]["parts"])
        for n in names:
            v = statistics.median(r["child"]["parts"].get(n, 0.0) for r in mon)
            print(f"    {n:<46}{v:>7.2f} s  {v / inproc:5.0%}")
        rest = inproc - statistics.median(r["child"]["parts"].get("read: Store.predictions", 0.0) + sum(
            v for k, v in r["child"]["parts"].items() if not k.startswith("read")) for r in mon)
        print(f"    {'the rest (window filter, state, ledger, report)':<46}{rest:>7.2f} s  {rest / inproc:5.0%}")
        print("    (read: Store.predictions includes read: Store.records; imports and process start are outside)")
        print(f"  report: {mon[-1]['child']['summary']} (exit {mon[-1]['child']['exit_code']})")


if __name__ == "__main__":
    main()
