"""Run directories on object storage: `run_dir=s3://bucket/run` (or gs://, hf://, any fsspec URL).

A stage works on a remote run through a local mirror, `$SAE_PIPELINE_CACHE/runs/<scheme>/<bucket>/<path>`:
- on opening, the mirror receives the remote files stages read back (manifests, dictionaries,
  checkpoints, done-markers; `PULLED`), skipping those it already holds in the same version;
- a finished output is uploaded with its done-marker last. An object store makes an object visible
  only once it is fully uploaded, so a reader never sees a partial file, and a marker only after
  everything it vouches for;
- shard files are downloaded on demand by a ShardCache into the mirror, their sha256 checked while
  they stream in, read ahead on background threads, and deleted least recently used beyond
  `$SAE_PIPELINE_CACHE_GB` (default 20): one CacheBudget for all hooks of the run, counting the
  downloads in flight and the shards earlier processes left.
Endpoint and credentials come from where other tools take them: the AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...) or fsspec's configuration.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import fsspec
import numpy as np

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write, cache_root, file_sha256, human_bytes, replacing
from pipeline.shards import ShardError, ShardRecord, parse_shard_header

log = logging.getLogger(__name__)

# what the stages read back from a run, relative to its root (shard payloads come through ShardCache)
PULLED = (
    "activations/*/*.json",
    "activations/*/*.sha256",
    "sae/*/*/*",
    "checkpoints/*/*",
    "eval/*/*/metrics.json",
    "features/*/*/features.json",
)
_VERSIONS = ".remote-versions.json"  # in the mirror: the version (ETag) of each file pulled
_CACHE_GB = "SAE_PIPELINE_CACHE_GB"
T = TypeVar("T")


class RemoteError(PipelineError, RuntimeError):
    """The remote run directory cannot be reached, read or written; the message says what to fix."""


def is_remote(location: str | Path) -> bool:
    """A URL with a scheme (s3://, gs://, ...) rather than a local path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def mirror_of(url: str) -> Path:
    """The local mirror of the run at `url`."""
    scheme, rest = url.rstrip("/").split("://", 1)
    return cache_root() / "runs" / scheme / rest.strip("/")


def local_run_dir(run_dir: str) -> str:
    """Where a stage writes local files of the run (Hydra's logs): run_dir, or a URL's mirror."""
    return str(mirror_of(run_dir)) if is_remote(run_dir) else run_dir


def cache_bytes() -> int:
    """The bound on the shards a run's local cache holds at once ($SAE_PIPELINE_CACHE_GB)."""
    try:
        return int(float(os.environ.get(_CACHE_GB, "20")) * 2**30)
    except ValueError:
        raise RemoteError(f"{_CACHE_GB}={os.environ[_CACHE_GB]!r} is not a number of GiB; set e.g. {_CACHE_GB}=20") from None


_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")
"""botocore's errors for missing credentials (by name: botocore is s3fs's dependency, not ours)"""


def _explain(url: str, err: BaseException) -> str:
    """One line saying what went wrong with the remote and what to change."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the provider's default endpoint")
    if isinstance(err, ImportError):
        return f"run_dir={url} needs the fsspec backend for its scheme ({err}); install it (s3fs for s3://, gcsfs for gs://)"
    if isinstance(err, ValueError) and "protocol" in str(err).lower():  # fsspec: "Protocol not known: foo"
        return f"run_dir={url}: fsspec knows no storage scheme {url.split('://')[0]}:// ({err}); use s3://, gs://, hf:// or a local path"
    if type(err).__name__ in _NO_CREDENTIALS:
        return (
            f"run_dir={url}: no credentials found ({err}); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE (or fsspec's configuration)"
        )
    if isinstance(err, PermissionError):
        return (
            f"run_dir={url}: access denied ({err}); check the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or fsspec's configuration) and that they may write there"
        )
    if isinstance(err, FileNotFoundError):
        return f"run_dir={url}: the bucket does not exist ({err}); create it or fix run_dir"
    return (
        f"run_dir={url}: cannot reach the storage at {endpoint} ({type(err).__name__}: {err}); "
        "check AWS_ENDPOINT_URL and the network"
    )


def _version(info: dict) -> str:
    """What tells two versions of a remote file apart: its ETag, else its size and time."""
    return str(info.get("ETag") or (info.get("size"), info.get("mtime") or info.get("LastModified")))


class Remote:
    """A run directory at a URL and its local mirror (see the module docstring)."""

    def __init__(self, url: str, mirror: Path | None = None):
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            raise RemoteError(_explain(self.url, err)) from err
        self.mirror = mirror or mirror_of(self.url)
        self._lock = threading.Lock()  # the versions file, written by uploading threads

    def key(self, local: Path) -> str:
        """The remote path of a file of the mirror."""
        return f"{self.root}/{Path(local).relative_to(self.mirror).as_posix()}"

    def url_of(self, local: Path) -> str:
        return f"{self.url}/{Path(local).relative_to(self.mirror).as_posix()}"

    def check(self) -> None:
        """Write, read back and delete a small object: wrong credentials, a missing bucket or an
        unreachable endpoint stop here with one line, before any compute."""
        probe = f"{self.root}/.write-check-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(probe, b"ok")
            self.fs.cat_file(probe)
            self.fs.rm_file(probe)
        except Exception as err:  # botocore / aiohttp raise their own connection errors
            raise RemoteError(_explain(self.url, err)) from err

    # ------------------------------------------------------------ files

    def pull(self, patterns: Iterable[str] = PULLED) -> int:
        """Download the remote files matching `patterns` (relative to the root) that the mirror lacks
        or holds in another version; return how many were downloaded."""
        patterns = tuple(patterns)
        wanted = {}
        for key, info in self._listing().items():
            relative = key[len(self.root) + 1 :]
            if any(fnmatch.fnmatchcase(relative, p) for p in patterns):
                wanted[relative] = (key, info)
        with self._lock:
            versions = self._versions()
            stale = {r: v for r, v in wanted.items() if versions.get(r) != _version(v[1]) or not (self.mirror / r).exists()}
        for relative, (key, _) in stale.items():
            with replacing(self.mirror / relative) as tmp:
                self.fs.get_file(key, str(tmp))
        self._remember({r: info for r, (_, info) in stale.items()}, patterns)
        return len(stale)

    def _listing(self, under: str = "") -> dict[str, dict]:
        self.fs.invalidate_cache()  # listings are cached per process; other machines write too
        try:
            return self.fs.find(f"{self.root}/{under}".rstrip("/"), detail=True)
        except FileNotFoundError:
            return {}

    def _versions(self) -> dict[str, str]:
        """The version of each mirror file as last downloaded or uploaded (held under self._lock)."""
        try:
            return json.loads((self.mirror / _VERSIONS).read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, infos: dict[str, dict], patterns: tuple[str, ...] = PULLED) -> None:
        """Record that the mirror holds these versions of these files (relative path -> remote info),
        of those matching `patterns`: uploaded dashboards' many files stay out unless downloaded."""
        infos = {r: info for r, info in infos.items() if any(fnmatch.fnmatchcase(r, p) for p in patterns)}
        if infos:
            with self._lock:
                versions = self._versions()
                versions.update({relative: _version(info) for relative, info in infos.items()})
                atomic_write(self.mirror / _VERSIONS, json.dumps(versions).encode())

    def push(self, local: Path) -> None:
        """Upload one file of the mirror to its place in the run."""
        key = self.key(local)
        self.fs.put_file(str(local), key)
        self._remember({key[len(self.root) + 1 :]: self.fs.info(key)})

    def publish(self, directory: Path, marker: str) -> None:
        """Make the remote copy of an output directory equal to the mirror's: its old marker removed
        first, every other file uploaded (remote files the output no longer has deleted), the marker
        last, so a reader never takes a half-uploaded output as done."""
        self.delete(directory / marker)
        files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
        payload = [p for p in files if p.name != marker]
        if payload:
            self.fs.put([str(p) for p in payload], [self.key(p) for p in payload])
        kept = {self.key(p) for p in files}
        listing = self._listing(directory.relative_to(self.mirror).as_posix())  # one listing: versions and leftovers
        self._remember({k[len(self.root) + 1 :]: info for k, info in listing.items() if k in kept})
        stale = [k for k in listing if k not in kept]
        if stale:
            self.fs.rm(stale)
        if (directory / marker).exists():
            self.push(directory / marker)

    def delete(self, local: Path) -> None:
        """Remove a file's remote copy, if there is one."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(local))

    def exists(self, local: Path) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.key(local))

    def read_text(self, local: Path) -> str | None:
        """A small remote file's text (a done-marker), None when there is none."""
        try:
            return self.fs.cat_file(self.key(local)).decode()
        except FileNotFoundError:
            return None

    def glob(self, pattern: str) -> list[Path]:
        """The mirror paths of the remote files matching `pattern` (relative to the root)."""
        self.fs.invalidate_cache()
        return sorted(self.mirror / k[len(self.root) + 1 :] for k in self.fs.glob(f"{self.root}/{pattern}"))

    def read_range(self, local: Path, start: int, stop: int) -> bytes:
        return self.fs.cat_file(self.key(local), start=start, end=stop)

    def shard_tokens(self, local: Path) -> tuple[dict, np.ndarray]:
        """(header, int32 tokens [n_seq, context_length]) of a remote shard, by range reads: its
        activations stay where they are. Raises ShardError if the object is shorter than its header says."""
        header_len = int.from_bytes(self.read_range(local, 0, 8), "little")
        infos = parse_shard_header(self.read_range(local, 8, 8 + header_len), header_len, self.url_of(local))
        size = self.fs.size(self.key(local))
        if {"tokens", "activations"} - infos.keys() or 8 + header_len + max(i.end for i in infos.values()) != size:
            raise ShardError(f"shard {self.url_of(local)} is truncated or incomplete ({size} bytes)")
        info = infos["tokens"]
        count = int(np.prod(info.shape))
        data = self.read_range(local, info.offset, info.offset + count * np.dtype(info.np_dtype).itemsize)
        return infos, np.frombuffer(data, dtype=info.np_dtype).reshape(info.shape)


class CacheBudget:
    """The bytes of shard files one run's mirror may hold at once, shared by the ShardCaches of all
    its activation directories (a transcoder's two hooks count together); least recently used shards
    are deleted first. A download reserves its shard's size before it starts, so the files being
    written count as well: the mirror exceeds the capacity only when the capacity is smaller than the
    downloads in flight (it always admits the shards being read). Shards an earlier process left in
    the mirror count too, as the least recently used."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lock = threading.RLock()  # held by a reader across an opener, which may forget a vanished file
        self._resident: OrderedDict[Path, int] = OrderedDict()  # shard file -> bytes, least recent first
        self._reserved = 0  # bytes of downloads in flight

    def reserve(self, size: int) -> None:
        """Make room for `size` more bytes, deleting least recently used shards (never blocks)."""
        with self.lock:
            while self._resident and sum(self._resident.values()) + self._reserved + size > self.capacity:
                path, held = self._resident.popitem(last=False)
                path.unlink(missing_ok=True)
                log.debug("shard cache: evicted %s (%s)", path.name, human_bytes(held))
            self._reserved += size

    def admit(self, path: Path, reserved: int) -> None:
        """A reserved download landed at `path`: it now counts as resident, most recent."""
        with self.lock:
            self._reserved -= reserved
            self._resident[path] = path.stat().st_size
            self._resident.move_to_end(path)

    def adopt(self, paths: Iterable[Path], oldest: bool = True) -> None:
        """Count shard files already on disk (left by an earlier process) as least recently used, the
        oldest first (`oldest=False`: as the most recent), so the bound holds across processes; those
        already counted are left as they are."""
        with self.lock:
            found = []
            for path in paths:
                if path not in self._resident:
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by another process
                        stat = path.stat()
                        found.append((stat.st_mtime, path, stat.st_size))
            for _, path, size in sorted(found, reverse=oldest):
                self._resident[path] = size
                self._resident.move_to_end(path, last=not oldest)

    def forget(self, path: Path) -> None:
        """`path` is gone or not to be trusted: stop counting it and delete it."""
        with self.lock:
            self._resident.pop(path, None)
            path.unlink(missing_ok=True)

    def release(self, reserved: int) -> None:
        """A reserved download failed: its room is free again."""
        with self.lock:
            self._reserved -= reserved

    def touch(self, path: Path) -> bool:
        """Whether `path` is resident, marking it most recently used; call with `lock` held."""
        if path in self._resident:
            self._resident.move_to_end(path)
            return True
        return False

    def resident(self) -> set[Path]:
        with self.lock:
            return set(self._resident)


_BUDGETS: weakref.WeakValueDictionary[Path, CacheBudget] = weakref.WeakValueDictionary()
_BUDGETS_LOCK = threading.Lock()


def run_budget(mirror: Path) -> CacheBudget:
    """The one CacheBudget of the run mirrored at `mirror` in this process ($SAE_PIPELINE_CACHE_GB),
    for as long as a cache uses it."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(mirror)
        if budget is None:
            budget = _BUDGETS[mirror] = CacheBudget(cache_bytes())
        return budget


class ShardCache:
    """The shards of one remote activation directory, downloaded on demand into the mirror.

    A shard is streamed to a temporary file while its sha256 is computed, and renamed into place
    only if it matches the manifest; shards already in the mirror are hashed once before first use.
    `prefetch` downloads on `read_ahead` background threads. The files are held within `budget`
    (its own of $SAE_PIPELINE_CACHE_GB when none is given; a reader drops its memory maps of shards
    no longer resident).
    """

    def __init__(self, remote: Remote, directory: Path, read_ahead: int = 2, budget: CacheBudget | None = None):
        self.remote, self.directory = remote, Path(directory)
        self.budget = budget or CacheBudget(cache_bytes())
        self.read_ahead = read_ahead
        self._pool = ThreadPoolExecutor(read_ahead, thread_name_prefix="shard-download")
        self._pending: dict[str, Future] = {}
        self._pending_lock = threading.Lock()
        self.downloaded = 0  # shards downloaded by this cache (for logs and tests)
        self.budget.adopt(self.directory.glob("shard-*.safetensors"))

    def open(self, record: ShardRecord, opener: Callable[[Path], T]) -> T:
        """`opener(local path)` of a shard holding the bytes the manifest vouches for (waiting for its
        download); called while no eviction can delete the file, so a memory map made there stays valid."""
        while True:
            path = self._submit(record).result()
            with self.budget.lock:
                if self.budget.touch(path):
                    try:
                        return opener(path)
                    except FileNotFoundError:  # deleted by another process sharing the mirror (a DDP rank)
                        self.budget.forget(path)

    def prefetch(self, records: Iterable[ShardRecord]) -> None:
        """Start downloading these shards in the background."""
        for record in records:
            self._submit(record)

    def resident(self) -> set[str]:
        return {path.name for path in self.budget.resident() if path.parent == self.directory}

    def shards_held(self, shard_bytes: int) -> int:
        """How many shards of `shard_bytes` the cache holds at once."""
        return max(1, self.budget.capacity // max(1, shard_bytes))

    def _submit(self, record: ShardRecord) -> Future:
        """The download of `record`: the one under way or done, or a new one where there is none, it
        failed, or its shard was evicted since."""
        path = self.directory / record.name
        with self._pending_lock:
            future = self._pending.get(record.name)
            if future is not None and future.done():
                with self.budget.lock:
                    if future.cancelled() or future.exception() is not None or not self.budget.touch(path):
                        future = None
            if future is None:
                future = self._pending[record.name] = self._pool.submit(self._download, record)
            return future

    def _download(self, record: ShardRecord) -> Path:
        path = self.directory / record.name
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: downloaded below
            if path.exists() and file_sha256(path) == record.sha256:  # left by an earlier process
                self.budget.adopt([path], oldest=False)
                return path
        self.budget.forget(path)
        size = self.remote.fs.size(self.remote.key(path))
        self.budget.reserve(size)
        try:
            self._fetch(record, path)
        except BaseException:
            self.budget.release(size)
            raise
        self.budget.admit(path, size)
        return path

    def _fetch(self, record: ShardRecord, path: Path) -> None:
        """Download the shard to `path` through a temporary file, checking its sha256 as it streams."""
        digest = hashlib.sha256()
        with replacing(path) as tmp, self.remote.fs.open(self.remote.key(path), "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 24):
                digest.update(block)
                dst.write(block)
            if digest.hexdigest() != record.sha256:
                raise ShardError(
                    f"shard {self.remote.url_of(path)} is corrupt: its sha256 does not match the manifest; "
                    "delete it there and re-run the harvest command, which rewrites it"
                )
        self.downloaded += 1

    def tokens(self, record: ShardRecord) -> np.ndarray:
        """A shard's int32 token ids [n_seq, context_length], read by range without its activations."""
        return self.remote.shard_tokens(self.directory / record.name)[1]

    def close(self, wait: bool = True) -> None:
        """Cancel the downloads not started (and wait for those running, with `wait`)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
