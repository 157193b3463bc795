"""What a worker serves: ``LoadedModel`` (one verified, loaded and warmed version, onnxruntime or
scikit-learn) and ``ModelSlot`` (which version: ``current``, else ``.last-good``, else ``previous``;
and, while it runs, whatever ``current`` is switched to: see ``ModelSlot.watch``)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mlpipe import artifact, hostdir
from mlpipe.errors import IntegrityError, MlpipeError
from mlpipe.serve.prometheus import metrics

log = logging.getLogger("mlpipe.serve")

LAST_GOOD = ".last-good"
# the signature's datatypes (Open Inference Protocol names) and the numpy types they arrive as
NUMERIC_OIP = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
OIP_NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}


class Scored(NamedTuple):
    """Rows of a small request and the labels the linear scorer gave them (``LoadedModel.linear``)."""
    rows: list
    labels: list


@dataclass
class LoadedModel:
    manifest: dict
    runtime: str                     # "onnxruntime" or "sklearn"
    path: Path
    loaded_at: float = field(default_factory=time.time)
    _model: Any = None
    _sess: Any = None
    _input_name: str = ""
    _input_dtype: Any = np.float64
    _outputs: list = field(default_factory=list)
    _run: Any = None
    linear: Any = None               # a mlpipe.linear.LinearScorer, when the version has a linear.json

    def __post_init__(self):
        sig = self.manifest["signature"]
        self.name = self.manifest["name"]
        self.version = int(self.manifest["version"])
        self.features = [i["name"] for i in sig["inputs"]]
        self.datatypes = [i["datatype"] for i in sig["inputs"]]
        self.index = {n: i for i, n in enumerate(self.features)}
        self.numeric = all(d in NUMERIC_OIP for d in self.datatypes)
        self.allow_nan = bool(sig.get("allow_nan"))
        self.kind = sig["target"]["kind"]
        self.classes = sig["target"].get("classes") or []
        self.target_datatype = artifact.oip_datatype(sig["target"]["dtype"]) if self.kind == "classification" else "FP64"
        self.version_label = str(self.version)
        spec_capture = (self.manifest.get("spec") or {}).get("capture") or {}
        self.spec_sample = spec_capture.get("sample") if isinstance(spec_capture, dict) else None

    @classmethod
    def load(cls, path: Path, require_onnx: bool = False) -> "LoadedModel":
        manifest = artifact.read_manifest(path)
        files = manifest.get("files", {})
        if artifact.ONNX_FILE in files:
            artifact.verify_dir(path, manifest, only=[artifact.ONNX_FILE])
            from mlpipe import onnx
            m = cls(manifest, "onnxruntime", path)
            m._sess = onnx.session((path / artifact.ONNX_FILE).read_bytes())
            inp = m._sess.get_inputs()[0]
            m._input_name = inp.name
            m._input_dtype = np.float32 if inp.type == "tensor(float)" else np.float64
            m._outputs = [o.name for o in m._sess.get_outputs()]
            m._run = m._sess._sess.run if hasattr(m._sess, "_sess") else None  # skips per-call Python checks
            m.allow_nan = False  # the ONNX agreement check covered finite inputs only
            skew = artifact.sklearn_skew(manifest)
            if skew:
                log.info("version %s at %s was trained with scikit-learn %s (this host has %s); served through "
                         "ONNX Runtime, which does not depend on scikit-learn", manifest.get("version"), path, *skew)
        elif require_onnx:
            raise IntegrityError(f"version {manifest.get('version')} at {path} has no model.onnx and this server "
                                 "refuses to unpickle (require_onnx)", hint="register a model skl2onnx can convert, or turn require_onnx off")
        else:
            model, manifest = artifact.load_model(path, manifest)  # refuses a scikit-learn major.minor skew
            m = cls(manifest, "sklearn", path)
            m._model = model
        m._load_linear(files)
        m.warm()
        return m

    def _load_linear(self, files: dict) -> None:
        """The plain-Python scorer of a linear model (mlpipe.linear), for small requests: when the
        version has one, its sha256 matches and it predicts what the model predicts on a few rows."""
        from mlpipe import linear
        if linear.FILE not in files or not self.numeric or self.allow_nan:
            return
        try:
            artifact.verify_dir(self.path, self.manifest, only=[linear.FILE])
            scorer = linear.LinearScorer.from_json((self.path / linear.FILE).read_bytes())
            if scorer.n_features != len(self.features) or (
                    scorer.classes is not None) != (self.kind == "classification") or (
                    scorer.classes is not None and scorer.classes != self.classes):
                raise ValueError("it does not fit the model's signature")
            rows = [[0.0] * len(self.features), [1.0] * len(self.features),
                    [float(i % 7) - 3.0 for i in range(len(self.features))]]
            want = self._run_model(np.asarray(rows, dtype=np.float64), False)[0]
            want = np.asarray(want).tolist()
            for got in (scorer.labels(rows), scorer.matrix_labels(np.asarray(rows, dtype=np.float64))):
                got = None if got is None else np.asarray(got).tolist()
                same = got is not None and (
                    got == want and all(type(a) is type(b) for a, b in zip(got, want)) if self.kind == "classification"
                    else np.allclose(got, np.asarray(want, dtype=np.float64), rtol=1e-5, atol=1e-6))
                if not same:
                    raise ValueError(f"it predicts {got!r} where the model predicts {want!r}")
        except Exception as exc:  # an accelerator only: whatever is wrong with it, the model serves without it
            log.warning("version %s at %s: not using %s (%s); every request goes through %s",
                        self.version, self.path, linear.FILE, exc, self.runtime)
            return
        self.linear = scorer

    def warm(self) -> None:
        if self.numeric:
            self.predict(np.zeros((1, len(self.features))), proba=self.kind == "classification")

    def predict(self, X, proba: bool = False):
        """X: float matrix (numeric models) or DataFrame, or the ``Scored`` rows the linear fast path
        already predicted. Returns (labels, probabilities or None)."""
        if type(X) is Scored:
            return X.labels, None
        if self.linear is not None and type(X) is np.ndarray:
            labels = self.linear.matrix_labels(X)
            if labels is not None:  # the labels are the scorer's whatever is asked, so they never depend on it
                return labels, (self._run_model(X, proba)[1] if proba else None)
        return self._run_model(X, proba)

    def _run_model(self, X, proba: bool):
        if self._sess is not None:
            feed = {self._input_name: np.ascontiguousarray(X, dtype=self._input_dtype)}
            outs = self._run(self._outputs, feed, None) if self._run else self._sess.run(None, feed)
            labels = outs[0].ravel() if self.kind == "regression" or outs[0].ndim > 1 else outs[0]
            return labels, (outs[1] if proba and len(outs) > 1 else None)
        if self.numeric and isinstance(X, np.ndarray):
            import pandas as pd
            X = pd.DataFrame(X, columns=self.features)
        labels = self._model.predict(X)
        probs = self._model.predict_proba(X) if proba and hasattr(self._model, "predict_proba") else None
        return labels, probs


class ModelSlot:
    """What one worker serves, and why it serves it."""

    def __init__(self, model_dir: Path, require_onnx: bool):
        self.model_dir = Path(model_dir)
        self.key = self.model_dir.name  # how metrics tell this slot from the others of a multi-model host
        self.require_onnx = require_onnx
        self.model: LoadedModel | None = None
        self.error: str | None = None
        self._seen_link: str | None = None   # the 'current' link target the last load looked at
        self.watching = False

    def _link(self) -> str | None:
        try:
            return os.readlink(self.model_dir / "current")
        except OSError:
            return None

    def _candidates(self) -> list[int]:
        out = []
        for v in (hostdir.current(self.model_dir), self._last_good(), hostdir.previous(self.model_dir)):
            if v is not None and v not in out:
                out.append(v)
        return out

    def _last_good(self) -> int | None:
        try:
            return int((self.model_dir / LAST_GOOD).read_text().strip())
        except (OSError, ValueError):
            return None

    def _mark_good(self, version: int) -> None:
        try:
            tmp = self.model_dir / f".last-good.{os.getpid()}"
            tmp.write_text(str(version))
            os.replace(tmp, self.model_dir / LAST_GOOD)
        except OSError:
            pass

    def load(self) -> None:
        self._seen_link = self._link()
        wanted = hostdir.current(self.model_dir)
        errors = []
        for version in self._candidates():
            try:
                self.model = LoadedModel.load(self.model_dir / str(version), self.require_onnx)
            except (MlpipeError, OSError, ValueError, KeyError) as exc:
                errors.append(f"v{version}: {exc}")
                metrics().load_failures.labels(model=self.key, version=str(version)).inc()
                log.error("refusing model v%s in %s: %s", version, self.model_dir, exc)
                continue
            self.error = "; ".join(errors) or None
            if version == wanted:
                self._mark_good(version)
            log.info("serving %s v%s (%s)%s", self.model.name, version, self.model.runtime,
                     "" if version == wanted else f" instead of current v{wanted}")
            break
        else:
            self.model = None
            self.error = "; ".join(errors) or hostdir.nothing_active(self.model_dir)
        metrics().set_model(self.model, self.key)

    # -- switching versions without a reload -----------------------------------------------------
    def watch(self, interval: float = 0.2) -> None:
        """Follow the ``current`` link in a daemon thread of this process: when it points somewhere
        new, load and warm that version beside the one serving, then swap them (one reference
        assignment: a request in flight finishes on the version it started with). A version that
        fails to load is not swapped in: the old one keeps answering and ``error`` (``/metadata``'s
        ``load_error``) says why, until the link changes again. No link at all: nothing is served.
        A deploy therefore never reloads the server: no worker stops, no request waits for one to
        start (a gunicorn HUP stops the old workers before the new ones have loaded their model)."""
        if self.watching:
            return
        self.watching = True
        ref = weakref.ref(self)
        threading.Thread(target=_follow, args=(ref, interval), name="mlpipe-model-watch", daemon=True).start()

    def follow_once(self) -> bool:
        """One look at the link; True when it changed (and was acted on)."""
        link = self._link()
        if link == self._seen_link:
            return False
        self._seen_link = link
        wanted = hostdir.current(self.model_dir)
        if wanted is None:
            if self.model is not None:
                log.warning("%s has no 'current' version any more: serving nothing", self.model_dir)
            self.model = None
            self.error = hostdir.nothing_active(self.model_dir)
            metrics().set_model(None, self.key)
            return True
        if self.model is not None and self.model.version == wanted and self.model.path == self.model_dir / str(wanted):
            self.error = None
            return True
        # The load holds the interpreter lock for stretches (reading, verifying, building the
        # session): with a short switch interval a request waits at most 0.5 ms for it, not 5 ms.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 0.0005))
        try:
            new = LoadedModel.load(self.model_dir / str(wanted), self.require_onnx)
        except (MlpipeError, OSError, ValueError, KeyError) as exc:
            metrics().load_failures.labels(model=self.key, version=str(wanted)).inc()
            old = f"; still serving v{self.model.version}" if self.model is not None else ""
            self.error = f"v{wanted}: {exc}{old}"
            log.error("refusing model v%s in %s: %s%s", wanted, self.model_dir, exc, old)
            return True
        finally:
            sys.setswitchinterval(interval)
        before = self.model
        self.model, self.error = new, None
        self._mark_good(wanted)
        metrics().set_model(new, self.key)
        log.info("serving %s v%s (%s), switched from %s without a reload", new.name, wanted, new.runtime,
                 f"v{before.version}" if before is not None else "nothing")
        return True


def _follow(ref, interval: float) -> None:
    while True:
        time.sleep(interval)
        owner = ref()
        if owner is None:  # the app that owned it is gone (tests make many)
            return
        try:
            owner.follow_once()
        except Exception:  # a bug here must not stop this worker from following later switches
            log.exception("following the model folders failed")
        del owner


class Models:
    """The models one worker serves, by name: one folder (``model_dir``, as a single-model host has)
    or every model folder under ``models_dir`` (``<models_dir>/<name>/current``), looked at again
    every fraction of a second: a folder that appears is loaded and served, one that goes is
    dropped, and each follows its own ``current`` link (``ModelSlot.follow_once``), so deploying,
    adding or removing one model never touches the others and never reloads the server."""

    def __init__(self, require_onnx: bool, model_dir: str | Path | None = None, models_dir: str | Path | None = None):
        self.require_onnx = require_onnx
        self.root = Path(models_dir) if models_dir else None
        self.slots: dict[str, ModelSlot] = {}
        self.watching = False
        if self.root is None:
            slot = ModelSlot(Path(model_dir), require_onnx)
            self.slots = {slot.key: slot}
        else:
            self._scan()

    @property
    def slots(self) -> dict[str, ModelSlot]:
        return self._slots

    @slots.setter
    def slots(self, value: dict[str, ModelSlot]) -> None:
        """Always a new dict (readers never see one being changed), and with it the one slot of a
        single-model host, which every unnamed request asks for (``only``)."""
        self._slots = value
        self._only = next(iter(value.values())) if len(value) == 1 else None

    def load(self) -> None:
        for slot in list(self.slots.values()):
            if slot._seen_link is None and slot.model is None:
                slot.load()

    def _folders(self) -> dict[str, Path]:
        """Model folders under the root: a valid model name holding a 'current' link or a version."""
        from mlpipe.registry import check_name
        out = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return out
        for e in entries:
            if e.name.startswith(".") or not e.is_dir():
                continue
            try:
                check_name(e.name)
            except MlpipeError:
                continue
            p = Path(e.path)
            if os.path.islink(p / "current") or any(c.isdigit() for c in os.listdir(p)):
                out[e.name] = p
        return out

    def _scan(self) -> bool:
        found = self._folders()
        changed = False
        for name in [n for n in self.slots if n not in found]:
            log.warning("%s is gone from %s: no longer serving it", name, self.root)
            self.slots = {k: v for k, v in self.slots.items() if k != name}  # a new dict, as below
            metrics().drop_model(name)
            changed = True
        for name, path in sorted(found.items()):
            if name not in self.slots:
                slot = ModelSlot(path, self.require_onnx)
                if self.watching:  # a model added while serving: loaded here, in the watcher
                    slot.load()
                self.slots = {**self.slots, name: slot}  # a new dict: readers never see one being changed
                changed = True
        return changed

    def follow_once(self) -> None:
        if self.root is not None:
            self._scan()
        for slot in list(self.slots.values()):
            slot.follow_once()

    def watch(self, interval: float = 0.2) -> None:
        """Follow the folders in a daemon thread of this process (see the class and ModelSlot.watch)."""
        if self.watching:
            return
        self.watching = True
        for slot in self.slots.values():
            slot.watching = True
        threading.Thread(target=_follow, args=(weakref.ref(self), interval), name="mlpipe-model-watch",
                         daemon=True).start()

    # -- lookups on the request path ---------------------------------------------------------------
    def get(self, name: str) -> ModelSlot | None:
        slot = self.slots.get(name)
        if slot is not None:
            return slot
        if self.root is None:  # one folder: it answers to the name of the model it holds, and while
            only = next(iter(self.slots.values()))  # it holds none, to any (its 503 says what is wrong)
            if only.model is None or only.model.name == name:
                return only
        return None

    def only(self) -> ModelSlot | None:
        """The slot that unnamed routes (/invocations, /metadata) use: the host's one model."""
        return self._only

    def names(self) -> list[str]:
        return sorted(self.slots)
