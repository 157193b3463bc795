"""Predicting one row: scikit-learn against the ONNX graph mlpipe compiles at registration.

The same fitted models (RandomForest(100) and LogisticRegression on breast_cancer) go through
mlpipe's own conversion and agreement check (mlpipe.onnx.convert_and_check), then each predicts
single rows of the whole data set in turn, interleaved, median of 5 rounds. Labels must be identical.

Usage: python benchmarks/onnx_vs_sklearn.py
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from mlpipe import onnx


def per_row_ms(fn, rows) -> float:
    t = time.perf_counter()
    for r in rows:
        fn(r)
    return (time.perf_counter() - t) / len(rows) * 1000


def main() -> None:
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    print(f"{'model':<22}{'sklearn ms/row':>16}{'onnxruntime ms/row':>20}{'speed-up':>10}  labels")
    for label, est in (("RandomForest(100)", RandomForestClassifier(100, random_state=0)),
                       ("LogisticRegression", LogisticRegression(max_iter=5000))):
        est.fit(X, y)
        data, info = onnx.convert_and_check(est, X, X, classifier=True)
        assert data is not None, info
        sess = onnx.session(data)
        frames = [X.iloc[i:i + 1] for i in range(len(X))]
        arrays = [X.to_numpy(dtype=np.float64)[i:i + 1] for i in range(len(X))]
        sk, ox = [], []
        for _ in range(5):
            sk.append(per_row_ms(est.predict, frames))
            ox.append(per_row_ms(lambda a: onnx.run(sess, a), arrays))
        same = np.array_equal(onnx.run(sess, X.to_numpy(dtype=np.float64))[0], est.predict(X))
        s, o = statistics.median(sk), statistics.median(ox)
        print(f"{label:<22}{s:>16.3f}{o:>20.4f}{s / o:>9.0f}x  {'identical' if same else 'DIFFERENT'} ({info['precision']})")


if __name__ == "__main__":
    main()
