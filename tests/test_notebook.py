"""Notebooks in the pipeline: real papermill, a real python3 kernel, the real CLI.

A kernel start costs a second or two, so each notebook runs once per module where it can, and the
tests read what it left behind (registry, ledger, pulled files)."""
import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from mlpipe import artifact, notebook
from mlpipe import spec as spec_mod
from mlpipe.errors import IntegrityError, RETRAIN_EXIT
from mlpipe.registry import Registry
from conftest import EXAMPLES, run_cli, small_spec

PARAMS = 'model = ""\nversion = 0\ndata_source = ""\nmetrics = {}\nmodel_dir = ""'


def write_notebook(path: Path, *cells: str) -> Path:
    """A notebook with a cell tagged parameters (defaults), then ``cells``."""
    params = v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb = v4.new_notebook(cells=[params, *(v4.new_code_cell(c) for c in cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def outputs(nb_path: Path) -> list[dict]:
    nb = json.loads(Path(nb_path).read_text())
    return [o for c in nb["cells"] for o in c.get("outputs", [])]


def stdout_of(nb_path: Path) -> str:
    return "".join("".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                   for o in outputs(nb_path) if o["output_type"] == "stream")


def events(reg, name: str, kind: str) -> list[dict]:
    return [e for e in Registry(str(reg)).events(name) if e["event"] == kind]


# ---------------------------------------------------------------- the example notebook (a regressor)
@pytest.fixture(scope="module")
def house(tmp_path_factory):
    """examples/house-prices.yml trained through the CLI: its notebook runs and is stored with v1."""
    reg = tmp_path_factory.mktemp("nb") / "reg"
    r = run_cli("train", EXAMPLES / "house-prices.yml", "-m", "with a report", "--registry", reg, "--json")
    assert r.returncode == 0, r.stderr
    return reg, json.loads(r.stdout)


def test_example_notebook_runs_with_parameters_and_is_stored(house, tmp_path):
    reg, m = house
    info = m["notebook"]
    assert info["status"] == "ok" and info["error"] is None, info
    assert info["file"] == "notebook.ipynb" and info["source"] == "notebooks/report.ipynb"
    assert 0 < info["seconds"] < 120
    assert set(m["files"]) >= {"model.joblib", "holdout.parquet", "notebook.ipynb"}
    # the id covers the notebook, exactly as write_dir computes it
    assert m["id"] == artifact.content_id(m["name"], m["files"], m["created"])
    # a full pull verifies every file (the notebook included) against its sha256
    r = run_cli("models", "pull", "house-prices:1", "--dest", tmp_path / "srv", "--registry", reg)
    assert r.returncode == 0, r.stderr
    pulled = tmp_path / "srv" / "1"
    artifact.verify_dir(pulled)
    assert artifact.sha256_file(pulled / "notebook.ipynb") == m["files"]["notebook.ipynb"]["sha256"]
    nb = nbformat.read(str(pulled / "notebook.ipynb"), as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'model = "house-prices"' in injected.source and "version = 1\n" in injected.source
    assert f'"r2": {m["metrics"]["r2"]}' in injected.source and "model_dir = " in injected.source
    assert f'data_source = "csv:{EXAMPLES / "data" / "diabetes.csv"}"' in injected.source
    outs = outputs(pulled / "notebook.ipynb")
    assert not [o for o in outs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outs), "the residual plot is not in the executed notebook"
    text = stdout_of(pulled / "notebook.ipynb")
    assert "house-prices v1: RandomForestRegressor" in text and "r2" in text
    ran = events(reg, "house-prices", "notebook_ran")
    assert len(ran) == 1 and ran[0]["version"] == 1 and ran[0]["seconds"] == info["seconds"]
    assert not events(reg, "house-prices", "notebook_failed")


def test_models_show_lists_the_notebook(house):
    reg, m = house
    r = run_cli("models", "show", "house-prices:1", "--registry", reg)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("Notebook: "))
    assert line.startswith("Notebook: notebook.ipynb (ran in ") and line.endswith(" s, from notebooks/report.ipynb)")
    j = json.loads(run_cli("models", "show", "house-prices:1", "--registry", reg, "--json").stdout)
    assert j["notebook"] == m["notebook"]


def test_models_pull_one_file(house, tmp_path):
    reg, m = house
    r = run_cli("models", "pull", "house-prices:1", "--file", "notebook.ipynb", "--dest", tmp_path, "--registry", reg,
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["path"] == str(tmp_path / "notebook.ipynb") and out["sha256"] == m["files"]["notebook.ipynb"]["sha256"]
    assert artifact.sha256_file(tmp_path / "notebook.ipynb") == out["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notebook.ipynb"]  # just that file, no version folder
    r = run_cli("models", "pull", "house-prices@production", "--file", "notebook.ipynb", "--dest", tmp_path,
                "--registry", reg)
    assert r.returncode == 5 and "no alias 'production'" in r.stderr
    r = run_cli("models", "pull", "house-prices:1", "--file", "report.html", "--dest", tmp_path, "--registry", reg)
    assert r.returncode == 5, r.stderr
    assert "house-prices:1 has no file 'report.html'" in r.stderr
    assert "holdout.parquet, model.joblib, model.onnx, notebook.ipynb, manifest.json" in r.stderr
    assert not (tmp_path / "report.html").exists()
    r = run_cli("models", "pull", "house-prices:1", "--file", "notebook.ipynb", "--dest", tmp_path, "--activate",
                "--registry", reg)
    assert r.returncode == 3 and "--activate" in r.stderr


def test_pull_file_refuses_a_tampered_file(house, tmp_path):
    reg, _ = house
    copy = tmp_path / "reg"
    shutil.copytree(reg, copy)
    (copy / "house-prices" / "versions" / "1" / "notebook.ipynb").write_text("{}")
    with pytest.raises(IntegrityError, match="notebook.ipynb .* does not match its manifest"):
        Registry(str(copy)).pull_file("house-prices:1", "notebook.ipynb", tmp_path / "out")
    assert not (tmp_path / "out" / "notebook.ipynb").exists()


# ------------------------------------------------------------------------------ a failing notebook
@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    d = tmp_path_factory.mktemp("nbfail")
    write_notebook(d / "nb" / "check.ipynb", "print('checking', model, version)",
                   "raise ValueError(f'boom: accuracy {metrics[\"accuracy\"]:.2f} is too low')")
    import yaml
    spec = small_spec("toy-nb", notebook="nb/check.ipynb", data={"source": "sklearn:iris", "target": "target"},
                      model={"estimator": "sklearn.tree.DecisionTreeClassifier", "params": {"max_depth": 3}})
    (d / "toy.yml").write_text(yaml.safe_dump(spec))
    reg = d / "reg"
    r = run_cli("train", d / "toy.yml", "--registry", reg, "--json")
    return d, reg, r


def test_failing_notebook_keeps_the_version_and_exits_13(failing, tmp_path):
    d, reg, r = failing
    assert r.returncode == RETRAIN_EXIT["notebook_failed"] == 13, r.stderr
    m = json.loads(r.stdout)  # --json still prints the registered version
    info = m["notebook"]
    assert info["status"] == "failed" and info["file"] == "notebook.ipynb" and info["source"] == "nb/check.ipynb"
    assert "ValueError: boom: accuracy" in info["error"] and "cell In [" in info["error"]
    assert "mlpipe models pull toy-nb:1 --file notebook.ipynb" in info["error"]
    assert "toy-nb:1 is registered" in r.stderr and "ValueError: boom" in r.stderr
    assert Registry(str(reg)).versions("toy-nb") == [1]
    failed = events(reg, "toy-nb", "notebook_failed")
    assert len(failed) == 1 and failed[0]["version"] == 1 and failed[0]["reason"] == info["error"]
    # the executed notebook, with the cell's traceback, is stored and verified like the model
    r = run_cli("models", "pull", "toy-nb:1", "--file", "notebook.ipynb", "--dest", tmp_path, "--registry", reg)
    assert r.returncode == 0, r.stderr
    errors = [o for o in outputs(tmp_path / "notebook.ipynb") if o["output_type"] == "error"]
    assert errors and errors[-1]["ename"] == "ValueError" and "boom" in errors[-1]["evalue"]
    assert "checking toy-nb 1" in stdout_of(tmp_path / "notebook.ipynb")
    show = run_cli("models", "show", "toy-nb:1", "--registry", reg).stdout
    assert "Notebook: notebook.ipynb FAILED: notebook nb/check.ipynb: cell In [" in show


def test_no_notebook_flag_skips_it(failing):
    d, _, _ = failing
    reg = d / "reg-skip"
    r = run_cli("train", d / "toy.yml", "--no-notebook", "--registry", reg, "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert "notebook" not in m and "notebook.ipynb" not in m["files"]
    assert not events(reg, "toy-nb", "notebook_failed") and not events(reg, "toy-nb", "notebook_ran")
    assert "Notebook:" not in run_cli("models", "show", "toy-nb", "--registry", reg).stdout


def test_spec_naming_a_missing_or_non_notebook_file(write_spec, tmp_path):
    p = write_spec(small_spec("toy-nb", notebook="nb/missing.ipynb"))
    r = run_cli("train", p, "--registry", tmp_path / "reg")
    assert r.returncode == 3
    assert "'notebook' nb/missing.ipynb not found" in r.stderr and str(tmp_path / "nb" / "missing.ipynb") in r.stderr
    (tmp_path / "report.py").write_text("print(1)\n")
    p = write_spec(small_spec("toy-nb", notebook="report.py"))
    r = run_cli("train", p, "--registry", tmp_path / "reg")
    assert r.returncode == 3 and "'notebook' 'report.py' is not a Jupyter notebook" in r.stderr
    assert not (tmp_path / "reg").exists() or not Registry(str(tmp_path / "reg")).models()


# ------------------------------------------------------------------------- notebook.run, directly
@pytest.fixture
def workdir(built, tmp_path):
    """A fresh copy of an unregistered hello-world artifact (a classifier)."""
    d = tmp_path / "art"
    shutil.copytree(built, d)
    return d


def load_spec(tmp_path, nb: str, source: str = "sklearn:iris") -> spec_mod.Spec:
    import yaml
    raw = yaml.safe_load((EXAMPLES / "hello-world.yml").read_text())
    raw["data"]["source"] = source
    raw["notebook"] = nb
    p = tmp_path / "hello.yml"
    p.write_text(yaml.safe_dump(raw))
    return spec_mod.load(p)


def test_example_notebook_on_a_classifier(workdir, tmp_path):
    spec = load_spec(tmp_path, str(EXAMPLES / "notebooks" / "report.ipynb"))
    info = notebook.run(spec, workdir, 4)
    assert info["status"] == "ok", info["error"]
    m = artifact.verify_dir(workdir)
    assert m["notebook"] == info and "notebook.ipynb" in m["files"]
    outs = outputs(workdir / "notebook.ipynb")
    assert any("image/png" in o.get("data", {}) for o in outs)  # the confusion matrix
    assert "hello-world v4: LogisticRegression" in stdout_of(workdir / "notebook.ipynb")


def test_run_redacts_the_source_and_stops_at_the_timeout(workdir, tmp_path):
    write_notebook(tmp_path / "slow.ipynb",
                   "import os\nprint('source', data_source)\nprint('version', version, type(version).__name__)\n"
                   "print('files', sorted(os.listdir(model_dir)))\nprint('cwd', os.getcwd())",
                   "import time\ntime.sleep(60)")
    spec = load_spec(tmp_path, "slow.ipynb", source="sql:postgresql://ml:s3cret@db.example:5432/ml#select * from t")
    info = notebook.run(spec, workdir, 7, timeout=8)
    assert info["status"] == "failed" and info["seconds"] < 30
    assert "ran longer than its 8 s timeout (stopped in the cell starting 'import time')" in info["error"], info["error"]
    text = stdout_of(workdir / "notebook.ipynb")
    assert "source sql:postgresql://ml:***@db.example:5432/ml#select * from t" in text
    assert "s3cret" not in (workdir / "notebook.ipynb").read_text()
    assert "version 7 int" in text and "'model.joblib'" in text and "'holdout.parquet'" in text
    assert f"cwd {tmp_path}" in text
    m = artifact.verify_dir(workdir)  # the output is listed with its sha256, the id recomputed
    assert m["notebook"] == info and m["id"] == artifact.content_id(m["name"], m["files"], m["created"])


def test_run_reports_a_dead_kernel_and_a_missing_kernel(workdir, tmp_path):
    write_notebook(tmp_path / "dies.ipynb", "import os\nos._exit(3)")
    spec = load_spec(tmp_path, "dies.ipynb")
    info = notebook.run(spec, workdir, 1)
    assert info["status"] == "failed" and "the Jupyter kernel died" in info["error"], info["error"]
    artifact.verify_dir(workdir)
    info = notebook.run(spec, workdir, 1, kernel="no-such-kernel")
    assert info["status"] == "failed"
    assert "no Jupyter kernel named 'no-such-kernel'" in info["error"]
    assert "python -m ipykernel install --sys-prefix" in info["error"]
    m = artifact.verify_dir(workdir)  # run twice: one notebook entry, still consistent
    assert m["notebook"] == info


def test_run_an_invalid_notebook(workdir, tmp_path):
    (tmp_path / "broken.ipynb").write_text("not json")
    spec = load_spec(tmp_path, "broken.ipynb")
    info = notebook.run(spec, workdir, 1)
    assert info["status"] == "failed" and info["file"] is None
    assert "is not a valid Jupyter notebook" in info["error"], info["error"]
    m = artifact.verify_dir(workdir)
    assert m["notebook"] == info and "notebook.ipynb" not in m["files"]


# ------------------------------------------------------------------------ register(prepare=...)
def test_register_prepare_runs_with_the_version_before_the_upload(workdir, tmp_path):
    reg = Registry(str(tmp_path / "reg"))

    def boom(n):
        assert not reg.store.list("hello-world/versions/")
        raise RuntimeError("prepare failed")
    with pytest.raises(RuntimeError, match="prepare failed"):
        reg.register(workdir, prepare=boom)
    assert reg.versions("hello-world") == [] and not reg.store.list("hello-world/versions/")

    seen = []

    def add(n):
        seen.append(n)
        artifact.add_file(workdir, "report.txt", f"version {n}".encode(), fields={"report": n})
    m = reg.register(workdir, prepare=add)
    assert seen == [m["version"]] and m["report"] == m["version"]
    assert "report.txt" in m["files"]
    pulled, _, _ = reg.pull(f"hello-world:{m['version']}", tmp_path / "srv")
    assert (pulled / "report.txt").read_text() == f"version {m['version']}"


def test_add_file_keeps_verify_dir_happy(workdir):
    before = artifact.read_manifest(workdir)
    m = artifact.add_file(workdir, "notes.txt", b"hello")
    assert m["files"]["notes.txt"] == {"sha256": artifact.sha256_bytes(b"hello"), "size": 5}
    assert m["id"] != before["id"] and m["id"] == artifact.content_id(m["name"], m["files"], m["created"])
    assert artifact.verify_dir(workdir) == m
    (workdir / "notes.txt").write_bytes(b"changed")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        artifact.verify_dir(workdir)
    with pytest.raises(IntegrityError, match="not a plain file name"):
        artifact.add_file(workdir, "../escape.txt", b"x")
