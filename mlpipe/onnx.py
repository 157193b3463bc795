"""Convert a fitted estimator to ONNX and accept the conversion only if it agrees with scikit-learn.

Classifiers must give identical labels on the test split; regressors must stay within
``REGRESSION_RTOL`` relative (``REGRESSION_ATOL`` absolute) of scikit-learn's predictions.
"""
from __future__ import annotations

import copy
import threading

import numpy as np

REGRESSION_RTOL = 1e-4
REGRESSION_ATOL = 1e-5


def _numeric(X) -> bool:
    from pandas.api.types import is_bool_dtype, is_numeric_dtype
    return all(is_numeric_dtype(dt) or is_bool_dtype(dt) for dt in X.dtypes)


def _tree_based(est) -> bool:
    last = est.steps[-1][1] if hasattr(est, "steps") else est
    return type(last).__module__.startswith(("sklearn.tree", "sklearn.ensemble._forest", "sklearn.ensemble._gb",
                                               "sklearn.ensemble._hist_gradient_boosting"))


def preload(X_train) -> threading.Thread | None:
    """Import skl2onnx and onnxruntime (~0.15 s) in a thread while the caller fits the model; join it
    before making a :class:`Conversion`. None when no conversion will be tried (non-numeric features)
    or both are imported already. A fit imports nothing as a rule, so the two threads do not import
    the same modules at once."""
    import sys
    if ("skl2onnx" in sys.modules and "onnxruntime" in sys.modules) or not _numeric(X_train):
        return None
    # Importing holds the GIL. The fit mostly runs without it, but each time it needs it back it waits
    # for the importing thread to yield, by default up to 5 ms: a shorter switch interval while the
    # imports run costs the fit ~0.03 s instead of ~0.08 s (RandomForest, 150 trees).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))

    def imports():
        try:
            import onnxruntime  # noqa: F401
            import skl2onnx  # noqa: F401
        except Exception:  # not installed, or broken: Conversion says so when it imports them again
            pass
        finally:
            sys.setswitchinterval(interval)

    thread = threading.Thread(target=imports, name="mlpipe-onnx-imports", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: import after the fit instead
        sys.setswitchinterval(interval)
        return None
    return thread


def convert_and_check(est, X_train, X_test, classifier: bool, want=None):
    """Return (onnx_bytes or None, info dict). Never raises: ONNX is a fast path, not a requirement.

    ``want`` is scikit-learn's ``predict(X_test)`` when the caller already has it (scoring computed
    it); the parity check predicts itself otherwise."""
    return Conversion(est, X_train, X_test, classifier).result(want)


class Conversion:
    """:func:`convert_and_check` in steps, so that a caller can overlap the slow part with its own work::

        conv = Conversion(est, X_train, X_test, classifier)
        conv.start()                   # conversion, ONNX session and predictions of the test split, in
        ...                            # a thread (numpy and onnxruntime release the GIL: mostly another core)
        data, info = conv.result(want)  # waits, then the parity check

    The outcome is the same as convert_and_check's. Never raises."""

    def __init__(self, est, X_train, X_test, classifier: bool):
        self.est, self.X_test, self.classifier = est, X_test, classifier
        self._outcome = None  # (onnx bytes, ONNX outputs on X_test, {"precision"}) or (None, None, info)
        self._thread = None
        self._interval = None  # the caller's switch interval while the thread runs
        if not _numeric(X_train):
            self._outcome = (None, None, {"status": "skipped", "reason": "non-numeric features"})
            return
        try:
            import skl2onnx  # noqa: F401
        except ImportError:
            self._outcome = (None, None, {"status": "skipped", "reason": "skl2onnx not installed"})
            return
        self._options = {id(est): {"zipmap": False}} if classifier else None
        self._x1 = X_train.iloc[:1].to_numpy(dtype=np.float64)
        # scikit-learn's trees compare float32 features (they cast X themselves), so float32 is exact for
        # them and converts several times faster; other models keep double precision. The agreement
        # check is the judge either way.
        attempts = [(np.float64, None), (np.float64, {"": 21, "ai.onnx.ml": 5}), (np.float32, None)]
        self._attempts = attempts[2:] + attempts[:2] if _tree_based(est) else attempts

    def _convert(self, dtype, opset) -> bytes:
        x1 = self._x1.astype(dtype)
        data = _forest_to_onnx(self.est, x1, self._options) if dtype is np.float32 and opset is None else None
        if data is None:
            from skl2onnx import to_onnx
            data = to_onnx(self.est, x1, options=self._options, target_opset=opset).SerializeToString()
        return data

    def _finish(self):
        Xte = self.X_test.to_numpy(dtype=np.float64)
        errors = []
        for dtype, opset in self._attempts:
            try:
                data = self._convert(dtype, opset)
                got = run(session(data), Xte)
                return data, got, {"precision": "float64" if dtype is np.float64 else "float32"}
            except Exception as exc:  # unsupported estimator, converter or runtime limits
                errors.append(str(exc).splitlines()[0][:200])
        return None, None, {"status": "unsupported", "reason": errors[-1]}

    def _run(self):
        try:
            self._outcome = self._finish()
        except BaseException as exc:  # never raise: a failure is an outcome like any other
            self._outcome = (None, None, {"status": "unsupported",
                                          "reason": (str(exc).splitlines() or [type(exc).__name__])[0][:200]})
        finally:  # the thread puts the switch interval back itself: the caller may never call result()
            if self._interval is not None:
                import sys
                sys.setswitchinterval(self._interval)

    def start(self) -> "Conversion":
        if self._outcome is None and self._thread is None:
            import sys
            # The conversion is partly Python (it holds the GIL); the caller's scoring mostly runs without
            # it but waits up to the switch interval (5 ms) each time it needs it back, so the interval is
            # short while the thread runs (as preload() does during the fit).
            self._interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._interval, 0.0005))
            self._thread = threading.Thread(target=self._run, name="mlpipe-onnx", daemon=True)
            try:
                self._thread.start()
            except RuntimeError:  # no thread to be had: result() converts in the caller's thread
                self._thread = None
                sys.setswitchinterval(self._interval)
                self._interval = None
        return self

    def result(self, want=None):
        """(onnx_bytes or None, info dict): the bytes only when ONNX agrees with scikit-learn on X_test."""
        if self._thread is not None:
            self._thread.join()
        elif self._outcome is None:
            self._run()
        return _check(self.est, self.X_test, self.classifier, self._outcome, want)


