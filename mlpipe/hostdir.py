"""A serving host's model folder::

    <dir>/<N>/               pulled, verified versions (the last K kept)
    <dir>/current  -> <N>    switched atomically: a new symlink renamed over the old one
    <dir>/previous -> <N-1>
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlpipe.errors import NotFound


def _target(link: Path) -> int | None:
    try:
        t = os.readlink(link)
    except OSError:
        return None
    name = Path(t).name
    return int(name) if name.isdigit() else None


def current(directory: Path) -> int | None:
    return _target(Path(directory) / "current")


def previous(directory: Path) -> int | None:
    return _target(Path(directory) / "previous")


def _link(directory: Path, name: str, version: int) -> None:
    tmp = directory / f".{name}.tmp.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(str(version), tmp)  # relative: the folder can move
    os.replace(tmp, directory / name)


def activate(directory: Path, version: int, keep: int = 3, set_previous: int | None = None) -> bool:
    """Point ``current`` at ``version`` and ``previous`` at the old current, or at ``set_previous``
    (a rollback after a failed deploy restores both links as they were). Returns changed."""
    directory = Path(directory)
    if not (directory / str(version) / "manifest.json").is_file():
        raise NotFound(f"version {version} is not pulled into {directory}", hint="run mlpipe models pull first")
    old = current(directory)
    new_previous = set_previous if set_previous is not None else (old if old != version else previous(directory))
    changed = False
    if new_previous is not None and new_previous != previous(directory) and (directory / str(new_previous)).is_dir():
        _link(directory, "previous", new_previous)
        changed = True
    if old != version:
        _link(directory, "current", version)
        changed = True
    if changed:
        prune(directory, keep)
    return changed


def nothing_active(directory: Path) -> str:
    """Why a model folder has nothing to serve, and the command that fixes it (for a server's "not
    ready" answers and for ``models pull`` without ``--activate``)."""
    directory = Path(directory)
    reload = "and the server starts serving it within a second (no reload needed)"
    if not directory.is_dir():
        return (f"{directory} does not exist: run `mlpipe models pull NAME@production --dest {directory} --activate`, "
                f"{reload}")
    pulled = sorted(int(p.name) for p in directory.iterdir()
                    if p.is_dir() and p.name.isdigit() and (p / "manifest.json").is_file())
    if not pulled:
        return (f"nothing is pulled into {directory}: run `mlpipe models pull NAME@production --dest {directory} "
                f"--activate`, {reload}")
    name = "NAME"
    try:
        import json
        name = json.loads((directory / str(pulled[-1]) / "manifest.json").read_text()).get("name") or name
    except (OSError, ValueError):
        pass
    shown = ", ".join(f"v{v}" for v in pulled)
    return (f"{shown} {'is' if len(pulled) == 1 else 'are'} pulled into {directory} but none is active (no 'current' "
            f"symlink): run `mlpipe models pull {name}:{pulled[-1]} --dest {directory} --activate` (nothing is "
            f"downloaded again), {reload}")


def prune(directory: Path, keep: int) -> list[int]:
    """Delete version folders beyond the newest ``keep``, never current or previous."""
    directory = Path(directory)
    protected = {current(directory), previous(directory)}
    versions = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and not p.is_symlink())
    removed = []
    for v in versions[:-keep] if keep > 0 else versions:
        if v not in protected:
            shutil.rmtree(directory / str(v), ignore_errors=True)
            removed.append(v)
    return removed
