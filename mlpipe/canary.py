"""The guarded canary: after a deploy's canary passed its checks, it takes a share of live traffic
(HAProxy weights) for a baking period while its live figures are compared with the hosts still on
the old version. What `mlpipe fleet bake` and `mlpipe fleet lb-weights` run; model_deploy calls them.

    scrape          one host's cumulative prediction-route figures from its ``/metrics`` (Prometheus
                    text, parsed with prometheus_client): requests by status class, the latency
                    histogram, predicted rows, predicted labels (classifiers) or the predicted-value
                    histogram (regressors), and the version(s) its workers serve
    bake            scrape every host at the start, every ``interval`` seconds and at the end; each
                    side's figures are the deltas over the window, summed over its hosts (canary vs.
                    the hosts still on the old version). Stops early when the canary's error rate is
                    already over the limit on enough requests (errors hurt users now; latency and the
                    prediction distribution are judged over the whole window)
    judge           error rate (5xx share of prediction requests) and client error rate (4xx share:
                    a version that refuses what the old one accepted fails live traffic too; a client
                    sending bad requests to every host raises both sides alike) as differences; p99
                    latency as ``canary <= old * ratio + slack``; the prediction distribution as the
                    total variation distance between the two sides' label (or value-bin) shares.
                    A side with fewer than ``min_requests`` prediction requests is "not enough
                    traffic": not judged, and the verdict says so (``quiet``: pass with that note, or
                    fail). Without any host on the old version (one host, or every other host down or
                    already switched) the canary is judged alone: its error rates against zero; p99
                    and predictions are not judged
    weights         HAProxy runtime weights so that the canary(s) get a share of the backend's
                    traffic (the other servers that are up keep their proportions); ``reset`` puts
                    every server whose weight differs from its configured one back (an interrupted
                    bake leaves them changed: every deploy and rollback starts with a reset)
"""
from __future__ import annotations

import math
import time
from typing import Callable

from mlpipe.errors import NotReady, UsageError

DEFAULTS = {"seconds": 300, "interval": 5.0, "max_error_rate_delta": 0.01, "max_p99_ratio": 1.5, "p99_slack_ms": 10.0,
            "max_prediction_shift": 0.2, "min_requests": 50, "quiet": "pass"}
PREDICT_SUFFIXES = ("/invocations", "/infer")
CANARY_FAILS_IN_A_ROW = 3   # periodic /metrics scrapes of the canary that may fail before the bake stops


def is_predict_route(endpoint: str | None) -> bool:
    return bool(endpoint) and endpoint.endswith(PREDICT_SUFFIXES)