def _check(est, X_test, classifier: bool, compiled, want=None):
    data, got, info = compiled
    if data is None:
        return None, info
    if want is None:
        want = est.predict(X_test)
    if classifier:
        ok = bool(np.array_equal(np.asarray(got[0]).ravel(), np.asarray(want).ravel()))
        detail = {"check": "identical labels on the test split", "rows": int(len(want))}
    else:
        g = np.asarray(got[0], dtype=np.float64).ravel()
        ok = bool(np.allclose(g, np.asarray(want, dtype=np.float64), rtol=REGRESSION_RTOL, atol=REGRESSION_ATOL))
        detail = {"check": f"rtol={REGRESSION_RTOL} atol={REGRESSION_ATOL} on the test split",
                  "rows": int(len(want)), "max_abs_diff": float(np.max(np.abs(g - want))) if len(g) else 0.0}
    if not ok:
        return None, {"status": "rejected", "reason": "ONNX predictions disagree with scikit-learn", **detail}
    return data, {"status": "ok", "precision": info["precision"], **detail}


# ------------------------------------------------------------------ forests without the per-node Python loop
# skl2onnx writes a forest's TreeEnsembleClassifier/Regressor node one tree node at a time in Python
# (~2.5 s for 150 trees of 2,600 nodes) and then copies the big attribute lists around several times.
# For a RandomForest/ExtraTrees (alone or ending a Pipeline) in float32 we let skl2onnx convert a
# one-tree copy of the model (inputs, outputs, labels, every other node), check that our numpy
# version of its node attributes is exactly what skl2onnx wrote for that tree, and then fill in the
# attributes for all the trees. The result is byte for byte the model skl2onnx writes (tests compare).

_NODE_ATTRS = ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
               "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true", "nodes_hitrates")


def _forest_kinds() -> dict:
    from sklearn.ensemble import (ExtraTreesClassifier, ExtraTreesRegressor, RandomForestClassifier,
                                  RandomForestRegressor)
    return {RandomForestClassifier: True, ExtraTreesClassifier: True,
            RandomForestRegressor: False, ExtraTreesRegressor: False}


_MODES = np.array([b"LEAF", b"BRANCH_LEQ"], dtype=object)


