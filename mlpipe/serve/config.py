"""The server's settings: defaults < ``MLPIPE_SERVE_CONFIG`` file (YAML or JSON) < ``MLPIPE_*``
environment < the dict given to ``create_app``, each coerced and checked."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlpipe.errors import UsageError

DEFAULTS = {"model_dir": "", "models_dir": "", "bind": "127.0.0.1:8000", "workers": 2, "auth_tokens": [], "max_rows": 10000,
            "max_body_bytes": 10 * 1024 * 1024, "require_onnx": False, "timeout": 30,
            "capture_db": "", "capture_sample": None, "capture_max_age": None, "capture_max_rows": None,
            "host": ""}
ENV = {"model_dir": "MLPIPE_MODEL_DIR", "models_dir": "MLPIPE_MODELS_DIR", "bind": "MLPIPE_BIND", "workers": "MLPIPE_WORKERS",
       "auth_tokens": "MLPIPE_AUTH_TOKENS", "max_rows": "MLPIPE_MAX_ROWS", "max_body_bytes": "MLPIPE_MAX_BODY_BYTES",
       "require_onnx": "MLPIPE_REQUIRE_ONNX", "timeout": "MLPIPE_TIMEOUT", "capture_db": "MLPIPE_CAPTURE_DB",
       "capture_sample": "MLPIPE_CAPTURE_SAMPLE", "capture_max_age": "MLPIPE_CAPTURE_MAX_AGE",
       "capture_max_rows": "MLPIPE_CAPTURE_MAX_ROWS", "host": "MLPIPE_HOST"}


def _coerce(key: str, value: Any) -> Any:
    if key == "auth_tokens":
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        tokens = [str(t).strip() for t in (value or [])]
        if "" in tokens or any(any(c.isspace() for c in t) for t in tokens):
            raise UsageError("serve setting 'auth_tokens' has an empty token or one with whitespace",
                             hint="every token must be a non-empty string without spaces (an empty one would let "
                                  "requests without a token in)")
        return tokens
    if key == "capture_sample":
        if value in (None, ""):
            return None
        try:
            share = float(value)
        except (TypeError, ValueError):
            share = -1.0
        if isinstance(value, bool) or not 0 <= share <= 1:
            raise UsageError(f"serve setting 'capture_sample' must be a share between 0 and 1, got {value!r}",
                             hint="0 turns capture off, 0.1 records one request in ten, 1 records every request")
        return share
    if key in ("capture_max_age", "capture_max_rows") and value in (None, ""):
        return None  # the served version's spec (capture.max_age / max_rows), else 30d / 1,000,000
    if key == "capture_max_age":
        from mlpipe.spec import parse_duration
        from mlpipe.errors import SpecError
        try:
            return parse_duration(value, "serve setting 'capture_max_age'")
        except SpecError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None
    if key == "capture_db" and value:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        try:
            make_url(str(value))
        except ArgumentError:
            raise UsageError("serve setting 'capture_db' is not a database URL",
                             hint="write sqlite:////var/lib/mlpipe/capture.db or "
                                  "postgresql://user:password@host/db (empty: a SQLite file under the host's root)") from None
        return str(value)
    if key in ("workers", "max_rows", "max_body_bytes", "timeout", "capture_max_rows"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"serve setting '{key}' must be a whole number, got {value!r}") from None
    if key == "require_onnx":
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    return value


def load_config(config: dict | None = None) -> dict:
    """Defaults < file (MLPIPE_SERVE_CONFIG, YAML or JSON) < environment < ``config``."""
    out = dict(DEFAULTS)
    path = (config or {}).get("config_file") or os.environ.get("MLPIPE_SERVE_CONFIG")
    if path:
        import yaml
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read serve config {path}: {exc}") from None
        unknown = set(data) - set(DEFAULTS)
        if unknown:
            raise UsageError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}",
                             hint=f"known: {', '.join(sorted(DEFAULTS))}")
        out.update(data)
    if os.environ.get("MLPIPE_AUTH_TOKENS_FILE"):
        out["auth_tokens"] = Path(os.environ["MLPIPE_AUTH_TOKENS_FILE"]).read_text().split()
    for key, env in ENV.items():
        if os.environ.get(env) not in (None, ""):
            out[key] = os.environ[env]
    for key, value in (config or {}).items():
        if key != "config_file":
            out[key] = value
    out = {k: _coerce(k, v) for k, v in out.items()}
    if not out["model_dir"] and not out["models_dir"]:
        raise UsageError("no model directory configured",
                         hint="set MLPIPE_MODEL_DIR (a folder with a 'current' symlink, see mlpipe models pull --activate), "
                              "or MLPIPE_MODELS_DIR (a folder of such folders, one per model: a multi-model host)")
    if out["model_dir"] and out["models_dir"]:
        raise UsageError("both model_dir and models_dir are set",
                         hint="model_dir serves one model's folder; models_dir serves every model folder under it: set one")
    return out
