import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlpipe import artifact
from mlpipe.errors import Conflict, IntegrityError, NotFound, RegistryError, UsageError
from mlpipe.registry import CachedStore, FileStore, Registry, open_store, parse_ref
from conftest import EXAMPLES, free_port, run_cli


@pytest.fixture(params=["file", "s3"])
def reg(request, tmp_path):
    if request.param == "file":
        return Registry(str(tmp_path / "reg"))
    bucket = request.getfixturevalue("s3_bucket")
    return Registry(f"s3://{bucket}/team/models")


def test_parse_ref():
    assert parse_ref("credit-risk:4") == ("credit-risk", 4, None)
    assert parse_ref("credit-risk@production") == ("credit-risk", None, "production")
    assert parse_ref("credit-risk") == ("credit-risk", None, None)
    assert parse_ref("credit-risk:latest") == ("credit-risk", None, None)
    with pytest.raises(UsageError, match="NAME:VERSION"):
        parse_ref("Credit Risk")


@pytest.mark.integration
def test_register_versions_aliases_rollback_ledger(reg, built, tmp_path):
    m1 = reg.register(built)
    m2 = reg.register(built, message="second")
    assert (m1["version"], m2["version"]) == (1, 2)
    assert reg.versions("hello-world") == [1, 2] and reg.models() == ["hello-world"]
    assert reg.get("hello-world")["message"] == "second"
    assert reg.get("hello-world:1")["id"] == m1["id"]
    reg.promote("hello-world:1", "production", reason="first")
    reg.promote("hello-world:2", "production", reason="better")
    assert reg.resolve("hello-world@production") == ("hello-world", 2)
    assert reg.promote("hello-world:2", "production")["version"] == 2  # no-op
    reg.rollback("hello-world", "production")
    assert reg.resolve("hello-world@production") == ("hello-world", 1)
    with pytest.raises(UsageError, match="no earlier version"):
        reg.rollback("hello-world", "production")
    events = [(e["event"], e["version"]) for e in reg.events("hello-world")]
    assert events == [("registered", 1), ("registered", 2), ("promoted", 1), ("promoted", 2), ("rolled_back", 1)]
    path, manifest, changed = reg.pull("hello-world@production", tmp_path / "srv")
    assert changed and path == tmp_path / "srv" / "1" and manifest["version"] == 1
    model, _ = artifact.load_model(path)
    assert reg.pull("hello-world:1", tmp_path / "srv")[2] is False  # already there, verified


@pytest.mark.integration
def test_not_found_errors(reg, built):
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        reg.get("nope")
    reg.register(built)
    with pytest.raises(NotFound, match="no version 9.*versions are 1"):
        reg.get("hello-world:9")
    with pytest.raises(NotFound, match="no alias 'production'"):
        reg.get("hello-world@production")


@pytest.mark.integration
def test_tampered_artifact_in_registry_is_refused(reg, built, tmp_path):
    reg.register(built)
    key = "hello-world/versions/1/model.joblib"
    reg.store.put(key, reg.store.get(key) + b"x")
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        reg.pull("hello-world:1", tmp_path / "srv")
    assert not (tmp_path / "srv").exists()  # verified before anything is written


class FailOnManifest(FileStore):
    def put(self, key, data, exclusive=False):
        if key.endswith("/manifest.json"):
            raise RegistryError("injected: S3 went away")
        super().put(key, data, exclusive)


def test_failed_registration_leaves_no_version(built, tmp_path):
    reg = Registry(store=FailOnManifest(tmp_path / "reg"))
    with pytest.raises(RegistryError):
        reg.register(built)
    plain = Registry(str(tmp_path / "reg"))
    assert plain.versions("hello-world") == [] and plain.models() == []
    assert not list((tmp_path / "reg" / "hello-world" / "versions").rglob("model.joblib"))
    m = plain.register(built)  # the next registration works and skips the burnt number
    assert m["version"] == 2 and plain.versions("hello-world") == [2]


