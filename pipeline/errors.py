"""Errors a user can act on, and how a stage reports them.

Every error the pipeline raises on purpose derives from PipelineError (and from the builtin class
its meaning fits: ValueError for a bad setting, RuntimeError for bad data): its message is one line
that names the file or setting, what was wrong and what to do. A stage run from the command line
prints such an error, or an OSError (a full disk, a read-only run directory, a path that is a file),
as that one line and exits with status 1; the traceback shows only with HYDRA_FULL_ERROR=1 (Hydra's
convention). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class PipelineError(Exception):
    """Base of the errors whose message tells the user what to fix."""


def one_line(err: BaseException) -> str:
    """The message of a PipelineError or OSError as one line, with what to do for an OSError."""
    if isinstance(err, PipelineError):
        return " ".join(str(err).split())
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    return f"{where}{err.strerror or err}; check that run_dir and the paths given are writable directories"


@contextlib.contextmanager
def reported_as_one_line() -> Iterator[None]:
    """Within the block, a PipelineError or OSError ends the process with its one-line message."""
    try:
        yield
    except (PipelineError, OSError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(f"error: {one_line(err)}\n(HYDRA_FULL_ERROR=1 shows the traceback)\n")
        sys.exit(1)
