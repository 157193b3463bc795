"""A versioned store of model artifacts, the same layout on every backend::

    <root>/<model>/versions/<N>/manifest.json      written last: a version exists iff this exists
    <root>/<model>/versions/<N>/model.joblib (+ model.onnx)
    <root>/<model>/claims/<N>                      version numbers taken (exclusive create)
    <root>/<model>/aliases/<alias>.json            {version, set_at, set_by, reason, history}
    <root>/<model>/events/<timestamp>-<id>.json    append-only ledger

Backends: ``file://PATH`` (the default, ``./.mlpipe/registry``) and ``s3://bucket/prefix``
(any S3-compatible endpoint via ``MLPIPE_S3_ENDPOINT_URL``). A Redis cache (``redis://``) may sit in
front for immutable keys (manifests and artifact bytes); it is never the source of truth and a dead
Redis only costs speed.

Version numbers are allocated by an exclusive create of ``claims/<N>`` (``O_EXCL`` link on files,
``If-None-Match: *`` on S3), so concurrent registrations never share a number; the files go up
next, the manifest last, so a registration that dies midway leaves no visible version.
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from mlpipe import artifact
from mlpipe.errors import Conflict, IntegrityError, NotFound, RegistryError, UsageError
from mlpipe.spec import NAME_RE

log = logging.getLogger("mlpipe.registry")

DEFAULT_REGISTRY = "./.mlpipe/registry"
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
REF_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]*)(?::(?P<version>\d+|latest)|@(?P<alias>[a-z][a-z0-9_-]*))?$")


# ---------------------------------------------------------------------------------------- stores
class Store:
    url: str

    def get(self, key: str) -> bytes: ...
    def put(self, key: str, data: bytes, exclusive: bool = False) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...

    def get_verified(self, key: str, sha256: str) -> bytes:
        """The bytes of an immutable artifact whose sha256 the caller knows (the caller checks it too)."""
        return self.get(key)

    def get_json(self, key: str) -> dict:
        try:
            return json.loads(self.get(key))
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{self.url}/{key} is not valid JSON ({exc.msg})") from None


class FileStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = Path(os.path.normpath(self.root / key))
        if "\0" in key or (path != self.root and self.root not in path.parents):
            raise UsageError(f"registry key {key!r} points outside the registry root {self.root}",
                             hint="model names, versions, aliases and file names are plain names, never paths")
        return path

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise RegistryError(f"cannot read {self._path(key)}: {exc.strerror}") from None

    def put(self, key: str, data: bytes, exclusive: bool = False) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if exclusive:
                    try:
                        os.link(tmp, path)  # atomic, fails if the name exists, content complete
                    except FileExistsError:
                        raise Conflict(f"{path} already exists") from None
                else:
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            raise RegistryError(f"cannot write {path}: {exc.strerror}",
                                hint="check the registry path and its permissions") from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if not f.startswith(".tmp-"):
                    out.append(str(Path(dirpath, f).relative_to(self.root)).replace(os.sep, "/"))
        return out

    def list_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("MLPIPE_S3_ENDPOINT_URL") or None
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url,
                                   config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                 connect_timeout=5, read_timeout=60))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, action: str, key: str):
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
        where = f"s3://{self.bucket}/{self._key(key)}"
        if isinstance(exc, EndpointConnectionError):
            return RegistryError(f"cannot reach S3 at {self.endpoint_url or 'the default AWS endpoint'} to {action} {where}",
                                 hint="check MLPIPE_S3_ENDPOINT_URL and that the S3 service is up")
        if isinstance(exc, NoCredentialsError):
            return RegistryError(f"no AWS credentials to {action} {where}",
                                 hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                return RegistryError(f"S3 bucket '{self.bucket}' does not exist",
                                     hint=f"create it first (aws s3 mb s3://{self.bucket}) or fix --registry")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return RegistryError(f"S3 refused to {action} {where}: {code}", hint="check the credentials and the bucket policy")
            return RegistryError(f"S3 failed to {action} {where}: {code or exc}")
        return RegistryError(f"S3 failed to {action} {where}: {type(exc).__name__}: {exc}",
                             hint="check MLPIPE_S3_ENDPOINT_URL and the network")

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise self._error(exc, "read", key) from None
        except Exception as exc:
            raise self._error(exc, "read", key) from None

    def put(self, key: str, data: bytes, exclusive: bool = False) -> None:
        from botocore.exceptions import ClientError
        kwargs = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if exclusive and code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise Conflict(f"s3://{self.bucket}/{self._key(key)} already exists") from None
            raise self._error(exc, "write", key) from None
        except Exception as exc:
            raise self._error(exc, "write", key) from None

    def list(self, prefix: str) -> list[str]:
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                out.extend(o["Key"][strip:] for o in page.get("Contents", []))
        except Exception as exc:
            raise self._error(exc, "list", prefix) from None
        return out

    def list_dirs(self) -> list[str]:
        pfx = f"{self.prefix}/" if self.prefix else ""
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=pfx, Delimiter="/"):
                names.extend(p["Prefix"][len(pfx):].rstrip("/") for p in page.get("CommonPrefixes", []))
        except Exception as exc:
            raise self._error(exc, "list", "") from None
        return sorted(names)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._error(exc, "delete", key) from None


class CachedStore(Store):
    """Read-through Redis cache for artifact bytes, and nothing else.

    Only :meth:`get_verified` touches Redis: the caller names the sha256 it expects (from the
    manifest, which is always read from the backend), a cached copy that does not match it is
    dropped and read again from the backend, and only bytes that match are cached. Plain
    :meth:`get` (manifests, aliases, claims, events) always goes to the backend, so whoever can
    write to Redis can slow a pull down but can never choose what it returns."""

    def __init__(self, inner: Store, redis_url: str, ttl: int = 7 * 24 * 3600):
        import redis
        self.inner = inner
        self.url = inner.url
        self.redis_url = redis_url
        self.ttl = ttl
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._dead = False
        self.hits = self.misses = 0

    def _ck(self, key: str) -> str:
        return f"mlpipe:{self.inner.url}:{key}"

    def _warn(self, exc: Exception) -> None:
        if not self._dead:
            safe = re.sub(r"//[^@/]*@", "//***@", self.redis_url)
            log.warning("Redis cache at %s is unavailable (%s); reading from %s directly", safe,
                        type(exc).__name__, self.inner.url)
        self._dead = True

    @staticmethod
    def cacheable(key: str) -> bool:
        return "/versions/" in key and not key.endswith("/" + artifact.MANIFEST)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_verified(self, key: str, sha256: str) -> bytes:
        import redis
        if not self.cacheable(key):
            return self.inner.get(key)
        if not self._dead:
            try:
                hit = self.redis.get(self._ck(key))
            except redis.RedisError as exc:
                self._warn(exc)
                hit = None
            if hit is not None:
                if artifact.sha256_bytes(hit) == sha256:
                    self.hits += 1
                    return hit
                log.warning("Redis cache entry for %s/%s does not match its manifest (sha256 %s…, expected %s…); "
                            "dropping it and reading the backend", self.inner.url, key,
                            artifact.sha256_bytes(hit)[:12], sha256[:12])
                self._drop(key)
        data = self.inner.get(key)
        self.misses += 1
        if not self._dead and artifact.sha256_bytes(data) == sha256:
            self._fill(key, data)
        return data

    def _drop(self, key: str) -> None:
        import redis
        try:
            self.redis.delete(self._ck(key))
        except redis.RedisError as exc:
            self._warn(exc)

    def _fill(self, key: str, data: bytes) -> None:
        import redis
        try:
            self.redis.set(self._ck(key), data, ex=self.ttl)
        except redis.RedisError as exc:
            self._warn(exc)

    def put(self, key: str, data: bytes, exclusive: bool = False) -> None:
        self.inner.put(key, data, exclusive)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def list_dirs(self) -> list[str]:
        return self.inner.list_dirs()

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        if not self._dead:
            self._drop(key)


def open_store(url: str | None = None, cache: str | None = None) -> Store:
    url = url or os.environ.get("MLPIPE_REGISTRY") or DEFAULT_REGISTRY
    cache = cache if cache is not None else os.environ.get("MLPIPE_CACHE")
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise UsageError(f"registry URL {url!r} has no bucket", hint="write s3://bucket/prefix")
        store: Store = S3Store(bucket, prefix)
    elif url.startswith("file://"):
        store = FileStore(url[7:])
    elif "://" in url:
        raise UsageError(f"unsupported registry URL {url!r}", hint="use file://PATH, a plain path, or s3://bucket/prefix")
    else:
        store = FileStore(url)
    if cache:
        if not cache.startswith(("redis://", "rediss://", "unix://")):
            raise UsageError(f"unsupported cache URL {cache!r}", hint="use redis://host:port/db")
        store = CachedStore(store, cache)
    return store


# -------------------------------------------------------------------------------------- registry
def whoami() -> str:
    if os.environ.get("MLPIPE_USER"):
        return os.environ["MLPIPE_USER"]
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"{name!r} is not a valid model name",
                         hint="model names are lowercase letters, digits and '-', starting with a letter or digit")
    return name


def check_alias(alias) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise UsageError(f"{alias!r} is not a valid alias",
                         hint="use lowercase letters, digits, '-' or '_', starting with a letter")
    return alias


def check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"{str(version)!r} is not a version number", hint="versions are whole numbers from 1")
    return version


_VERSION_DIR = re.compile(r"^[1-9][0-9]*$")


def mask_source(manifest: dict) -> dict:
    """The manifest with credentials masked in its data sources (``data.source``, the spec's source and holdout)."""
    from mlpipe.data import redact_source
    manifest = dict(manifest)
    if isinstance(manifest.get("data"), dict) and isinstance(manifest["data"].get("source"), str):
        manifest["data"] = dict(manifest["data"], source=redact_source(manifest["data"]["source"]))
    spec = manifest.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("data"), dict):
        masked = {k: redact_source(v) for k, v in spec["data"].items() if k in ("source", "holdout") and isinstance(v, str)}
        manifest["spec"] = dict(spec, data=dict(spec["data"], **masked))
    return manifest


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    m = REF_RE.match(ref or "")
    if not m:
        raise UsageError(f"'{ref}' is not a model reference",
                         hint="write NAME, NAME:VERSION (credit-risk:4) or NAME@ALIAS (credit-risk@production)")
    v = m.group("version")
    check_name(m.group("name"))
    if m.group("alias"):
        check_alias(m.group("alias"))
    version = int(v) if v and v != "latest" else None
    if version is not None:
        check_version(version)
    return m.group("name"), version, m.group("alias")


