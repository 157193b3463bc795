"""The on-disk form of one model version: ``model.joblib`` (+ ``model.onnx``) and ``manifest.json``.

joblib runs code when it loads, so nothing is unpickled before every file's sha256 matched the
manifest. The manifest is the contract the server, the registry and the deploy tooling read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlpipe.errors import IntegrityError, LibraryMismatch, NotFound

log = logging.getLogger("mlpipe.artifact")

MANIFEST = "manifest.json"
MODEL_FILE = "model.joblib"
ONNX_FILE = "model.onnx"
SCHEMA = 1
SKEW_ENV = "MLPIPE_ALLOW_SKLEARN_SKEW"
# what a manifest may list: a plain file name in the version folder, never a path
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# pandas/numpy dtype -> Open Inference Protocol datatype
_OIP = {"float64": "FP64", "float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32",
        "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
        "uint64": "UINT64", "bool": "BOOL", "object": "BYTES", "string": "BYTES", "str": "BYTES", "category": "BYTES"}


def oip_datatype(dtype: str) -> str:
    return _OIP.get(str(dtype), "BYTES")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_versions() -> dict:
    import joblib
    import numpy
    import sklearn
    out = {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
           "numpy": numpy.__version__, "joblib": joblib.__version__}
    try:
        import pandas
        out["pandas"] = pandas.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def content_id(name: str, files: dict, created: str) -> str:
    h = hashlib.sha256(name.encode())
    for fname in sorted(files):
        h.update(f"{fname}:{files[fname]['sha256']}".encode())
    h.update(created.encode())
    return h.hexdigest()[:8]


def check_file_name(fname: Any, where: str) -> str:
    """A file name a manifest may list: plain (no ``/``, no ``..``), not the manifest itself."""
    if not isinstance(fname, str) or not FILE_NAME_RE.match(fname) or ".." in fname or fname == MANIFEST:
        raise IntegrityError(f"{where} lists the file {fname!r}, which is not a plain file name",
                             hint="a version's files are plain names like model.joblib; refusing to read or write it")
    return fname


def check_files(manifest: dict, where: str) -> dict:
    """The manifest's ``files`` after checking every name and sha256 (before any is read or written)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IntegrityError(f"{where} has no 'files' table", hint="the artifact is incomplete; pull or build it again")
    for fname, meta in files.items():
        check_file_name(fname, where)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not SHA256_RE.match(meta["sha256"]):
            raise IntegrityError(f"{where} lists {fname} without a valid sha256",
                                 hint="the manifest is corrupted; pull or build it again")
    return files


