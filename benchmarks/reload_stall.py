"""Does switching versions stall a host that is serving (not drained)? `mlpipe serve` (gunicorn, 2 sync
workers) under a steady load of one-row requests while the version is switched again and again, three
ways side by side in one run:

  steady   no switch: the baseline of the latency figures
  follow   `current` switched (what `mlpipe fleet activate` does now): each worker loads the new version
           beside the old one in a thread and swaps them; no worker stops
  HUP      `current` switched and the gunicorn master sent SIGHUP (what a deploy did before, and what a
           configuration change still does): new workers are forked and the old ones stopped

For each: requests, failed requests, p50 / p99 / max latency, and the longest time no request completed
(the stall a client sees). The model is a RandomForest (100 trees, served through ONNX Runtime), two
versions, so a load takes a realistic share of a second. Nothing here asserts a time.

Goal (issue 12): 0 failed requests and no stall longer than 100 ms when a non-drained host switches.

Usage: python benchmarks/reload_stall.py [--switches 6] [--clients 4] [--gap 1.5]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import free_port, start_serve, stop_group  # noqa: E402

BIN = Path(sys.executable).parent


def client(url: str, body: str, stop: threading.Event, out: list) -> None:
    headers = {"Content-Type": "application/json", "X-Mlpipe-Capture": "off"}
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            r = requests.post(url, data=body, headers=headers, timeout=30)
            ok = r.status_code == 200
        except requests.RequestException:
            ok = False
        out.append((t0, time.monotonic(), ok))


def served(base: str) -> set:
    from mlpipe.fleet import served_versions
    return served_versions(base, None) or set()


def measure(mode: str, base: str, body: str, model_dir: Path, pidfile: Path, switches: int, gap: float,
            clients: int) -> dict:
    from mlpipe import hostdir
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=client, args=(f"{base}/invocations", body, stop, out)) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    begin = time.monotonic()
    waits = []
    for i in range(switches):
        time.sleep(gap)
        if mode == "steady":
            continue
        version = 2 if hostdir.current(model_dir) == 1 else 1
        t0 = time.monotonic()
        hostdir.activate(model_dir, version)
        if mode == "HUP":
            os.kill(int(pidfile.read_text()), signal.SIGHUP)
        deadline = time.monotonic() + 60
        while served(base) != {version} and time.monotonic() < deadline:
            time.sleep(0.05)
        waits.append(time.monotonic() - t0)
    time.sleep(gap)
    end = time.monotonic()
    stop.set()
    for t in threads:
        t.join(60)
    window = sorted((a, b, ok) for a, b, ok in out if a >= begin and b <= end + 30)
    lat = sorted((b - a) * 1000 for a, b, _ in window)
    ends = sorted(b for _, b, _ in window)
    gaps = [y - x for x, y in zip([begin] + ends, ends + [end])]
    return {"requests": len(window), "failed": sum(1 for *_, ok in window if not ok),
            "p50": statistics.median(lat), "p99": lat[int(len(lat) * 0.99) - 1], "max": lat[-1],
            "stall": max(gaps) * 1000, "switch_s": statistics.mean(waits) if waits else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--gap", type=float, default=1.5, help="seconds between switches")
    args = ap.parse_args()
    import yaml
    from sklearn.datasets import load_breast_cancer
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mlpipe-bench-reload-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MLPIPE_REGISTRY": str(tmp / "reg"), "MLPIPE_FLEET_ROOT": str(tmp / "root"),
               "PATH": f"{BIN}:{os.environ['PATH']}", "MLPIPE_CAPTURE_SAMPLE": "0"}
        name = "bench-reload"
        for seed in (1, 2):
            spec = {"name": name, "data": {"source": "sklearn:breast_cancer", "target": "target"},
                    "split": {"test_size": 0.2, "random_state": seed},
                    "model": {"estimator": "sklearn.ensemble.RandomForestClassifier",
                              "params": {"n_estimators": 100, "random_state": seed}},
                    "metrics": ["accuracy"]}
            (tmp / f"{name}.yml").write_text(yaml.safe_dump(spec))
            subprocess.run([sys.executable, "-m", "mlpipe", "train", str(tmp / f"{name}.yml")], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        for v in (1, 2):
            subprocess.run([sys.executable, "-m", "mlpipe", "models", "pull", f"{name}:{v}", "--dest", str(tmp / "m")]
                           + (["--activate"] if v == 1 else []), env=env, check=True, stdout=subprocess.DEVNULL)
        frame = load_breast_cancer(as_frame=True).frame
        cols = [c for c in frame.columns if c != "target"]
        body = json.dumps({"dataframe_split": {"columns": cols, "data": frame[cols].head(1).values.tolist()}})
        results = {}
        for mode in ("steady", "follow", "HUP"):
            port = free_port()
            pidfile = tmp / f"{mode}.pid"
            proc = start_serve([str(BIN / "mlpipe"), "serve", "--model-dir", str(tmp / "m"), "--port", str(port),
                          "--workers", "2", "--pidfile", str(pidfile)], port, env, tmp / "serve.log")
            try:
                results[mode] = measure(mode, f"http://127.0.0.1:{port}", body, tmp / "m", pidfile, args.switches,
                                        args.gap, args.clients)
            finally:
                stop_group(proc)
    print(f"\nswitching versions under load: mlpipe serve, RandomForest(100 trees) on breast_cancer via ONNX Runtime, "
          f"2 gunicorn workers, {args.clients} clients sending one-row requests, {args.switches} switches "
          f"{args.gap} s apart (load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f})\n")
    print(f"{'mode':8} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'stall ms':>9} {'switch s':>9}")
    for mode, r in results.items():
        print(f"{mode:8} {r['requests']:>9} {r['failed']:>7} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f} "
              f"{r['stall']:>9.0f} {r['switch_s']:>9.2f}")
    s = results["steady"]
    for mode in ("follow", "HUP"):
        r = results[mode]
        print(f"{mode}: longest stall {r['stall']:.0f} ms ({r['stall'] / s['stall']:.1f}x the steady run's "
              f"{s['stall']:.0f} ms), max latency {r['max']:.0f} ms vs {s['max']:.0f} ms steady, {r['failed']} failed")
    print("goal: 0 failed and no stall longer than 100 ms when a serving host switches (follow)")


if __name__ == "__main__":
    main()