def forest_attributes(trees: list, classifier: bool) -> dict | None:
    """The attribute lists skl2onnx's ``add_tree_to_attribute_pairs`` builds for these fitted
    ``tree_`` objects (single output, float32 input, leaf values averaged over the trees), as numpy
    arrays, in the same order and with the same float arithmetic. None when a threshold is not finite
    in float32 (skl2onnx's own rounding is then what it is; let it convert)."""
    weight = 1.0 / len(trees)
    tid, nid, feat, thr, left, right, value = [], [], [], [], [], [], []
    for t, tree in enumerate(trees):
        n = tree.node_count
        tid.append(np.full(n, t, dtype=np.int64))
        nid.append(np.arange(n, dtype=np.int64))
        feat.append(tree.feature.astype(np.int64))
        thr.append(tree.threshold)
        left.append(tree.children_left.astype(np.int64))
        right.append(tree.children_right.astype(np.int64))
        value.append(tree.value)
    tid, nid, feat, thr, left, right = (np.concatenate(a) for a in (tid, nid, feat, thr, left, right))
    value = np.concatenate(value)                      # (nodes, n_outputs, n_classes)
    branch = (left > nid) | (right > nid)              # skl2onnx's test for an inner node
    # sklearn_threshold(dtype=float32): the float32 w with (float)x <= t  <=>  (float)x <= w
    t = thr[branch]
    fy = t.astype(np.float32)
    if not np.all(np.isfinite(fy)):
        return None
    values = np.zeros(len(thr), dtype=np.float32)
    values[branch] = np.where(fy.astype(np.float64) <= t, fy, np.nextafter(fy, np.float32(-np.inf)))
    zero = np.zeros(len(thr), dtype=np.int64)
    attrs = {"nodes_treeids": tid, "nodes_nodeids": nid,
             "nodes_featureids": np.where(branch, feat, zero),
             "nodes_modes": _MODES[branch.view(np.int8)],  # shared bytes objects: cheap to list
             "nodes_values": values,
             "nodes_truenodeids": np.where(branch, left, zero),
             "nodes_falsenodeids": np.where(branch, right, zero),
             "nodes_missing_value_tracks_true": zero,
             "nodes_hitrates": np.ones(len(thr), dtype=np.float32)}
    leaf = ~branch
    lv = value[leaf].reshape(int(leaf.sum()), -1)      # weights.flatten() of every leaf
    if classifier:  # class counts/fractions normalised: tree_weight / sum(weights), summed left to right
        s = np.zeros(len(lv), dtype=np.float64)
        for j in range(lv.shape[1]):
            s = s + lv[:, j]
        lw = lv * (weight / np.where(s != 0.0, s, 1.0))[:, None]
        if lw.shape[1] == 2:                           # binary: only the positive class is stored
            lw = lw[:, 1:]
    else:
        lw = lv * weight
    k = lw.shape[1]
    prefix = "class" if classifier else "target"
    attrs[f"{prefix}_treeids"] = np.repeat(tid[leaf], k)
    attrs[f"{prefix}_nodeids"] = np.repeat(nid[leaf], k)
    attrs[f"{prefix}_ids"] = np.tile(np.arange(k, dtype=np.int64), len(lw))
    attrs[f"{prefix}_weights"] = lw.ravel().astype(np.float32)
    return attrs


