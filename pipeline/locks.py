"""Advisory locks: one process at a time writes an output.

A stage holds the lock of every output it writes (a hook's activations, a dictionary, an evaluation,
a dashboard) while it writes it; a second process asking for the same lock stops at once with a
message naming the process that holds it, while different outputs of one run directory are written
side by side. The lock is a hidden file beside the output (`.<name>.lock`) locked with flock(2): the
kernel releases it when its process ends, even by kill -9, so a lock never outlives its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError


class LockedError(PipelineError, RuntimeError):
    """Another process is writing the same output."""


def lock_file(target: Path, part: str = "") -> Path:
    """The lock file of an output directory or file (`part` tells apart locks of one output)."""
    return target.parent / f".{target.name}{'.' + part if part else ''}.lock"


@contextlib.contextmanager
def exclusive(target: Path, what: str, part: str = "") -> Iterator[None]:
    """Hold the lock of `target` within the block; raise LockedError if another process holds it.
    `what` names the output in that message."""
    path = lock_file(target, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "another process"
            raise LockedError(
                f"{what} is being written by {holder} (lock {path}); wait for it to finish, or stop it, "
                "then run again"
            ) from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(sys.argv)[:300]
        os.pwrite(
            fd, f"process {os.getpid()} on {socket.gethostname()} since {since} ({command})".encode(), 0
        )
        yield
    finally:
        os.close(fd)  # releases the lock
