"""Send rows of scikit-learn's breast-cancer data to a credit-risk endpoint, one row per request, and
write the true label of each answered request id to a CSV that ``mlpipe feedback load`` takes.

    python examples/send_traffic.py http://127.0.0.10:8080 --rows 300 --labels labels.csv
    mlpipe feedback load credit-risk labels.csv

``--drift 1.5`` multiplies the size features (radius, perimeter, area) to show what drift looks like;
``--flip`` writes the opposite labels (a world where the old model is wrong).
"""
from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from sklearn.datasets import load_breast_cancer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="the balancer or a server, e.g. http://127.0.0.10:8080")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--labels", default=None, help="write request_id,label here")
    ap.add_argument("--drift", type=float, default=1.0, help="multiply the size features by this")
    ap.add_argument("--flip", action="store_true", help="write the opposite labels")
    ap.add_argument("--token", default=None, help="bearer token, when the servers want one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="credit-risk", help="the model's name (its route: /models/NAME/invocations)")
    args = ap.parse_args()
    frame = load_breast_cancer(as_frame=True).frame.sample(args.rows, replace=True, random_state=args.seed)
    for c in frame.columns:
        if any(k in c for k in ("radius", "perimeter", "area")):
            frame[c] = frame[c] * args.drift
    cols = [c for c in frame.columns if c != "target"]
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    def one(i):
        row = frame.iloc[i]
        r = requests.post(f"{args.url.rstrip('/')}/models/{args.model}/invocations", headers=headers, timeout=10,
                          json={"dataframe_split": {"columns": cols, "data": [row[cols].tolist()]}})
        label = int(row["target"])
        return r.status_code, r.headers.get("X-Request-Id"), (1 - label) if args.flip else label
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(len(frame))))
    ok = [(rid, label) for status, rid, label in answers if status == 200 and rid]
    print(f"{len(ok)} of {len(answers)} requests answered" + ("" if len(ok) == len(answers) else
                                                          f"; statuses: {sorted({s for s, _, _ in answers})}"))
    if args.labels:
        with open(args.labels, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["request_id", "label"])
            w.writerows(ok)
        print(f"true labels of the answered requests: {args.labels}")
    return 0 if len(ok) == len(answers) else 1


if __name__ == "__main__":
    sys.exit(main())