def _forest_to_onnx(est, x1: np.ndarray, options: dict | None) -> bytes | None:
    """skl2onnx's float32 ONNX model of a forest (or a Pipeline ending in one), or None when the
    model is not one this shortcut covers (the caller then runs skl2onnx itself)."""
    from onnx import AttributeProto
    from skl2onnx import to_onnx
    pipeline = hasattr(est, "steps")
    forest = est.steps[-1][1] if pipeline else est
    kinds = _forest_kinds()
    if type(forest) not in kinds or getattr(forest, "n_outputs_", None) != 1 \
            or len(getattr(forest, "estimators_", ())) < 2:
        return None
    classifier = kinds[type(forest)]
    stub_forest = copy.copy(forest)
    stub_forest.estimators_ = forest.estimators_[:1]
    ids = {id(forest): id(stub_forest)}
    stub = stub_forest
    if pipeline:
        stub = copy.copy(est)
        stub.steps = [*est.steps[:-1], (est.steps[-1][0], stub_forest)]
        ids[id(est)] = id(stub)
    model = to_onnx(stub, x1, options={ids.get(k, k): v for k, v in options.items()} if options else options)
    op_type = "TreeEnsembleClassifier" if classifier else "TreeEnsembleRegressor"
    nodes = [n for n in model.graph.node if n.op_type == op_type and n.domain == "ai.onnx.ml"]
    prefix = "class" if classifier else "target"
    names = set(_NODE_ATTRS) | {f"{prefix}_{k}" for k in ("treeids", "nodeids", "ids", "weights")}
    fields = {AttributeProto.INTS: "ints", AttributeProto.FLOATS: "floats", AttributeProto.STRINGS: "strings"}
    if len(nodes) != 1:
        return None
    attrs = {a.name: a for a in nodes[0].attribute if a.name in names}
    if set(attrs) != names or any(a.type not in fields for a in attrs.values()):
        return None
    one = forest_attributes([t.tree_ for t in stub_forest.estimators_], classifier)
    if one is None or any(list(getattr(a, fields[a.type])) != one[n].tolist() for n, a in attrs.items()):
        return None  # skl2onnx wrote the one-tree node differently than we would: do not guess
    full = forest_attributes([t.tree_ for t in forest.estimators_], classifier)
    if full is None:
        return None
    return _splice(model, nodes[0], {n: (a, _unpacked(a.type, full[n])) for n, a in attrs.items()}) \
        or _merged(model, {n: (a, full[n]) for n, a in attrs.items()})


def _unpacked(kind: int, values: np.ndarray) -> bytes:
    """A repeated attribute list as protobuf writes it (onnx.proto is proto2: unpacked, each element
    with its own tag), built with numpy."""
    from onnx import AttributeProto
    if kind == AttributeProto.FLOATS:              # field 7, fixed32: tag 0x3d + 4 bytes each
        out = np.empty((len(values), 5), dtype=np.uint8)
        out[:, 0] = 0x3D
        out[:, 1:] = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4)
        return out.tobytes()
    if kind == AttributeProto.INTS:                # field 8, varint: tag 0x40 + varint each
        return _varints(values, tag=0x40)
    items = values.tolist()                        # field 9, bytes: tag 0x4a + length + bytes each
    wire = {v: b"\x4a" + _varint(len(v)) + v for v in set(items)}  # few distinct values (LEAF, BRANCH_LEQ)
    return b"".join(map(wire.__getitem__, items))


def _splice(model, node, lists: dict) -> bytes | None:
    """The model's bytes with ``lists`` ({name: (attribute, its elements as wire bytes)}) written
    into ``node``'s attributes, without protobuf parsing and re-serializing megabytes: each list is
    serialized as a unique placeholder, which is replaced by the real bytes, and the length prefixes
    around it (the attribute's in the node, the node's in the graph, the graph's in the model) are
    rewritten. None when a placeholder or a field is not found exactly once (the caller then lets
    protobuf do it). Tests compare the result with skl2onnx's own bytes."""
    import os
    from onnx import AttributeProto
    marks = {}
    for name, (a, _) in lists.items():
        key = int.from_bytes(os.urandom(8), "little") >> 2
        if a.type == AttributeProto.FLOATS:
            values = np.frombuffer(os.urandom(12), dtype="<u4") & np.uint32(0x3EFFFFFF)  # finite floats
            a.floats[:] = values.view("<f4").tolist()
            marks[name] = _unpacked(a.type, values.view("<f4"))
        elif a.type == AttributeProto.INTS:
            a.ints[:] = [key, key ^ 0x5A5A5A5A]
            marks[name] = _unpacked(a.type, np.array([key, key ^ 0x5A5A5A5A], dtype=np.int64))
        else:
            a.strings[:] = [b"\0mlpipe-placeholder-" + key.to_bytes(8, "little")]
            marks[name] = _unpacked(a.type, np.array(list(a.strings), dtype=object))
    node_bytes, graph_bytes, model_bytes = node.SerializeToString(), model.graph.SerializeToString(), model.SerializeToString()
    # the node as parts: its own bytes between the attributes that change, and each of those rebuilt
    # (its head with the new length, its bytes before the placeholder, the list, its bytes after)
    cuts = []
    for name, mark in marks.items():
        old = lists[name][0].SerializeToString()
        at = _find_field(node_bytes, b"\x2a", old)                 # NodeProto.attribute = 5
        if at is None or old.count(mark) != 1:
            return None
        i = old.index(mark)
        body = [old[:i], lists[name][1], old[i + len(mark):]]
        cuts.append((at[0], at[1], [b"\x2a" + _varint(sum(map(len, body))), *body]))
    cuts.sort(key=lambda c: c[0])
    node_parts, pos = [], 0
    for begin, end, parts in cuts:
        if begin < pos:
            return None
        node_parts += [node_bytes[pos:begin], *parts]
        pos = end
    node_parts.append(node_bytes[pos:])
    in_graph = _find_field(graph_bytes, b"\x0a", node_bytes)        # GraphProto.node = 1
    in_model = _find_field(model_bytes, b"\x3a", graph_bytes)       # ModelProto.graph = 7
    if in_graph is None or in_model is None:
        return None
    node_size = sum(map(len, node_parts))
    graph_parts = [graph_bytes[:in_graph[0]], b"\x0a" + _varint(node_size), *node_parts, graph_bytes[in_graph[1]:]]
    graph_size = sum(map(len, graph_parts))
    return b"".join([model_bytes[:in_model[0]], b"\x3a" + _varint(graph_size), *graph_parts, model_bytes[in_model[1]:]])