# ------------------------------------------------------------------------------------------ scrape
def scrape(url: str, token: str | None = None, timeout: float = 5.0, model: str | None = None) -> dict:
    """Cumulative prediction-route figures of one server's ``/metrics``. Series with a ``model``
    label count only for ``model`` (when given). Raises NotReady when /metrics does not answer."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(f"{url.rstrip('/')}/metrics", headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise NotReady(f"{url}/metrics did not answer ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise NotReady(f"{url}/metrics answered HTTP {r.status_code}")
    out: dict = {"requests": 0.0, "by_class": {}, "buckets": {}, "rows": 0.0, "classes": {}, "values": {},
                 "versions": []}

    def mine(labels: dict) -> bool:
        return model is None or labels.get("model", labels.get("name", model)) == model

    for family in text_string_to_metric_families(r.text):
        name = family.name
        for s in family.samples:
            lab = s.labels
            if name == "mlpipe_requests" and s.name.endswith("_total"):
                if is_predict_route(lab.get("endpoint")) and mine(lab):
                    cls = f"{str(lab.get('status', '?'))[:1]}xx"
                    out["requests"] += s.value
                    out["by_class"][cls] = out["by_class"].get(cls, 0.0) + s.value
            elif name == "mlpipe_request_seconds" and s.name.endswith("_bucket"):
                if is_predict_route(lab.get("endpoint")) and mine(lab):
                    out["buckets"][lab["le"]] = out["buckets"].get(lab["le"], 0.0) + s.value
            elif name == "mlpipe_predicted_rows" and s.name.endswith("_total") and mine(lab):
                out["rows"] += s.value
            elif name == "mlpipe_predictions" and s.name.endswith("_total") and mine(lab):
                out["classes"][lab["label"]] = out["classes"].get(lab["label"], 0.0) + s.value
            elif name == "mlpipe_prediction_value" and s.name.endswith("_bucket") and mine(lab):
                out["values"][lab["le"]] = out["values"].get(lab["le"], 0.0) + s.value
            elif name == "mlpipe_model_info" and s.value >= 1 and mine(lab) and lab.get("version") is not None:
                if lab["version"] not in out["versions"]:
                    out["versions"].append(lab["version"])
    return out


def delta(end: dict, start: dict) -> dict | None:
    """end - start, or None when a counter went down (the server restarted in between)."""
    d: dict = {"requests": end["requests"] - start["requests"], "rows": end["rows"] - start["rows"]}
    for key in ("by_class", "buckets", "classes", "values"):
        d[key] = {k: v - start[key].get(k, 0.0) for k, v in end[key].items()}
        if any(start[key].get(k, 0.0) > end[key].get(k, 0.0) for k in start[key]) or any(v < 0 for v in d[key].values()):
            return None
    if d["requests"] < 0 or d["rows"] < 0:
        return None
    return d


def _add(total: dict, d: dict) -> None:
    total["requests"] += d["requests"]
    total["rows"] += d["rows"]
    for key in ("by_class", "buckets", "classes", "values"):
        for k, v in d[key].items():
            total[key][k] = total[key].get(k, 0.0) + v


def _empty() -> dict:
    return {"requests": 0.0, "rows": 0.0, "by_class": {}, "buckets": {}, "classes": {}, "values": {}}


def shares(d: dict) -> dict[str, float]:
    """The prediction distribution of a side: label shares (classifiers) or value-bin shares
    (regressors, the bins of the prediction-value histogram)."""
    if d["classes"]:
        n = sum(d["classes"].values())
        return {k: v / n for k, v in sorted(d["classes"].items()) if v > 0} if n > 0 else {}
    if d["values"]:
        cum = sorted(((float(le), c) for le, c in d["values"].items()), key=lambda t: t[0])
        n = cum[-1][1]
        if n <= 0:
            return {}
        out, prev_le, prev = {}, "-Inf", 0.0
        for le, c in cum:
            out[f"({prev_le}, {'+Inf' if math.isinf(le) else f'{le:g}'}]"] = (c - prev) / n
            prev_le, prev = f"{le:g}", c
        return {k: v for k, v in out.items() if v > 0}
    return {}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Half the L1 distance between two distributions over the same outcomes: the share of
    predictions that would have to change for one side to look like the other (0 same, 1 disjoint)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def figures(d: dict) -> dict:
    """One side's figures over the window."""
    from mlpipe.monitor import histogram_quantile
    n = d["requests"]
    p99 = histogram_quantile(0.99, d["buckets"]) if d["buckets"] else None
    return {"requests": int(round(n)), "server_errors": int(round(d["by_class"].get("5xx", 0.0))),
            "client_errors": int(round(d["by_class"].get("4xx", 0.0))),
            "error_rate": d["by_class"].get("5xx", 0.0) / n if n > 0 else None,
            "client_error_rate": d["by_class"].get("4xx", 0.0) / n if n > 0 else None,
            "p99_ms": None if p99 is None else p99 * 1000, "rows": int(round(d["rows"])), "predictions": shares(d)}


