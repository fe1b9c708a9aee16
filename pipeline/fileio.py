"""Crash-safe file writing and hashing, shared by every stage."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError

_TMP_SUFFIX = ".tmp"  # temporaries are .<final name>.<random>.tmp beside their final name


def cache_root() -> Path:
    """Where the project keeps what it can rebuild (converted models, mirrors of remote runs):
    $SAE_PIPELINE_CACHE, else ~/.cache/sae-pipeline."""
    return Path(os.environ.get("SAE_PIPELINE_CACHE", Path.home() / ".cache" / "sae-pipeline"))


class DiskFullError(PipelineError, OSError):
    """The disk filled up while writing; whatever was completed before is kept."""


def nearest_existing(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (where it would be made)."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def free_bytes(path: str | Path) -> int:
    """Free space on the disk that holds `path` (or would hold it: its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path)).free


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while abs(n) >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, *chunks: bytes | memoryview) -> str:
    """Write the chunks to a temporary file beside `path`, fsync, rename; return their sha256.

    Chunks are written (and hashed) straight from memory, so large tensors are never copied into
    one bytes object. On any failure nothing is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    digest = hashlib.sha256()
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            digest.update(view)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException as err:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                err.errno,
                f"disk full while writing {path}: free space and re-run the same command; "
                "everything completed before is kept and the stage resumes after it",
            ) from err
        raise
    return digest.hexdigest()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (named as atomic_write names its temporaries) for the block to
    write; renamed to `path` when the block ends, deleted if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def stale_temporaries(directory: Path) -> Iterator[tuple[Path, str]]:
    """(temporary file, name of the file it was to become) of every atomic_write temporary in
    `directory`: what a killed writer left. Only the writer of those files may delete them."""
    for tmp in directory.glob(f".*{_TMP_SUFFIX}"):
        yield tmp, tmp.name[1:].rsplit(".", 2)[0]


def remove_stale_temporaries(directory: Path) -> None:
    """Delete every atomic_write temporary in `directory` (its writer holds the output's lock)."""
    if directory.is_dir():
        for tmp, _ in stale_temporaries(directory):
            tmp.unlink(missing_ok=True)
