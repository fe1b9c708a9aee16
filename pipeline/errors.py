"""Errors a user can act on.

Every error the pipeline raises on purpose derives from PipelineError (and from the builtin class
its meaning fits: ValueError for a bad setting, RuntimeError for bad data): its message is one line
that names the file or setting, what was wrong and what to do. cli.py prints it as that line.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of the errors whose message tells the user what to fix."""
