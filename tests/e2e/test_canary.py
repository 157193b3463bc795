"""The guarded canary end to end, over SSH, under a steady load through HAProxy: a version that passes
the holdout checks but fails on live traffic is stopped by the canary's bake and rolled back before any
other host switches; a good version bakes and goes to every host with no failed request; a bake that
was interrupted leaves HAProxy's weights changed and the next run puts them back.

The bad version is a Pipeline (SplineTransformer with extrapolation="error", then LogisticRegression)
trained on the breast-cancer data: it scores well on the holdout (whose rows lie inside the training
range), but raises on any input beyond the range it was trained on (HTTP 500). The steady load sends
two kinds of requests: ordinary rows (2 threads) and rows with every feature five times larger (1
thread: a region the holdout does not cover; v1's decision tree answers them). The tests run in order
on one fleet (its own ports)."""
import json
import os
import signal
import time

import pytest

from e2e.fleet import ALL, Load, holdout, on, recap_changed, setup_v1, train

pytestmark = pytest.mark.e2e

BAKE = ["-e", "deploy_bake_seconds=30", "-e", "deploy_bake_interval=2"]


def far_body(fleet) -> dict:
    """Rows beyond every training range (each feature x5): valid inputs, answered by a decision tree."""
    from sklearn.datasets import load_breast_cancer
    frame = load_breast_cancer(as_frame=True).frame
    cols = [c for c in frame.columns if c != "target"]
    return {"dataframe_split": {"columns": cols, "data": (frame[cols].head(2) * 5).values.tolist()}}


