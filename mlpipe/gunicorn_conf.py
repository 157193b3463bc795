"""gunicorn settings for mlpipe: ``gunicorn -c python:mlpipe.gunicorn_conf 'mlpipe.serve:create_app()'``.

Reads the same configuration as the app (MLPIPE_SERVE_CONFIG file, MLPIPE_* environment). The master
imports the heavy libraries once, so the workers a graceful reload (SIGHUP) forks only have to load
and warm the model. Prometheus multi-process metrics live in one fresh folder per master.
"""
import os
import shutil
import tempfile

from mlpipe.serve import load_config

_cfg = load_config()

bind = [b.strip() for b in str(_cfg["bind"]).split(",") if b.strip()]
workers = _cfg["workers"]
timeout = _cfg["timeout"]
graceful_timeout = max(30, _cfg["timeout"])
worker_class = "sync"
accesslog = os.environ.get("MLPIPE_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("MLPIPE_LOG_LEVEL", "info")
control_socket_disable = True  # gunicorn >= 27: one shared default path would clash between servers on a host
proc_name = f"mlpipe:{os.path.basename(os.path.abspath(_cfg['model_dir'] or _cfg['models_dir']))}"

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mlpipe-metrics-")
os.environ["MLPIPE_UNDER_GUNICORN"] = "1"

# imported once in the master; forked workers share them. Not onnxruntime: its global state does
# not survive fork (workers would hang in its destructors at exit). Not scikit-learn or pandas
# either: the ONNX path needs neither, and they would add ~1 s to every start.
import flask  # noqa: E402,F401
import numpy  # noqa: E402,F401
import prometheus_client  # noqa: E402,F401
# the capture library (SQLAlchemy: ~0.3 s to import) is imported here too, so a worker does not pay for
# it at its first sampled request; no engine or connection is made in the master (they would not
# survive fork): each worker's Recorder opens its own
import mlpipe.capture  # noqa: E402,F401


def on_starting(server):
    d = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))


def worker_exit(server, worker):
    """Runs in the worker after its last request. Leave without C++ static destructors: onnxruntime's
    can block forever in a forked process (seen: pthread_cond_destroy at exit), which would hold a
    graceful reload until the worker timeout."""
    import sys
    from mlpipe.serve import prometheus
    if prometheus._METRICS is not None and prometheus._METRICS.capture_source is not None:
        prometheus._METRICS.capture_source.close(timeout=2.0)  # captured rows still queued
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").startswith(tempfile.gettempdir()):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