# ------------------------------------------------------------------------------------------- judge
def judge(canary: dict, old: dict | None, limits: dict) -> dict:
    """Checks and a verdict from both sides' figures (``old`` None: no host on the old version)."""
    lim = {**DEFAULTS, **{k: v for k, v in limits.items() if v is not None}}
    min_n = lim["min_requests"]
    checks: list[dict] = []
    notes: list[str] = []
    canary_ok = canary["requests"] >= min_n
    old_ok = old is not None and old["requests"] >= min_n
    if not canary_ok:
        notes.append(f"not enough traffic: the canary answered {canary['requests']} prediction requests, "
                     f"fewer than {min_n}")
    if old is None:
        notes.append("no host on the old version to compare with: the canary's error rates are judged "
                     "against zero, its latency and predictions are not judged")
    elif not old_ok:
        notes.append(f"not enough traffic on the old version ({old['requests']} prediction requests, fewer than "
                     f"{min_n}): the canary's error rates are judged against zero, its latency and predictions "
                     "are not judged")
    for key, what in (("error_rate", "error rate (5xx)"), ("client_error_rate", "client error rate (4xx)")):
        base = old[key] if old_ok else 0.0
        value = canary[key]
        judged = canary_ok and value is not None
        checks.append({"check": key, "what": what, "canary": value, "old": old[key] if old else None,
                       "limit": f"+{100 * lim['max_error_rate_delta']:g} points", "allowed": (base or 0.0) + lim["max_error_rate_delta"],
                       "passed": (value <= (base or 0.0) + lim["max_error_rate_delta"]) if judged else None})
    judged = canary_ok and old_ok and canary["p99_ms"] is not None and old["p99_ms"] is not None
    allowed = old["p99_ms"] * lim["max_p99_ratio"] + lim["p99_slack_ms"] if judged else None
    checks.append({"check": "p99_ms", "what": "latency p99 (ms)", "canary": canary["p99_ms"],
                   "old": old["p99_ms"] if old else None,
                   "limit": f"x{lim['max_p99_ratio']:g} + {lim['p99_slack_ms']:g} ms", "allowed": allowed,
                   "passed": canary["p99_ms"] <= allowed if judged else None})
    judged = canary_ok and old_ok and canary["rows"] >= min_n and old["rows"] >= min_n \
        and bool(canary["predictions"]) and bool(old["predictions"])
    shift = total_variation(canary["predictions"], old["predictions"]) if judged else None
    checks.append({"check": "prediction_shift", "what": "prediction distribution (total variation distance)",
                   "canary": canary["predictions"], "old": old["predictions"] if old else None,
                   "value": shift, "limit": f"{lim['max_prediction_shift']:g}", "allowed": lim["max_prediction_shift"],
                   "passed": shift <= lim["max_prediction_shift"] if judged else None})
    breached = [c["check"] for c in checks if c["passed"] is False]
    if breached:
        verdict = "breach"
    elif not canary_ok:
        verdict = "not_enough_traffic"
    else:
        verdict = "pass"
    passed = verdict == "pass" or (verdict == "not_enough_traffic" and lim["quiet"] == "pass")
    return {"verdict": verdict, "passed": passed, "breached": breached, "checks": checks, "notes": notes}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:.1f} ms"


def describe(report: dict) -> str:
    """One line: the verdict and both sides' figures of every check (the playbook's summary and stderr)."""
    parts = []
    for c in report.get("checks", []):
        if c["check"] in ("error_rate", "client_error_rate"):
            parts.append(f"{c['what']} canary {_pct(c['canary'])} vs old {_pct(c['old'])} (allowed {c['limit']})")
        elif c["check"] == "p99_ms":
            parts.append(f"p99 canary {_ms(c['canary'])} vs old {_ms(c['old'])} (allowed {c['limit']})")
        else:
            top = lambda d: ", ".join(f"{k}: {100 * v:.0f}%" for k, v in sorted(d.items(), key=lambda t: -t[1])[:3]) if d else "n/a"
            parts.append(f"predictions canary {{{top(c['canary'])}}} vs old {{{top(c['old'] or {})}}}, shift "
                         f"{'n/a' if c['value'] is None else format(c['value'], '.3f')} (allowed {c['limit']})")
        if c["passed"] is False:
            parts[-1] += " BREACH"
    return "; ".join(parts)