def train_bad(fleet) -> int:
    """credit-risk, but a model that raises on inputs beyond its training range (not in the holdout)."""
    from sklearn.datasets import load_breast_cancer
    frame = load_breast_cancer(as_frame=True).frame
    feats = [c for c in frame.columns if c != "target"]
    # the training split must span the holdout's range and the all-zero row a server warms a model
    # up with: rows at 0 and at every feature's max, repeated
    lo, hi = frame.copy().head(0), frame.copy().head(0)
    lo.loc[0, feats], lo.loc[0, "target"] = 0.0, 1
    hi.loc[0, feats], hi.loc[0, "target"] = frame[feats].max().values, 0
    import pandas as pd
    data = pd.concat([frame] + [lo, hi] * 20, ignore_index=True)
    data["target"] = data["target"].astype(int)
    data.to_csv(fleet.root / "train-splines.csv", index=False)
    spec = fleet.root / "splines.yml"
    spec.write_text(f"""name: credit-risk
data: {{source: "csv:{fleet.root / 'train-splines.csv'}", target: target}}
split: {{test_size: 0.2, random_state: 12345, stratify: true}}
model:
  steps:
    - {{estimator: sklearn.preprocessing.SplineTransformer, params: {{extrapolation: error}}}}
    - {{estimator: sklearn.linear_model.LogisticRegression, params: {{max_iter: 5000}}}}
  onnx: false
metrics: [accuracy, f1_macro]
gate:
  min: {{accuracy: 0.85}}
  max_regression: {{accuracy: 0.02}}
""")
    r = fleet.mlpipe("train", str(spec), "-m", "splines: raises beyond the training range", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["version"]


def weights(fleet) -> dict:
    from mlpipe.canary import server_weights
    return server_weights(str(fleet.root / "lb1" / "run" / "haproxy.sock"), "mlpipe")


def configured(fleet) -> bool:
    return all(v["weight"] == v["initial"] for v in weights(fleet).values())


def test_setup_v1(fleet):
    setup_v1(fleet)
    fleet.far = far_body(fleet)


def test_a_version_that_fails_on_live_traffic_is_stopped_by_the_bake(fleet):
    v = train_bad(fleet)
    assert v == 2
    started = time.monotonic()
    with Load(fleet.lb_url, fleet.body, threads=2) as steady, Load(fleet.lb_url, fleet.far, threads=1) as far:
        r = fleet.deploy(2, *holdout(fleet), *BAKE)
    took = time.monotonic() - started
    assert r.returncode != 0, r.stdout[-3000:]
    summary = r.stdout[r.stdout.rfind("FAILED."):]
    print(summary[:3000])
    print(f"deploy took {took:.0f} s; steady load {dict(steady.counts)}; far load {dict(far.counts)}")
    # it passed the holdout checks: what stopped it is the bake, with both sides' figures
    assert "host ms1: check 'Bake the canary on live traffic and compare it with the hosts still on the old version' " \
           "failed: the canary's bake over" in summary, summary[:3000]
    assert "canary (ms1)" in summary and "old version (ms2, ms3)" in summary
    line = next(ln for ln in summary.splitlines() if ln.strip().startswith("error rate (5xx)"))
    assert line.rstrip().endswith("BREACH") and line.split()[3].endswith("%") and line.split()[4] == "0.00%", line
    assert "ms1: rolled back: serves v1 again, in the balancer" in summary
    # the other hosts never switched, and everything is as before
    assert fleet.versions() == on(fleet, 1)
    assert sorted(fleet.lb_up()) == ALL and configured(fleet)
    events = fleet.events("credit-risk")
    assert not [e for e in events if e.get("host") in ("ms2", "ms3") and e.get("version") == 2], events[-6:]
    assert not [e for e in events if e["event"] == "deployed" and e.get("version") == 2]
    failed = [e for e in events if e["event"] == "deploy_failed" and e.get("version") == 2]
    assert failed and "error rate (5xx)" in failed[-1]["reason"]
    assert fleet.fleet_state()["live"] == 1 and fleet.fleet_state()["lock"] is None
    # Failed requests: the ordinary rows never fail (v2 answers them). Rows beyond the training range
    # fail on ms1 while it serves v2 in the balancer: from its re-enable after the checks until it is
    # drained when the bake breaches, a few seconds, mostly at the canary's 10% share (a third while
    # the weights are being set). Every failure is an HTTP 500 from v2; they are bounded by that time.
    assert not steady.failures, steady.counts
    assert far.failures and set(far.failures) == {"HTTP 500"}, far.counts
    window = max(far.failure_times) - min(far.failure_times)
    print(f"{len(far.failures)} failed requests, all within {window:.1f} s")
    assert window < 30, window                      # the bake stopped early, well before its 30 s
    assert len(far.failures) <= far.counts["1"] / 3, far.counts  # never more than the canary's normal share


def test_a_good_version_bakes_and_goes_to_every_host(fleet):
    assert train(fleet, "v3: the same model as v1") == 3
    with Load(fleet.lb_url, fleet.body, threads=2) as steady, Load(fleet.lb_url, fleet.far, threads=1) as far:
        r = fleet.deploy(3, *holdout(fleet), *BAKE)
    assert r.returncode == 0, r.stdout[-4000:]
    report = r.stdout[r.stdout.rfind("every host serves it"):]
    print(report[:2000])
    print(f"steady load {dict(steady.counts)}; far load {dict(far.counts)}")
    assert not steady.failures and not far.failures, (steady.counts, far.counts)
    assert fleet.versions() == on(fleet, 3) and sorted(fleet.lb_up()) == ALL and configured(fleet)
    assert "ms1: switched to v3, checks passed, in the balancer (baked " in report
    assert "against ms2, ms3: passed; error rate (5xx) canary 0.00% vs old 0.00%" in report, report[:2000]
    assert "(baked" not in report.split("ms2:")[1]  # only the canary bakes


def test_an_interrupted_bake_leaves_weights_the_next_run_restores(fleet):
    assert train(fleet, "v4") == 4
    with Load(fleet.lb_url, fleet.body, threads=2) as load:
        proc = fleet.start_playbook("deploy.yml", "-e", "model=credit-risk", "-e", "version=4", *holdout(fleet),
                                    "-e", "deploy_bake_seconds=300")
        fleet.wait_for(lambda: not configured(fleet), timeout=300, every=0.2)
        changed = weights(fleet)
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out = fleet.finish(proc)
        assert time.monotonic() - interrupted < 60, "a Ctrl-C waited for the bake to end"
        assert proc.returncode != 0, out[-2000:]
        assert changed["ms1"]["weight"] < changed["ms2"]["weight"], changed
        left = weights(fleet)
        assert left["ms1"]["weight"] != left["ms1"]["initial"], left  # the run died before its reset
        r = fleet.deploy(4, *holdout(fleet), "-e", "break_lock=true")
    assert r.returncode == 0, r.stdout[-3000:]
    assert not load.failures, load.counts
    print(f"weights left by the interrupted run: {left}")
    assert configured(fleet) and fleet.versions() == on(fleet, 4)
    again = fleet.deploy(4, *holdout(fleet), *BAKE)
    assert again.returncode == 0 and recap_changed(again.stdout) == 0, again.stdout[-3000:]