def test_killed_registration_leaves_no_version(built, tmp_path):
    """A process killed (os._exit) between uploading the model and writing the manifest."""
    script = textwrap.dedent(f"""
        import os
        from mlpipe.registry import FileStore, Registry
        real = FileStore.put
        def put(self, key, data, exclusive=False):
            if key.endswith("/manifest.json"):
                os._exit(9)
            real(self, key, data, exclusive)
        FileStore.put = put
        Registry({str(tmp_path / 'reg')!r}).register({str(built)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9
    reg = Registry(str(tmp_path / "reg"))
    assert reg.versions("hello-world") == []
    r = run_cli("models", "list", "--registry", tmp_path / "reg")
    assert r.returncode == 0 and "hello-world" not in r.stdout


def _concurrent_train(registry: str, n: int, env: dict, tmp_path: Path) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-m", "mlpipe", "train", str(EXAMPLES / "hello-world.yml"),
                               "-m", f"run {i}", "--registry", registry, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    return outs


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_eight_concurrent_trains_get_distinct_versions(backend, tmp_path, request):
    import os
    env = dict(os.environ)
    if backend == "file":
        url = str(tmp_path / "reg")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        env["MLPIPE_S3_ENDPOINT_URL"] = request.getfixturevalue("moto_endpoint")
        url = f"s3://{bucket}/r"
    outs = _concurrent_train(url, 8, env, tmp_path)
    versions = sorted(o["version"] for o in outs)
    assert len(set(versions)) == 8
    reg = Registry(url)
    assert reg.versions("hello-world") == versions
    for v in versions:
        path, m, _ = reg.pull(f"hello-world:{v}", tmp_path / "pulled")
        artifact.load_model(path)
        assert m["message"].startswith("run ")


@pytest.mark.integration
def test_s3_conditional_put_conflict(s3_bucket):
    store = open_store(f"s3://{s3_bucket}/p")
    store.put("a/claims/1", b"x", exclusive=True)
    with pytest.raises(Conflict):
        store.put("a/claims/1", b"y", exclusive=True)
    assert store.get("a/claims/1") == b"x"


def test_s3_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MLPIPE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryError, match="cannot reach S3 at http://127.0.0.1"):
        Registry("s3://bucket/x").models()


@pytest.mark.integration
def test_missing_bucket(moto_endpoint, monkeypatch):
    monkeypatch.setenv("MLPIPE_S3_ENDPOINT_URL", moto_endpoint)
    with pytest.raises(RegistryError, match="bucket 'no-such-bucket' does not exist"):
        Registry("s3://no-such-bucket/x").models()


@pytest.mark.integration
def test_redis_cache_serves_artifact_bytes_only(redis_url, built, tmp_path):
    import redis
    reg = Registry(str(tmp_path / "reg"), cache=redis_url)
    assert isinstance(reg.store, CachedStore)
    m = reg.register(built)
    reg.pull("hello-world:1", tmp_path / "a")
    misses = reg.store.misses
    reg.store.hits = 0
    reg.pull("hello-world:1", tmp_path / "b")
    assert reg.store.misses == misses and reg.store.hits == len(m["files"])  # every file from Redis
    r = redis.Redis.from_url(redis_url)
    assert r.get(reg.store._ck("hello-world/versions/1/manifest.json")) is None  # manifests: backend only
    # aliases are mutable: never cached
    reg.promote("hello-world:1", "production")
    reg.register(built)
    reg.promote("hello-world:2", "production")
    assert Registry(str(tmp_path / "reg"), cache=redis_url).resolve("hello-world@production")[1] == 2


@pytest.mark.integration
def test_redis_cache_hit_is_still_verified(redis_url, built, tmp_path, caplog):
    """A poisoned cache entry is never used and does not break the pull: it is dropped, the bytes
    come from the backend (and are cached again), with a warning."""
    import redis
    reg = Registry(str(tmp_path / "reg"), cache=redis_url)
    m = reg.register(built)
    reg.pull("hello-world:1", tmp_path / "a")
    r = redis.Redis.from_url(redis_url)
    ck = reg.store._ck("hello-world/versions/1/model.joblib")
    r.set(ck, b"evil")
    with caplog.at_level("WARNING", logger="mlpipe.registry"):
        path, _, _ = reg.pull("hello-world:1", tmp_path / "b")
    assert artifact.sha256_file(path / "model.joblib") == m["files"]["model.joblib"]["sha256"]
    assert "does not match its manifest" in caplog.text
    assert artifact.sha256_bytes(r.get(ck)) == m["files"]["model.joblib"]["sha256"]
    # a backend that is itself tampered with is still refused, cache or not
    reg.store.inner.put("hello-world/versions/1/model.joblib", b"evil")
    r.set(ck, b"evil")
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        reg.pull("hello-world:1", tmp_path / "c")
    assert r.get(ck) is None  # bad bytes are never cached


def test_dead_redis_costs_only_speed(built, tmp_path, caplog):
    reg = Registry(str(tmp_path / "reg"), cache=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level("WARNING"):
        reg.register(built)
        path, _, _ = reg.pull("hello-world:1", tmp_path / "a")
    artifact.load_model(path)
    assert sum("Redis cache" in r.message and "unavailable" in r.message for r in caplog.records) == 1


def test_unsupported_urls():
    with pytest.raises(UsageError, match="unsupported registry URL"):
        open_store("ftp://x")
    with pytest.raises(UsageError, match="unsupported cache URL"):
        open_store("/tmp/x", "memcached://x")


# ----------------------------------------------------------------------------- security boundaries
def _evil_pair(built, tmp_path) -> tuple[bytes, bytes]:
    """A consistent poisoned pair: a different model and a manifest that lists its hashes."""
    from sklearn.dummy import DummyClassifier
    genuine = artifact.read_manifest(built)
    evil_dir = tmp_path / "evil"
    artifact.write_dir(evil_dir, DummyClassifier().fit([[0], [1]], [0, 1]),
                       {k: v for k, v in genuine.items() if k not in ("files", "id")} | {"version": 1})
    return (evil_dir / artifact.MANIFEST).read_bytes(), (evil_dir / artifact.MODEL_FILE).read_bytes()


@pytest.mark.integration
def test_poisoned_cache_manifest_and_model_are_never_loaded(redis_url, built, tmp_path, caplog):
    """Redis holds a different model AND a manifest whose sha256 matches it: the pull must still
    come back with the genuine model, because the manifest is only ever read from the backend."""
    import redis
    reg = Registry(str(tmp_path / "reg"), cache=redis_url)
    genuine = reg.register(built)
    reg.pull("hello-world:1", tmp_path / "warm")  # fill the cache the normal way
    evil_manifest, evil_model = _evil_pair(built, tmp_path)
    r = redis.Redis.from_url(redis_url)
    r.set(reg.store._ck("hello-world/versions/1/manifest.json"), evil_manifest)
    r.set(reg.store._ck("hello-world/versions/1/model.joblib"), evil_model)

    fresh = Registry(str(tmp_path / "reg"), cache=redis_url)
    assert fresh.manifest("hello-world", 1)["files"] == genuine["files"]
    with caplog.at_level("WARNING", logger="mlpipe.registry"):
        path, manifest, _ = fresh.pull("hello-world:1", tmp_path / "srv")
    assert manifest["files"] == genuine["files"]
    assert (path / "model.joblib").read_bytes() != evil_model
    assert artifact.sha256_file(path / "model.joblib") == genuine["files"]["model.joblib"]["sha256"]
    model, _ = artifact.load_model(path)
    assert type(model).__name__ == "Pipeline"  # the genuine one, not the DummyClassifier
    assert any("does not match" in rec.getMessage() for rec in caplog.records)
    # the poisoned bytes were dropped from the cache (and replaced by the genuine ones)
    assert r.get(fresh.store._ck("hello-world/versions/1/model.joblib")) != evil_model


@pytest.mark.integration
def test_manifest_listing_a_path_cannot_write_outside_dest(reg, built, tmp_path):
    reg.register(built)
    evil = reg.manifest("hello-world", 1) | {"version": 2}
    evil["files"] = dict(evil["files"], **{"../../evil": {"sha256": artifact.sha256_bytes(b"pwned"), "size": 5}})
    for fname in reg.manifest("hello-world", 1)["files"]:
        reg.store.put(f"hello-world/versions/2/{fname}", reg.store.get(f"hello-world/versions/1/{fname}"))
    reg.store.put("hello-world/versions/2/../../evil", b"pwned")
    reg.store.put("hello-world/versions/2/manifest.json", json.dumps(evil).encode())
    dest = tmp_path / "out" / "dest"
    with pytest.raises(IntegrityError, match=r"'\.\./\.\./evil'"):
        reg.pull("hello-world:2", dest)
    assert not (tmp_path / "out" / "evil").exists() and not (dest / "evil").exists()
    assert all((tmp_path / "reg") in p.parents for p in tmp_path.rglob("evil"))  # only the planted file


def test_register_refuses_a_manifest_listing_a_path(built, tmp_path):
    import shutil
    work = tmp_path / "w"
    shutil.copytree(built, work)
    (tmp_path / "evil").write_bytes(b"pwned")
    m = artifact.read_manifest(work)
    m["files"]["../evil"] = {"sha256": artifact.sha256_bytes(b"pwned"), "size": 5}
    (work / artifact.MANIFEST).write_text(json.dumps(m))
    reg = Registry(str(tmp_path / "reg"))
    with pytest.raises(IntegrityError, match=r"'\.\./evil'"):
        reg.register(work)
    assert reg.models() == [] and not list((tmp_path / "reg").rglob("evil"))


@pytest.mark.parametrize("call, bad", [
    (lambda r: r.manifest("../x", 1), "../x"),
    (lambda r: r.manifest("hello-world", 0), "0"),
    (lambda r: r.manifest("hello-world", "1/../../x"), "1/../../x"),
    (lambda r: r.fetch("Hello/../x", 1), "Hello/../x"),
    (lambda r: r.versions("../.."), "../.."),
    (lambda r: r.alias("hello-world", "../../x"), "../../x"),
    (lambda r: r.promote("hello-world:1", "../x"), "../x"),
    (lambda r: r.rollback("../x", "production"), "../x"),
    (lambda r: r.rollback("hello-world", "Prod/../x"), "Prod/../x"),
    (lambda r: r.record("../x", "deployed", version=1), "../x"),
    (lambda r: r.events("../x"), "../x"),
    (lambda r: r.aliases("a/b"), "a/b"),
])
def test_registry_refuses_bad_names_aliases_and_versions(tmp_path, call, bad):
    reg = Registry(str(tmp_path / "reg"))
    with pytest.raises(UsageError) as info:
        call(reg)
    assert repr(bad) in str(info.value) or f"'{bad}'" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_register_refuses_a_bad_model_name(built, tmp_path):
    import shutil
    work = tmp_path / "w"
    shutil.copytree(built, work)
    m = artifact.read_manifest(work)
    m["name"] = "../escape"
    (work / artifact.MANIFEST).write_text(json.dumps(m))
    reg = Registry(str(tmp_path / "reg"))
    with pytest.raises(UsageError, match=r"'\.\./escape'"):
        reg.register(work)
    assert not (tmp_path / "escape").exists()


def test_filestore_refuses_keys_outside_its_root(tmp_path):
    store = FileStore(tmp_path / "root")
    (tmp_path / "secret").write_bytes(b"s")
    for key in ("../secret", "a/../../secret", str(tmp_path / "secret")):
        with pytest.raises(UsageError, match="outside"):
            store.get(key)
        with pytest.raises(UsageError, match="outside"):
            store.put(key, b"x")
        with pytest.raises(UsageError, match="outside"):
            store.delete(key)
        with pytest.raises(UsageError, match="outside"):
            store.list(key)
    assert (tmp_path / "secret").read_bytes() == b"s"
    store.put("m/versions/1/model.joblib", b"ok")  # ordinary keys still work
    assert store.get("m/versions/1/model.joblib") == b"ok"


def test_sql_password_is_never_stored(tmp_path):
    from sklearn.dummy import DummyClassifier
    source = "sql:postgresql://u:secret@h/db#select 1"
    manifest = {"name": "sql-model", "message": "", "metrics": {"accuracy": 1.0},
                "data": {"source": source, "fingerprint": "0" * 64, "rows": 2, "target": "y"},
                "spec": {"name": "sql-model", "data": {"source": source, "target": "y", "holdout": source}},
                "library_versions": artifact.library_versions()}
    work = tmp_path / "w"
    artifact.write_dir(work, DummyClassifier().fit([[0], [1]], [0, 1]), manifest)
    reg = Registry(str(tmp_path / "reg"))
    m = reg.register(work, message="from postgres")
    assert "secret" not in json.dumps(m)
    stored = reg.manifest("sql-model", 1)
    assert stored["data"]["source"] == "sql:postgresql://u:***@h/db#select 1"
    assert stored["spec"]["data"]["source"] == "sql:postgresql://u:***@h/db#select 1"
    assert stored["spec"]["data"]["holdout"] == "sql:postgresql://u:***@h/db#select 1"
    assert "secret" not in json.dumps(reg.events("sql-model"))
    for f in (tmp_path / "reg").rglob("*"):
        if f.is_file():
            assert b"secret" not in f.read_bytes(), f


@pytest.mark.integration
def test_register_that_fails_midway_leaves_no_file_behind(built, tmp_path):
    """The version's files go up several at a time; when one upload fails, the others (finished or
    not) are removed, the error is the store's own, and the next registration takes the next number."""
    reg = Registry(str(tmp_path / "reg"))
    put = reg.store.put

    def failing(key, data, exclusive=False):
        if key.endswith(f"/{artifact.MODEL_FILE}"):
            raise RegistryError(f"cannot write {key}: disk full")
        return put(key, data, exclusive)
    reg.store.put = failing
    assert len(artifact.read_manifest(built)["files"]) >= 2  # several files, so they go up in parallel
    with pytest.raises(RegistryError, match="disk full"):
        reg.register(built)
    assert [p for p in (tmp_path / "reg").rglob("versions/*/*") if p.is_file()] == []
    reg.store.put = put
    assert reg.register(built)["version"] == 2  # the failed attempt's number stays claimed, unused