def _find_field(outer: bytes, tag: bytes, inner: bytes) -> tuple[int, int] | None:
    """(start, end) in ``outer`` of its one length-delimited field ``tag`` holding ``inner``, or None
    when it is not there exactly once."""
    field = tag + _varint(len(inner)) + inner
    if outer.count(field) != 1:
        return None
    at = outer.index(field)
    return at, at + len(field)


def _merged(model, lists: dict) -> bytes:
    """The same bytes as :func:`_splice`, through protobuf: each list merged from packed wire bytes
    (parsed in C, several times faster than Python lists), then the model serialized."""
    from onnx import AttributeProto
    for a, values in lists.values():
        if a.type == AttributeProto.FLOATS:    # field 7 (floats), packed little-endian float32
            data = np.ascontiguousarray(values, dtype="<f4").tobytes()
            a.floats[:] = []
            a.MergeFromString(b"\x3a" + _varint(len(data)) + data)
        elif a.type == AttributeProto.INTS:    # field 8 (ints), packed varints
            data = _varints(values)
            a.ints[:] = []
            a.MergeFromString(b"\x42" + _varint(len(data)) + data)
        else:                                  # field 9 (strings): unpacked is the only way
            a.strings[:] = []
            a.MergeFromString(_unpacked(a.type, values))
    return model.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _varints(values: np.ndarray, tag: int | None = None) -> bytes:
    """Protobuf varints of int64 values, concatenated (negative values as their 10-byte two's
    complement); with ``tag``, that byte before each one (an unpacked repeated field)."""
    v = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    if not len(v):
        return b""
    top, width = v.max(), 1
    while width < 10 and top >= np.uint64(1 << (7 * width)):
        width += 1
    lead = 0 if tag is None else 1
    if width == 1:                                 # every value below 128 (ids of classes, features): one byte each
        if tag is None:
            return v.astype(np.uint8).tobytes()
        out = np.empty((len(v), 2), dtype=np.uint8)
        out[:, 0], out[:, 1] = tag, v
        return out.tobytes()
    size = np.ones(len(v), dtype=np.int64)
    for k in range(1, width):
        size += v >= np.uint64(1 << (7 * k))
    start = np.cumsum(size + lead) - size          # where each value's first varint byte goes
    out = np.empty(int(start[-1] + size[-1]), dtype=np.uint8)
    if lead:
        out[start - 1] = tag
    for k in range(width):
        at = np.flatnonzero(size > k) if k else slice(None)
        byte = (v[at] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (size[at] > k + 1).astype(np.uint64) << np.uint64(7)
        out[start[at] + k] = (byte | more).astype(np.uint8)
    return out.tobytes()


def session(data: bytes):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    # The graphs mlpipe writes are one converter's output (a tree ensemble is a single node): graph
    # rewrites find nothing to gain and cost ~0.05 s per session of a 150-tree forest. Training's
    # parity check and the server build their sessions here, with the same options.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(sess, X: np.ndarray):
    """Feed a float matrix; returns the session's outputs (labels first, probabilities second)."""
    inp = sess.get_inputs()[0]
    dtype = np.float32 if "float)" in inp.type and "double" not in inp.type else np.float64
    return sess.run(None, {inp.name: np.ascontiguousarray(X, dtype=dtype)})
