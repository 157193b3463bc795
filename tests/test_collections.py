"""collections/requirements.yml declares what the playbooks, roles and inventories use, at versions the
installed ones satisfy (no network: ansible-galaxy reads what is installed)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.galaxy.dependency_resolution.versioning import meets_requirements

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REQUIREMENTS = ROOT / "collections" / "requirements.yml"
FQCN = re.compile(r"^([a-z0-9_]+\.[a-z0-9_]+)\.[a-z0-9_]+$")
# lookup('ns.coll.x', ...), query(...), q(...), "| ns.coll.x" filters, "is ns.coll.x" tests, with_ns.coll.x loops
IN_TEXT = (re.compile(r"\b(?:lookup|query|q)\(\s*['\"]([a-z0-9_]+\.[a-z0-9_]+)\.[a-z0-9_]+['\"]"),
           re.compile(r"\|\s*([a-z0-9_]+\.[a-z0-9_]+)\.[a-z0-9_]+\b"),
           re.compile(r"\bis\s+(?:not\s+)?([a-z0-9_]+\.[a-z0-9_]+)\.[a-z0-9_]+\b"),
           re.compile(r"\bwith_([a-z0-9_]+\.[a-z0-9_]+)\.[a-z0-9_]+:"))


def declared() -> dict:
    data = yaml.safe_load(REQUIREMENTS.read_text())
    return {c["name"]: str(c.get("version", "*")) for c in data["collections"]}


def installed(name: str) -> str | None:
    r = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "list", name, "--format", "json"],
                       capture_output=True, text=True, timeout=60)
    found = [v[name]["version"] for v in (json.loads(r.stdout or "{}") or {}).values() if name in v]
    return found[0] if found else None  # the first path is the one Ansible loads


class _Loader(yaml.SafeLoader):
    """Reads tagged values (!vault, !unsafe) as plain ones: only the keys matter here."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _keys(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _keys(v)
    elif isinstance(node, list):
        for v in node:
            yield from _keys(v)


def used() -> dict:
    """collection -> the files that use one of its modules or plugins."""
    out: dict = {}
    files = [p for d in ("roles", "playbooks", "inventory") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".yml", ".yaml", ".j2")]
    for path in files:
        text = path.read_text()
        names = set()
        if path.suffix != ".j2":
            for data in yaml.load_all(text, Loader=_Loader):
                names |= {m.group(1) for k in _keys(data) if isinstance(k, str) and (m := FQCN.match(k))}
                if path.parts[len(ROOT.parts)] == "inventory" and isinstance(data, dict) and isinstance(data.get("plugin"), str):
                    names |= {m.group(1) for m in [FQCN.match(data["plugin"])] if m}
        for rx in IN_TEXT:
            names |= set(rx.findall(text))
        for n in names:
            out.setdefault(n, set()).add(str(path.relative_to(ROOT)))
    return out


def test_requirements_parse_with_version_ranges():
    cols = declared()
    assert cols, "collections/requirements.yml declares no collection"
    for name, spec in cols.items():
        assert FQCN.match(name + ".x"), f"{name} is not a namespace.collection name"
        assert spec != "*" and "<" in spec, f"{name}: give a version range with an upper bound, got {spec!r}"


@pytest.mark.parametrize("name", sorted(declared()))
def test_installed_collection_is_inside_its_range(name):
    spec = declared()[name]
    version = installed(name)
    assert version, f"{name} is not installed: ansible-galaxy collection install -r collections/requirements.yml"
    assert meets_requirements(version, spec), f"{name} {version} is installed, outside {spec!r} (collections/requirements.yml)"


def test_every_collection_used_is_declared():
    cols = declared()
    missing = {n: sorted(files) for n, files in used().items() if n != "ansible.builtin" and n not in cols}
    assert not missing, f"used but not in collections/requirements.yml: {missing}"


def test_the_scan_sees_the_collections_in_use():
    """The scan is not vacuous: it finds the haproxy module and the aws_ec2 inventory plugin."""
    u = used()
    assert "roles/model_server/tasks/restart.yml" in u["community.general"]
    assert "inventory/aws/aws_ec2.yml" in u["amazon.aws"]
    assert "ansible.builtin" in u