class Registry:
    def __init__(self, url: str | None = None, cache: str | None = None, store: Store | None = None):
        self.store = store or open_store(url, cache)
        self.url = self.store.url

    # -- reading
    def models(self) -> list[str]:
        return [n for n in self.store.list_dirs() if NAME_RE.match(n) and self.versions(n)]

    def versions(self, name: str) -> list[int]:
        check_name(name)
        out = []
        for key in self.store.list(f"{name}/versions/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == artifact.MANIFEST and _VERSION_DIR.match(parts[2]):
                out.append(int(parts[2]))
        return sorted(out)

    def require_model(self, name: str) -> list[int]:
        """The versions of ``name``; NotFound (naming the known models) when it has none."""
        versions = self.versions(name)
        if not versions:
            known = self.models()
            raise NotFound(f"unknown model '{name}' in registry {self.url}",
                           hint=f"known models: {', '.join(known)}" if known else "train one first: mlpipe train SPEC.yml")
        return versions

    def manifest(self, name: str, version: int) -> dict:
        """A version's manifest, always read from the backend (never from a cache)."""
        check_name(name)
        check_version(version)
        try:
            return self.store.get_json(f"{name}/versions/{version}/{artifact.MANIFEST}")
        except KeyError:
            versions = self.require_model(name)
            raise NotFound(f"model '{name}' has no version {version}",
                           hint=f"versions are {', '.join(map(str, versions))}") from None

    def resolve(self, ref: str) -> tuple[str, int]:
        name, version, alias = parse_ref(ref)
        if alias:
            a = self.alias(name, alias)
            if a is None:
                self.require_model(name)
                known = ", ".join(self.aliases(name)) or "none"
                raise NotFound(f"model '{name}' has no alias '{alias}'",
                               hint=f"aliases are: {known}; set one with mlpipe models promote {name}:N --alias {alias}")
            return name, int(a["version"])
        if version is None:
            return name, self.require_model(name)[-1]
        return name, version

    def get(self, ref: str) -> dict:
        return self.manifest(*self.resolve(ref))

    def alias(self, name: str, alias: str) -> dict | None:
        check_name(name)
        check_alias(alias)
        try:
            return self.store.get_json(f"{name}/aliases/{alias}.json")
        except KeyError:
            return None

    def aliases(self, name: str) -> dict[str, int]:
        check_name(name)
        out = {}
        for key in self.store.list(f"{name}/aliases/"):
            alias = key.rsplit("/", 1)[1][:-5]
            if key.endswith(".json") and ALIAS_RE.match(alias):
                a = self.alias(name, alias)
                if a is not None:
                    out[alias] = int(a["version"])
        return dict(sorted(out.items()))

    def events(self, name: str) -> list[dict]:
        check_name(name)
        keys = sorted(k for k in self.store.list(f"{name}/events/") if k.endswith(".json"))
        return [self.store.get_json(k) for k in keys]

    # -- writing
    def record(self, name: str, event: str, **fields) -> dict:
        check_name(name)
        at = artifact.utcnow()
        entry = {"event": event, "model": name, "at": at, "by": whoami(), **fields}
        stamp = at.replace("-", "").replace(":", "")
        self.store.put(f"{name}/events/{stamp}-{secrets.token_hex(4)}.json",
                       json.dumps(entry, sort_keys=True, default=str).encode(), exclusive=True)
        return entry

    def _claim(self, name: str) -> int:
        check_name(name)
        taken = [int(k.rsplit("/", 1)[1]) for k in self.store.list(f"{name}/claims/")
                 if _VERSION_DIR.match(k.rsplit("/", 1)[1])]
        n = max(taken + self.versions(name) + [0]) + 1
        claim = json.dumps({"by": whoami(), "pid": os.getpid(), "at": artifact.utcnow()}).encode()
        for _ in range(1000):
            try:
                self.store.put(f"{name}/claims/{n}", claim, exclusive=True)
                return n
            except Conflict:
                n += 1
        raise RegistryError(f"could not allocate a version number for '{name}'")  # pragma: no cover

    def register(self, workdir: Path, message: str | None = None,
                 prepare: Callable[[int], object] | None = None) -> dict:
        """Upload an unregistered artifact folder as the next version. Returns its manifest.

        ``prepare(n)``, when given, runs right after the version number ``n`` is claimed and before
        anything is uploaded (e.g. a notebook that adds its output to ``workdir`` and the manifest);
        the manifest is then read and verified again. If it raises, nothing is uploaded (the number
        stays claimed, unused) and the exception propagates."""
        workdir = Path(workdir)
        manifest = artifact.verify_dir(workdir)  # also checks every listed file name
        name = check_name(manifest.get("name"))
        n = self._claim(name)
        if prepare is not None:
            prepare(n)
            manifest = artifact.verify_dir(workdir)
            if manifest.get("name") != name:
                raise IntegrityError(f"preparing {name}:{n} renamed the artifact in {workdir} to {manifest.get('name')!r}",
                                     hint="prepare may add files to the artifact, never change its name")
        manifest = mask_source(manifest)  # a sql: URL's password never reaches the registry
        if message is not None:
            manifest["message"] = message
        manifest["version"] = n
        uploaded = []
        try:
            self._upload(workdir, [(f"{name}/versions/{n}/{fname}", fname) for fname in manifest["files"]], uploaded)
            self.store.put(f"{name}/versions/{n}/{artifact.MANIFEST}",
                           json.dumps(manifest, indent=2, default=str).encode(), exclusive=True)
        except BaseException:
            for key in uploaded:  # best effort: the version is invisible without its manifest anyway
                try:
                    self.store.delete(key)
                except Exception:
                    pass
            raise
        try:
            self.record(name, "registered", version=n, id=manifest["id"], message=manifest.get("message", ""),
                        metrics=manifest.get("metrics"))
        except Exception as exc:  # the version exists; a missing ledger line must not hide it
            log.warning("version %s:%s registered but its ledger event failed: %s", name, n, exc)
        return manifest

    def _upload(self, workdir: Path, items: list[tuple[str, str]], uploaded: list[str]) -> None:
        """Put each (key, file in workdir) into the store, up to four at a time (reads, writes, fsyncs
        and S3 requests wait without the GIL), appending each key to ``uploaded`` once it is there.
        The first error is raised after the others have finished or been cancelled."""
        if len(items) < 2:
            for key, fname in items:
                self.store.put(key, (workdir / fname).read_bytes(), exclusive=True)
                uploaded.append(key)
            return
        from concurrent.futures import ThreadPoolExecutor

        def put(key: str, fname: str) -> str:
            self.store.put(key, (workdir / fname).read_bytes(), exclusive=True)
            return key
        with ThreadPoolExecutor(max_workers=min(4, len(items)), thread_name_prefix="mlpipe-upload") as pool:
            futures = [pool.submit(put, key, fname) for key, fname in items]
            error = None
            for future in futures:
                try:
                    uploaded.append(future.result())
                except BaseException as exc:  # keep collecting: every key that made it must be known
                    if error is None:
                        error = exc
                        for other in futures:
                            other.cancel()
        if error is not None:
            raise error

    def promote(self, ref: str, alias: str, reason: str = "") -> dict:
        check_alias(alias)
        name, version = self.resolve(ref)
        self.manifest(name, version)  # must exist
        old = self.alias(name, alias)
        history = list((old or {}).get("history", []))
        if old is not None and int(old["version"]) != version:
            history.append(int(old["version"]))
        elif old is not None:
            return old  # already there: nothing changes, nothing recorded
        entry = {"version": version, "set_at": artifact.utcnow(), "set_by": whoami(), "reason": reason,
                 "history": history[-50:]}
        self.store.put(f"{name}/aliases/{alias}.json", json.dumps(entry, sort_keys=True).encode())
        self.record(name, "promoted", version=version, alias=alias, previous=(old or {}).get("version"), reason=reason)
        return entry

    def rollback(self, name: str, alias: str, reason: str = "") -> dict:
        check_name(name)
        check_alias(alias)
        old = self.alias(name, alias)
        if old is None:
            self.require_model(name)
            raise NotFound(f"model '{name}' has no alias '{alias}' to roll back")
        history = list(old.get("history", []))
        if not history:
            raise UsageError(f"alias {name}@{alias} has no earlier version to roll back to",
                             hint=f"it was only ever set to v{old['version']}; promote another version instead")
        target = check_version(history.pop())
        entry = {"version": target, "set_at": artifact.utcnow(), "set_by": whoami(),
                 "reason": reason or f"rollback from v{old['version']}", "history": history}
        self.store.put(f"{name}/aliases/{alias}.json", json.dumps(entry, sort_keys=True).encode())
        self.record(name, "rolled_back", version=target, alias=alias, previous=old["version"], reason=entry["reason"])
        return entry

    def fetch(self, name: str, version: int) -> tuple[dict, dict[str, bytes]]:
        """Read a version's files and verify them in memory against the manifest (read from the
        backend, never from a cache; a cache only ever supplies bytes that match it)."""
        manifest = self.manifest(name, version)
        where = f"the manifest of {name}:{version} in {self.url}"
        if manifest.get("name") != name or manifest.get("version") != version:
            raise IntegrityError(f"{where} names {manifest.get('name')!r} version {manifest.get('version')!r}",
                                 hint="the registry was tampered with or corrupted; it will not be loaded")
        files = artifact.check_files(manifest, where)
        blobs = {}
        for fname, meta in files.items():
            try:
                data = self.store.get_verified(f"{name}/versions/{version}/{fname}", meta["sha256"])
            except KeyError:
                raise IntegrityError(f"{name}:{version} is missing {fname} in {self.url}") from None
            digest = artifact.sha256_bytes(data)
            if digest != meta["sha256"]:
                raise IntegrityError(
                    f"{name}:{version} {fname} in {self.url} does not match its manifest "
                    f"(sha256 {digest[:12]}…, expected {meta['sha256'][:12]}…)",
                    hint="the artifact was tampered with or corrupted; it will not be loaded. Register a new version")
            blobs[fname] = data
        return manifest, blobs

    def pull_file(self, ref: str, fname: str, dest: str | Path) -> tuple[Path, dict]:
        """Copy one file of a version, verified by sha256 against its manifest, to ``dest/fname``
        (replaced atomically). Returns (path, manifest). NotFound names the version's files when
        ``fname`` is not one of them."""
        name, version = self.resolve(ref)
        manifest = self.manifest(name, version)
        where = f"the manifest of {name}:{version} in {self.url}"
        if manifest.get("name") != name or manifest.get("version") != version:
            raise IntegrityError(f"{where} names {manifest.get('name')!r} version {manifest.get('version')!r}",
                                 hint="the registry was tampered with or corrupted; it will not be loaded")
        files = artifact.check_files(manifest, where)
        if fname == artifact.MANIFEST:
            data = json.dumps(manifest, indent=2).encode()
        elif fname not in files:
            listed = ", ".join(sorted(files) + [artifact.MANIFEST])
            raise NotFound(f"{name}:{version} has no file {fname!r}", hint=f"its files are: {listed}")
        else:
            try:
                data = self.store.get_verified(f"{name}/versions/{version}/{fname}", files[fname]["sha256"])
            except KeyError:
                raise IntegrityError(f"{name}:{version} is missing {fname} in {self.url}") from None
        digest = artifact.sha256_bytes(data)
        if fname != artifact.MANIFEST and digest != files[fname]["sha256"]:
            raise IntegrityError(
                f"{name}:{version} {fname} in {self.url} does not match its manifest "
                f"(sha256 {digest[:12]}…, expected {files[fname]['sha256'][:12]}…)",
                hint="the artifact was tampered with or corrupted; it will not be written. Register a new version")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".pull-{fname}-", dir=dest)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest / fname)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return dest / fname, manifest

    def pull(self, ref: str, dest: str | Path) -> tuple[Path, dict, bool]:
        """Copy a verified version into ``dest/<N>/``. Returns (path, manifest, changed)."""
        name, version = self.resolve(ref)
        check_name(name)
        check_version(version)
        dest = Path(dest)
        final = dest / str(version)
        if final.is_dir():
            try:
                manifest = artifact.verify_dir(final)
                remote = self.manifest(name, version)
                if (manifest.get("id"), manifest.get("files")) == (remote.get("id"), remote.get("files")):
                    return final, manifest, False
            except (IntegrityError, NotFound):
                pass
        manifest, blobs = self.fetch(name, version)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".pull-{version}-", dir=dest))
        try:
            for fname, data in blobs.items():
                (tmp / fname).write_bytes(data)
            (tmp / artifact.MANIFEST).write_text(json.dumps(manifest, indent=2))  # bytes verified in fetch()
            os.chmod(tmp, 0o755)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, manifest, True


def iter_log(reg: Registry, names: Iterable[str] | None = None) -> list[dict]:
    """Every version's manifest, newest first (what ``mlpipe models log`` shows)."""
    out = []
    for name in names or reg.models():
        for v in reg.require_model(name):
            out.append(reg.manifest(name, v))
    return sorted(out, key=lambda m: (m.get("created", ""), m["name"], m["version"]), reverse=True)
