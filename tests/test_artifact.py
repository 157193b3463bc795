import json

import pytest

from mlpipe import artifact, spec, train
from mlpipe.errors import IntegrityError
from conftest import EXAMPLES


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("art") / "v"
    train.train(spec.load(EXAMPLES / "hello-world.yml"), d)
    return d


def test_load_verifies_then_loads(built):
    model, manifest = artifact.load_model(built)
    assert manifest["name"] == "hello-world"
    assert hasattr(model, "predict")


def test_tampered_model_refused(built, tmp_path):
    import shutil
    d = tmp_path / "t"
    shutil.copytree(built, d)
    with open(d / "model.joblib", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="sha256 mismatch.*refusing to load"):
        artifact.load_model(d)


def test_tampered_manifest_hash_refused(built, tmp_path):
    import shutil
    d = tmp_path / "t"
    shutil.copytree(built, d)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["model.joblib"]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError):
        artifact.load_model(d)


def test_missing_file_refused(built, tmp_path):
    import shutil
    d = tmp_path / "t"
    shutil.copytree(built, d)
    (d / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        artifact.verify_dir(d)


def test_id_is_content_hash(built):
    m = artifact.read_manifest(built)
    assert m["id"] == artifact.content_id(m["name"], m["files"], m["created"])


@pytest.mark.parametrize("fname", ["../evil", "../../etc/passwd", "/abs", "a/b", "..", ".hidden", "manifest.json", "x" * 200])
def test_manifest_file_names_must_be_plain(built, tmp_path, fname):
    import shutil
    d = tmp_path / "t"
    shutil.copytree(built, d)
    m = json.loads((d / "manifest.json").read_text())
    m["files"][fname] = {"sha256": "0" * 64, "size": 0}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="not a plain file name"):
        artifact.verify_dir(d)
    with pytest.raises(IntegrityError, match="not a plain file name"):
        artifact.load_model(d)


def test_write_dir_refuses_a_path_as_file_name(tmp_path):
    with pytest.raises(IntegrityError, match=r"'\.\./escape'"):
        artifact.write_dir(tmp_path / "a" / "v", {"m": 1}, {"name": "x"}, {"../escape": b"x"})
    assert not (tmp_path / "a" / "escape").exists()


def _trained_with(built, tmp_path, sklearn_version: str):
    """A copy of the artifact whose manifest says another scikit-learn trained it (the manifest
    itself is not hashed: verify_dir still passes)."""
    import shutil
    d = tmp_path / f"sk-{sklearn_version}"
    shutil.copytree(built, d)
    m = json.loads((d / "manifest.json").read_text())
    m["library_versions"]["scikit-learn"] = sklearn_version
    (d / "manifest.json").write_text(json.dumps(m))
    artifact.verify_dir(d)
    return d


def _other_minor() -> tuple[str, str]:
    import sklearn
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    return f"{major}.{minor + 1}.2", f"{major}.{minor + 1}"


def test_sklearn_minor_skew_refused_unless_allowed(built, tmp_path, monkeypatch, caplog):
    import joblib
    import sklearn
    other, want = _other_minor()
    d = _trained_with(built, tmp_path, other)
    monkeypatch.delenv("MLPIPE_ALLOW_SKLEARN_SKEW", raising=False)
    real_load = joblib.load

    def no_unpickle(*a, **k):
        raise AssertionError("joblib.load called on a skewed version")
    monkeypatch.setattr(joblib, "load", no_unpickle)
    with pytest.raises(Exception) as info:
        artifact.load_model(d)
    from mlpipe.errors import LibraryMismatch
    assert isinstance(info.value, LibraryMismatch), info.value
    msg = str(info.value)
    assert other in msg and sklearn.__version__ in msg
    assert f"install scikit-learn=={want}.* on this host, or retrain" in msg and "MLPIPE_ALLOW_SKLEARN_SKEW=1" in msg

    monkeypatch.setattr(joblib, "load", real_load)
    monkeypatch.setenv("MLPIPE_ALLOW_SKLEARN_SKEW", "1")
    with caplog.at_level("WARNING", logger="mlpipe.artifact"):
        model, _ = artifact.load_model(d)
    assert hasattr(model, "predict")
    assert other in caplog.text and sklearn.__version__ in caplog.text


def test_sklearn_patch_difference_loads(built, tmp_path, monkeypatch, caplog):
    import sklearn
    monkeypatch.delenv("MLPIPE_ALLOW_SKLEARN_SKEW", raising=False)
    major_minor = ".".join(sklearn.__version__.split(".")[:2])
    d = _trained_with(built, tmp_path, f"{major_minor}.99")
    with caplog.at_level("WARNING", logger="mlpipe.artifact"):
        model, _ = artifact.load_model(d)
    assert hasattr(model, "predict") and "scikit-learn" not in caplog.text
