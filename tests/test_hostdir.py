import json
import os

import pytest

from mlpipe import hostdir
from mlpipe.errors import NotFound


def _version(d, n):
    (d / str(n)).mkdir(parents=True)
    (d / str(n) / "manifest.json").write_text(json.dumps({"version": n}))


def test_activate_switches_and_keeps_previous(tmp_path):
    for n in (1, 2, 3, 4, 5):
        _version(tmp_path, n)
    assert hostdir.activate(tmp_path, 1, keep=3)
    assert not hostdir.activate(tmp_path, 1, keep=3)
    assert hostdir.activate(tmp_path, 5, keep=2)
    assert hostdir.current(tmp_path) == 5 and hostdir.previous(tmp_path) == 1
    assert os.readlink(tmp_path / "current") == "5"  # relative link
    left = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert left == [1, 4, 5]  # newest 2, plus previous


def test_activate_needs_pulled_version(tmp_path):
    with pytest.raises(NotFound, match="not pulled"):
        hostdir.activate(tmp_path, 7)


def test_rollback_restores_both_links(tmp_path):
    for n in (1, 2, 3):
        _version(tmp_path, n)
    hostdir.activate(tmp_path, 1)
    hostdir.activate(tmp_path, 2)
    hostdir.activate(tmp_path, 3)            # a bad deploy: current 3, previous 2
    assert hostdir.activate(tmp_path, 2, set_previous=1)
    assert (hostdir.current(tmp_path), hostdir.previous(tmp_path)) == (2, 1)
    assert not hostdir.activate(tmp_path, 2, set_previous=1)  # idempotent
