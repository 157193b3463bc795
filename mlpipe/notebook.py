"""Notebooks in the pipeline: run the spec's ``notebook:`` with papermill and keep its output in the version.

The API (what ``mlpipe train`` and ``mlpipe retrain`` use)::

    from mlpipe import notebook
    manifest = reg.register(workdir, message, prepare=notebook.preparer(spec, workdir))  # None: no notebook
    status = notebook.record_outcome(reg, manifest)    # None (no notebook) | "ok" | "failed"
    if status == "failed":                             # the version is registered all the same
        sys.exit(notebook.EXIT_FAILED)                 # 13, errors.RETRAIN_EXIT["notebook_failed"]

``run(spec, workdir, version, timeout=600) -> dict`` executes ``spec.notebook`` on the ``python3``
Jupyter kernel, in the notebook's folder, with these parameters injected after the cell tagged
``parameters``: ``model`` (name), ``version`` (int), ``data_source`` (the spec's source, passwords
masked), ``metrics`` (dict, from the workdir's manifest) and ``model_dir`` (str: the artifact folder
with model.joblib, holdout.parquet, manifest.json). Papermill reads and writes local files only.
The executed notebook is written into the workdir as ``notebook.ipynb`` (also when a cell fails: it
then holds the traceback), listed in the manifest's ``files`` (sha256, size; the id recomputed),
and the manifest gets::

    "notebook": {"source": "notebooks/report.ipynb",   # as the spec names it
                 "file": "notebook.ipynb",              # None when nothing could be written
                 "status": "ok" | "failed", "seconds": 4.2, "error": None | "what failed (how to fix it)"}

``run`` returns that dict and never raises for a failing notebook (a cell error, a dead kernel, the
timeout, papermill or the kernel missing). ``timeout`` (seconds) bounds the whole run, kernel start
included: each cell gets what is left of it. ``record_outcome`` writes the ledger event ``notebook_ran``
(version, seconds, file) or ``notebook_failed`` (version, reason = the error).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from mlpipe import artifact
from mlpipe.errors import RETRAIN_EXIT

OUTPUT_FILE = "notebook.ipynb"
KERNEL = "python3"
EXIT_FAILED = RETRAIN_EXIT["notebook_failed"]
START_TIMEOUT = 60
INSTALL_KERNEL = "run 'make venv', or: python -m ipykernel install --sys-prefix --name python3"
INSTALL_EXTRA = "pip install 'mlpipe[notebooks]' (papermill, ipykernel, nbformat, matplotlib)"

log = logging.getLogger("mlpipe.notebook")


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _timed_out_cell(exc: BaseException) -> str:
    """The first line of the cell nbclient stopped (its message carries a preview of the cell)."""
    text = str(exc)
    _, sep, preview = text.partition("preview of the cell contents:")
    lines = [ln.strip() for ln in preview.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    return f"the cell starting {lines[0][:60]!r}" if sep and lines else "a cell"


def _explain(exc: BaseException, source: str, timeout: float, kernel: str, ref: str) -> str:
    """One message: what failed, and how to fix it."""
    name = type(exc).__name__
    see = f"see the traceback in {OUTPUT_FILE} of the version: mlpipe models pull {ref} --file {OUTPUT_FILE} --dest ."
    if name == "PapermillExecutionError":
        where = f"cell In [{exc.exec_count}]" if getattr(exc, "exec_count", None) else "a cell"
        evalue = _first_line(getattr(exc, "evalue", "")) or "(no message)"
        return (f"notebook {source}: {where} raised {getattr(exc, 'ename', 'an error')}: {evalue} "
                f"({see}; fix the notebook and train again)")
    if name == "CellTimeoutError":
        return (f"notebook {source} ran longer than its {timeout:g} s timeout (stopped in {_timed_out_cell(exc)}) "
                f"(make it faster, e.g. plot a sample of the holdout, or train with --no-notebook)")
    if name == "DeadKernelError":
        return (f"notebook {source}: the Jupyter kernel died while running it (out of memory, a crash in native code, "
                f"or exit() in a cell) ({see})")
    if name == "NoSuchKernel":
        return f"notebook {source}: no Jupyter kernel named '{kernel}' is installed ({INSTALL_KERNEL})"
    if isinstance(exc, ImportError):
        return f"notebook {source}: cannot run notebooks here: {exc} ({INSTALL_EXTRA})"
    if isinstance(exc, FileNotFoundError):
        return f"notebook {source}: {exc.filename or exc} not found (check 'notebook' in the spec)"
    if name in ("NotJSONError", "ValidationError") or type(exc).__module__.startswith("nbformat"):
        return f"notebook {source} is not a valid Jupyter notebook: {_first_line(exc)} (open and save it in Jupyter)"
    if isinstance(exc, RuntimeError) and "kernel" in str(exc).lower():
        return (f"notebook {source}: the Jupyter kernel '{kernel}' did not start: {_first_line(exc)} "
                f"(check that ipykernel is installed in the kernel's Python; {INSTALL_KERNEL})")
    return f"notebook {source} failed: {name}: {_first_line(exc)}"


def _parameters(spec, workdir: Path, version: int, manifest: dict) -> dict:
    from mlpipe.data import redact_source
    return {"model": spec.name, "version": int(version), "data_source": redact_source(spec.data["source"]),
            "metrics": dict(manifest.get("metrics") or {}), "model_dir": str(workdir)}


def run(spec, workdir: Path, version: int, timeout: float = 600, kernel: str = KERNEL) -> dict:
    """Execute ``spec.notebook`` for the artifact in ``workdir`` (about to be registered as ``version``),
    store it as ``workdir/notebook.ipynb`` and record it in the manifest. Returns the manifest's
    ``notebook`` entry; never raises for a failing notebook (see the module docstring)."""
    workdir = Path(workdir).resolve()
    src = Path(spec.notebook).resolve()  # a local path: papermill never reads or writes a URL here
    source = str((spec.raw or {}).get("notebook") or spec.notebook)
    out = workdir / OUTPUT_FILE
    manifest = artifact.read_manifest(workdir)
    if OUTPUT_FILE in (manifest.get("files") or {}):  # run again: the old output goes
        manifest["files"] = {k: v for k, v in manifest["files"].items() if k != OUTPUT_FILE}
        manifest = artifact.write_manifest(workdir, manifest)
    if out.exists():
        out.unlink()
    error = None
    t0 = time.monotonic()
    deadline = t0 + timeout
    pm_log = logging.getLogger("papermill")
    level = pm_log.level
    pm_log.setLevel(logging.CRITICAL)  # its errors are ours to report, once
    try:
        import papermill
        papermill.execute_notebook(
            str(src), str(out), parameters=_parameters(spec, workdir, version, manifest),
            kernel_name=kernel, language="python", cwd=str(src.parent), progress_bar=False,
            start_timeout=min(START_TIMEOUT, max(1.0, timeout)),
            # one deadline for the whole notebook: each cell gets what is left of it
            timeout_func=lambda cell: max(1.0, deadline - time.monotonic()),
            extra_arguments=["--Application.log_level=CRITICAL"])  # no kernel chatter on our stderr
    except Exception as exc:  # a failing notebook is an outcome, not an error (module docstring)
        error = _explain(exc, source, timeout, kernel, f"{spec.name}:{version}")
    finally:
        pm_log.setLevel(level)
    seconds = round(time.monotonic() - t0, 3)
    info = {"source": source, "file": OUTPUT_FILE if out.is_file() else None,
            "status": "failed" if error else "ok", "seconds": seconds, "error": error}
    if info["file"]:
        artifact.add_file(workdir, OUTPUT_FILE, fields={"notebook": info})
    else:
        artifact.update_manifest(workdir, {"notebook": info})
    return info


def preparer(spec, workdir: Path, enabled: bool = True, timeout: float = 600) -> Callable[[int], dict] | None:
    """The ``prepare`` callable for :meth:`Registry.register` that runs the spec's notebook once the
    version number is known; None when the spec names no notebook (or ``enabled`` is false)."""
    if not enabled or not getattr(spec, "notebook", None):
        return None
    return lambda n: run(spec, workdir, n, timeout=timeout)


def record_outcome(reg, manifest: dict) -> str | None:
    """Write the ledger event for a registered version's notebook: ``notebook_ran`` (seconds, file) or
    ``notebook_failed`` (reason = the error). Returns its status: "ok", "failed", or None (no notebook).
    A ledger that cannot be written costs a warning, never the outcome (the version exists)."""
    info = manifest.get("notebook")
    if not isinstance(info, dict):
        return None
    name, version = manifest["name"], manifest["version"]
    status = "ok" if info.get("status") == "ok" else "failed"
    try:
        if status == "ok":
            reg.record(name, "notebook_ran", version=version, seconds=info.get("seconds"), file=info.get("file"),
                       source=info.get("source"))
        else:
            reg.record(name, "notebook_failed", version=version, reason=info.get("error") or "the notebook failed",
                       file=info.get("file"), source=info.get("source"))
    except Exception as exc:
        log.warning("%s:%s: the ledger event for its notebook (%s) could not be written: %s", name, version, status, exc)
    return status


def describe(info: dict | None) -> str | None:
    """The ``Notebook:`` line of ``mlpipe models show``."""
    if not isinstance(info, dict):
        return None
    file = info.get("file") or "(no output)"
    if info.get("status") == "ok":
        return f"{file} (ran in {float(info.get('seconds') or 0):.1f} s, from {info.get('source')})"
    return f"{file} FAILED: {info.get('error')}"