# -------------------------------------------------------------------------------------------- bake
def _named(items) -> list[tuple[str, str]]:
    """``NAME=URL`` or a bare URL (its own name)."""
    out = []
    for item in items:
        name, sep, url = item.partition("=")
        out.append((name, url) if sep and "://" not in name else (item, item))
    return out


def bake(canary: list[str], baseline: list[str], seconds: float, *, token: str | None = None,
         model: str | None = None, expect_version: int | str | None = None, limits: dict | None = None,
         interval: float | None = None, timeout: float = 5.0, log: Callable[[str], None] | None = None,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Watch the canary host(s) for ``seconds`` and compare them with the ``baseline`` hosts (each
    ``NAME=URL`` or a URL). Returns the report; ``report["passed"]`` is the verdict."""
    limits = {**DEFAULTS, **{k: v for k, v in (limits or {}).items() if v is not None}}
    interval = float(interval if interval is not None else limits["interval"])
    if not canary:
        raise UsageError("a bake needs a canary (--canary NAME=URL)")
    if seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {seconds}")
    if limits["quiet"] not in ("pass", "fail"):
        raise UsageError(f"--quiet must be pass or fail, got {limits['quiet']!r}")
    log = log or (lambda _m: None)
    want = None if expect_version in (None, "") else str(expect_version)
    canaries, olds = _named(canary), _named(baseline)
    notes: list[str] = []
    hosts: dict[str, dict] = {}

    def get(url):
        return scrape(url, token, timeout, model)

    # start: every canary must answer; an old-version host that does not is left out
    for name, url in canaries:
        last = None
        for _ in range(3):
            try:
                hosts[name] = {"side": "canary", "url": url, "start": get(url), "fails": 0}
                break
            except NotReady as exc:
                last = exc
                sleep(1)
        else:
            return _finish(hosts, notes, limits, 0.0, seconds, False,
                           failure=f"the canary {name}: {last.message}: it cannot be watched")
    for name, url in olds:
        try:
            first = get(url)
        except NotReady as exc:
            notes.append(f"{name} left out: {exc.message} at the start")
            continue
        if want is not None and want in first["versions"]:
            notes.append(f"{name} left out: it already serves v{want}")
            continue
        hosts[name] = {"side": "old", "url": url, "start": first, "fails": 0}
    for name, h in hosts.items():
        if h["side"] == "canary" and want is not None and h["start"]["versions"] and want not in h["start"]["versions"]:
            return _finish(hosts, notes, limits, 0.0, seconds, False,
                           failure=f"the canary {name} serves v{', v'.join(h['start']['versions'])}, not v{want}")
        h["last"] = h["start"]
    t0 = clock()
    log(f"baking for {seconds:g} s: canary {', '.join(n for n, _ in canaries)} vs "
        f"{', '.join(n for n, h in hosts.items() if h['side'] == 'old') or 'no host on the old version'}")
    while True:
        left = seconds - (clock() - t0)
        final = left <= interval
        sleep(max(left, 0.0) if final else interval)
        failure = _poll(hosts, get, want, notes, final, sleep)
        elapsed = clock() - t0
        if failure:
            return _finish(hosts, notes, limits, elapsed, seconds, False, failure=failure)
        report = _finish(hosts, notes, limits, elapsed, seconds, final)
        if final:
            return report
        errors = [c for c in report["checks"] if c["check"] in ("error_rate", "client_error_rate") and c["passed"] is False]
        if errors:
            report["stopped_early"] = True
            report["notes"].append(f"stopped after {elapsed:.0f} of {seconds:g} s: the canary's "
                                   f"{errors[0]['what']} is over the limit already")
            return report
        log(f"{elapsed:.0f} s: {describe(report)}")


def _poll(hosts: dict, get, want, notes: list, final: bool, sleep) -> str | None:
    """One scrape of every host; the canary's failure (as a message) or None."""
    for name, h in list(hosts.items()):
        tries = 3 if final and h["side"] == "canary" else 1
        for attempt in range(tries):
            try:
                cur = get(h["url"])
                break
            except NotReady as exc:
                if attempt + 1 < tries:
                    sleep(1)
                    continue
                h["fails"] += 1
                if h["side"] == "canary" and (final or h["fails"] >= CANARY_FAILS_IN_A_ROW):
                    return f"the canary {name}: {exc.message}"
                if h["side"] == "old" and final:
                    notes.append(f"{name}: {exc.message} at the end: its figures are those of its last answer")
                cur = None
        if cur is None:
            continue
        h["fails"] = 0
        if delta(cur, h["start"]) is None:
            if h["side"] == "canary":
                return f"the canary {name} restarted during the bake (its counters went down)"
            notes.append(f"{name} left out: it restarted during the bake (its counters went down)")
            del hosts[name]
            continue
        if want is not None and cur["versions"]:
            if h["side"] == "canary" and want not in cur["versions"]:
                return f"the canary {name} stopped serving v{want} (it serves v{', v'.join(cur['versions'])})"
            if h["side"] == "old" and want in cur["versions"]:
                notes.append(f"{name} left out: it switched to v{want} during the bake")
                del hosts[name]
                continue
        h["last"] = cur
    return None


def _finish(hosts: dict, notes: list, limits: dict, elapsed: float, seconds: float, final: bool,
            failure: str | None = None) -> dict:
    sides = {"canary": _empty(), "old": _empty()}
    per_host = {}
    for name, h in hosts.items():
        d = delta(h.get("last", h["start"]), h["start"])
        if d is None:
            continue
        _add(sides[h["side"]], d)
        per_host[name] = {"side": h["side"], "url": h["url"], **figures(d)}
    has_old = any(h["side"] == "old" for h in hosts.values())
    canary, old = figures(sides["canary"]), (figures(sides["old"]) if has_old else None)
    report = judge(canary, old, limits)
    report.update({"seconds": round(elapsed, 1), "planned_seconds": seconds, "complete": final, "stopped_early": False,
                   "canary": canary, "old": old, "hosts": per_host,
                   "canary_hosts": sorted(n for n, h in hosts.items() if h["side"] == "canary"),
                   "old_hosts": sorted(n for n, h in hosts.items() if h["side"] == "old"),
                   "limits": {k: limits[k] for k in ("max_error_rate_delta", "max_p99_ratio", "p99_slack_ms",
                                                     "max_prediction_shift", "min_requests", "quiet")}})
    report["notes"] = list(notes) + report["notes"]
    if failure:
        report.update({"verdict": "breach", "passed": False, "failure": failure})
        report["breached"] = report["breached"] + ["canary_unavailable"]
    return report


def message(report: dict) -> str:
    """The one line a failed bake says on stderr (and the summary shows)."""
    head = report.get("failure") or (
        "not enough traffic to judge the canary" if report["verdict"] == "not_enough_traffic"
        else f"the canary breached {', '.join(report['breached'])}" if report["breached"] else "passed")
    return (f"bake over {report['seconds']:g} s{' (stopped early)' if report.get('stopped_early') else ''}: {head}: "
            f"{describe(report)}")


# ----------------------------------------------------------------------------------------- weights
def _admin(sock: str, command: str, timeout: float = 5.0) -> str:
    from mlpipe.fleet import lb_command
    return lb_command(sock, command, timeout)


def server_weights(sock: str, backend: str) -> dict[str, dict]:
    """{server: {"weight": the runtime (user) weight, "initial": the configured weight}} from
    ``show servers state`` (a drained server keeps its weight: draining is an admin state)."""
    text = _admin(sock, f"show servers state {backend}")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = next((ln.lstrip("# ").split() for ln in lines if ln.startswith("#")), None)
    if header is None or "srv_uweight" not in header:
        raise NotReady(f"HAProxy on {sock} has no backend '{backend}': {text.strip()[:200]}",
                       hint="check model_deploy_lb_backend")
    out = {}
    for ln in lines:
        if ln.startswith("#") or ln.strip().isdigit():
            continue
        row = dict(zip(header, ln.split()))
        if row.get("be_name") == backend:
            out[row["srv_name"]] = {"weight": int(row["srv_uweight"]), "initial": int(row["srv_iweight"])}
    if not out:
        raise NotReady(f"HAProxy on {sock} has no backend '{backend}' with servers", hint="check model_deploy_lb_backend")
    return out


def weights_for(canaries: dict[str, int], others: dict[str, int], share: float) -> dict[str, int]:
    """Integer HAProxy weights (1..256) that give the ``canaries`` (name -> configured weight)
    together ``share`` of the traffic, the ``others`` keeping their proportions."""
    a, b = sum(canaries.values()), sum(others.values())
    if not 0 < share < 1:
        raise UsageError(f"the canary's share must be between 0 and 100 percent, got {100 * share:g}")
    ratio = share * b / ((1 - share) * a)        # canary multiplier / other multiplier
    best = None
    for m in range(1, 256 // max(others.values()) + 1):
        n = max(1, round(ratio * m))
        if n * max(canaries.values()) > 256:
            break
        got = n * a / (n * a + m * b)
        if best is None or abs(got - share) < best[0] - 1e-12:
            best = (abs(got - share), n, m)
    if best is None:   # even one step of the others is too much for the canary's side: give it all it may
        best = (0, 256 // max(canaries.values()), 1)
    _, n, m = best
    return {**{s: w * m for s, w in others.items()}, **{s: w * n for s, w in canaries.items()}}


def set_canary_weights(sock: str, backend: str, canaries: list[str], percent: float) -> dict:
    """Give ``canaries`` ``percent`` of the backend's traffic among the servers that are up."""
    from mlpipe.fleet import lb_status
    st = lb_status(sock, backend)
    known = server_weights(sock, backend)
    missing = [c for c in canaries if c not in known]
    if missing:
        raise UsageError(f"HAProxy's backend '{backend}' has no server {', '.join(missing)}")
    up = set(st["up"])
    cans = {c: max(known[c]["initial"], 1) for c in canaries if c in up}
    others = {s: max(v["initial"], 1) for s, v in known.items() if s in up and s not in canaries}
    if not cans or not others:
        return {"changed": False, "weights": {s: v["weight"] for s, v in known.items()}, "share": None,
                "note": "no other server is up: the canary takes all the traffic" if cans else
                        "the canary is not up in the balancer: weights unchanged"}
    want = weights_for(cans, others, percent / 100.0)
    changed = False
    for server, w in want.items():
        if known[server]["weight"] != w:
            _check(_admin(sock, f"set weight {backend}/{server} {w}"), server)
            changed = True
    total = sum(want.values())
    return {"changed": changed, "weights": want, "share": round(sum(want[c] for c in cans) / total, 4),
            "note": None}


def reset_weights(sock: str, backend: str) -> dict:
    """Every server whose runtime weight differs from its configured one gets the configured one."""
    known = server_weights(sock, backend)
    reset = {}
    for server, v in known.items():
        if v["weight"] != v["initial"]:
            _check(_admin(sock, f"set weight {backend}/{server} {v['initial']}"), server)
            reset[server] = {"was": v["weight"], "now": v["initial"]}
    return {"changed": bool(reset), "reset": reset}


def _check(answer: str, server: str) -> None:
    if answer.strip():
        raise NotReady(f"HAProxy refused to set the weight of {server}: {answer.strip()[:200]}")
