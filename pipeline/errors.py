"""Errors a user can act on, and how a stage reports them.

Every error the pipeline raises on purpose derives from PipelineError (and from the builtin class
its meaning fits: ValueError for a bad setting, RuntimeError for bad data): its message is one line
that names the file or setting, what was wrong and what to do. cli.py prints it as that line.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of the errors whose message tells the user what to fix."""


def one_line(err: BaseException) -> str:
    """The message of a PipelineError or OSError as one line, with what to do for an OSError."""
    if isinstance(err, PipelineError):
        return " ".join(str(err).split())
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    return f"{where}{err.strerror or err}; check that run_dir and the paths given are writable directories"