def write_dir(dest: Path, model: Any, manifest: dict, extra_files: dict[str, bytes] | None = None) -> dict:
    """Write model + manifest into ``dest`` (a fresh folder); fill in files, id. Returns the manifest."""
    import joblib
    for fname in extra_files or {}:
        check_file_name(fname, f"the artifact for {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, dest / MODEL_FILE)
    files = {MODEL_FILE: {"sha256": sha256_file(dest / MODEL_FILE), "size": (dest / MODEL_FILE).stat().st_size}}
    for fname, data in (extra_files or {}).items():
        (dest / fname).write_bytes(data)
        files[fname] = {"sha256": sha256_bytes(data), "size": len(data)}
    manifest = dict(manifest)
    manifest["files"] = files
    manifest.setdefault("created", utcnow())
    manifest["id"] = content_id(manifest["name"], files, manifest["created"])
    manifest["schema"] = SCHEMA
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Write ``manifest.json`` in ``directory`` (atomically), with its id recomputed from name, files, created."""
    manifest = dict(manifest)
    manifest["id"] = content_id(manifest["name"], manifest["files"], manifest["created"])
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)
    return manifest


def add_file(directory: Path, fname: str, data: bytes | None = None, fields: dict | None = None) -> dict:
    """Add one file to an unregistered artifact folder and list it in its manifest (sha256, size; the id
    recomputed exactly as :func:`write_dir` does, so :func:`verify_dir` passes). ``data`` None: the file is
    already in the folder (e.g. written by another program). ``fields``: top-level manifest keys to set too.
    Returns the new manifest."""
    directory = Path(directory)
    check_file_name(fname, f"the artifact in {directory}")
    manifest = read_manifest(directory)
    check_files(manifest, f"the manifest in {directory}")
    path = directory / fname
    if data is not None:
        path.write_bytes(data)
    elif not path.is_file():
        raise NotFound(f"{path} does not exist", hint="write the file first, or pass its bytes")
    manifest["files"] = {**manifest["files"], fname: {"sha256": sha256_file(path), "size": path.stat().st_size}}
    manifest.update(fields or {})
    return write_manifest(directory, manifest)


def update_manifest(directory: Path, fields: dict) -> dict:
    """Set top-level keys in an unregistered artifact's manifest (its files, hence its id, unchanged)."""
    manifest = read_manifest(directory)
    manifest.update(fields)
    return write_manifest(directory, manifest)


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise NotFound(f"no {MANIFEST} in {directory}", hint="pull a version with 'mlpipe models pull'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc.msg})", hint="pull the version again") from None


def verify_dir(directory: Path, manifest: dict | None = None, only: list[str] | None = None) -> dict:
    """Check every file the manifest lists (or just ``only``) against its sha256."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    files = check_files(manifest, f"the manifest in {directory}")
    if MODEL_FILE not in files:
        raise IntegrityError(f"manifest in {directory} lists no {MODEL_FILE}", hint="the artifact is incomplete; pull it again")
    for fname in only or list(files):
        meta = files.get(fname)
        if meta is None:
            raise IntegrityError(f"{fname} is not listed in the manifest of {directory}")
        path = directory / fname
        if not path.is_file():
            raise IntegrityError(f"{path} is missing", hint="pull the version again")
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise IntegrityError(
                f"sha256 mismatch for {path}: manifest says {meta['sha256'][:12]}…, file is {digest[:12]}…",
                hint="the artifact was modified or corrupted; refusing to load it. Pull a fresh copy from the registry")
    return manifest


def _major_minor(version) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def sklearn_skew(manifest: dict) -> tuple[str, str] | None:
    """(trained, installed) scikit-learn versions when their major.minor differ, else None.
    Patch releases keep pickles compatible; minor releases may not (scikit-learn only promises
    that a pickle loads in the version that wrote it)."""
    trained = (manifest.get("library_versions") or {}).get("scikit-learn")
    installed = installed_sklearn()
    t, i = _major_minor(trained), _major_minor(installed)
    if t is None or i is None or t == i:
        return None
    return str(trained), str(installed)


def installed_sklearn() -> str | None:
    """The installed scikit-learn's version, without importing it (the ONNX serving path never
    imports scikit-learn: it would add a second or more to every worker start)."""
    import sys
    if "sklearn" in sys.modules:
        return sys.modules["sklearn"].__version__
    from importlib import metadata
    try:
        return metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        return None


def check_sklearn(manifest: dict, where: str) -> None:
    """Refuse to unpickle a version trained with another scikit-learn major.minor, unless
    ``MLPIPE_ALLOW_SKLEARN_SKEW=1`` (then load it with a warning)."""
    skew = sklearn_skew(manifest)
    if skew is None:
        return
    trained, installed = skew
    want = "{}.{}".format(*_major_minor(trained))
    if os.environ.get(SKEW_ENV, "").lower() in ("1", "true", "yes", "on"):
        log.warning("%s was trained with scikit-learn %s and this host has %s; loading it anyway (%s is set)",
                    where, trained, installed, SKEW_ENV)
        return
    raise LibraryMismatch(f"{where} was trained with scikit-learn {trained} and this host has scikit-learn {installed}; "
                          "refusing to unpickle it",
                          hint=f"install scikit-learn=={want}.* on this host, or retrain; set {SKEW_ENV}=1 to load anyway")


def load_model(directory: Path, manifest: dict | None = None):
    """Verify, check the scikit-learn version, then unpickle. Returns (model, manifest)."""
    import joblib
    manifest = verify_dir(directory, manifest, only=[MODEL_FILE])
    check_sklearn(manifest, f"{manifest.get('name')}:{manifest.get('version')} in {directory}")
    return joblib.load(Path(directory) / MODEL_FILE), manifest


def stage_copy(src: Path, dest_parent: Path) -> Path:
    """Copy an artifact folder next to its final place (for an atomic rename afterwards)."""
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest_parent))
    for item in Path(src).iterdir():
        shutil.copy2(item, tmp / item.name)
    os.chmod(tmp, 0o755)
    return tmp
