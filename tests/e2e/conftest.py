"""The e2e fixture: one local fleet per test module (its own sshd, server and balancer ports), so
modules can run in parallel (pytest-xdist, --dist loadfile) without sharing a port."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import free_port  # noqa: E402
from e2e.fleet import ADDRESSES, Fleet  # noqa: E402

HOLDOUT = "holdout.csv"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
    f = Fleet(tmp, free_port(), free_port(), free_port())
    try:
        for a in ADDRESSES:
            f.start_sshd(a)
        # data: a holdout the models never trained on, and the same data with shuffled labels
        from sklearn.datasets import load_breast_cancer
        frame = load_breast_cancer(as_frame=True).frame
        f.root.mkdir(parents=True)
        frame.sample(150, random_state=5).to_csv(f.root / HOLDOUT, index=False)
        bad = frame.copy()
        bad["target"] = np.random.default_rng(0).permutation(bad["target"].to_numpy())
        bad.to_csv(f.root / "shuffled.csv", index=False)
        cols = [c for c in frame.columns if c != "target"]
        f.body = {"dataframe_split": {"columns": cols, "data": frame[cols].head(2).values.tolist()}}
        yield f
    finally:
        f.down()
        for a in list(f.sshd):
            f.stop_sshd(a)
        print(f"playbook log: {tmp / 'playbook.log'}")


