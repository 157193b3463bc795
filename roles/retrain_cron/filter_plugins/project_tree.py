"""The deploy project's files as retrain_cron copies them (on the controller).

    {{ src | mlpipe_project_tree(['ansible.cfg', 'playbooks', 'roles'], skip_regex) }}

A list, parents before children, of {path (relative to src), state (directory or file), mode, checksum}:
mode is what the copy gets (0750 for folders and executables, 0640 for the rest: root's, read by the
user's group), checksum the sha1 of a file (ansible.builtin.find's get_checksum) so that only what
differs is sent. Symbolic links are followed; entries missing from src are left out; paths matching
skip_regex (caches) are never listed.
"""
from __future__ import annotations

import hashlib
import os
import re

from ansible.errors import AnsibleFilterError


def _sha1(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def _file(src, rel):
    full = os.path.join(src, rel)
    executable = os.stat(full).st_mode & 0o111
    return {"path": rel, "state": "file", "mode": "0750" if executable else "0640", "checksum": _sha1(full)}


def mlpipe_project_tree(src, entries, skip=None):
    if not isinstance(src, str) or not os.path.isdir(os.path.expanduser(src)):
        raise AnsibleFilterError(f"mlpipe_project_tree: {src!r} is not a folder on the controller")
    src = os.path.realpath(os.path.expanduser(src))
    skipped = re.compile(skip).search if skip else (lambda _: False)
    out = []
    for entry in entries:
        full = os.path.join(src, entry)
        if skipped(entry) or not os.path.exists(full):
            continue
        if not os.path.isdir(full):
            out.append(_file(src, entry))
            continue
        for root, dirs, files in os.walk(full, followlinks=True):
            rel_root = os.path.relpath(root, src)
            dirs[:] = sorted(d for d in dirs if not skipped(os.path.join(rel_root, d)))
            out.append({"path": rel_root, "state": "directory", "mode": "0750", "checksum": ""})
            for name in sorted(files):
                rel = os.path.join(rel_root, name)
                if not skipped(rel) and os.path.isfile(os.path.join(src, rel)):
                    out.append(_file(src, rel))
    return out


class FilterModule:
    def filters(self):
        return {"mlpipe_project_tree": mlpipe_project_tree}
