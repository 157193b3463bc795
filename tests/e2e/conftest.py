"""The e2e fixture: one local fleet per test module (its own sshd, server and balancer ports), so
modules can run in parallel (pytest-xdist, --dist loadfile) without sharing a port."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import free_port  # noqa: E402
from e2e.fleet import ADDRESSES, Fleet  # noqa: E402

HOLDOUT = "holdout.csv"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    # Not under pytest's tmp tree: /tmp/pytest-of-<user> is 0700 (pytest makes it so again at every
    # start), and the servers run as the unprivileged user mlpipe, which must reach the fleet root.
    # The logs are copied into pytest's tmp tree at the end.
    tmp = Path(tempfile.mkdtemp(prefix="mlpipe-e2e-"))
    os.chmod(tmp, 0o755)
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
        logs = tmp_path_factory.mktemp("e2e")
        for log in [*tmp.glob("*.log"), *tmp.glob("fleet/*/log/*.log")]:
            shutil.copy(log, logs / (log.name if log.parent == tmp else f"{log.parts[-3]}-{log.name}"))
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"playbook log: {logs / 'playbook.log'}")


