"""Deterministic crash points for the crash-safety tests.

With `SAE_PIPELINE_KILL_AT=<point>:<n>` in the environment, a process kills itself with SIGKILL (as
`kill -9` would, leaving no chance to clean up) when it reaches `<point>` for index `<n>`: a test
kills a harvest before its shard n, or a training before its step n, at exactly that place, with no
sleeps or timing windows. Points: `harvest.shard`, `train.step`. Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

KILL_VARIABLE = "SAE_PIPELINE_KILL_AT"


def kill_point(point: str, index: int) -> None:
    """Die here, at once, if the environment asks for this point and index."""
    if os.environ.get(KILL_VARIABLE) == f"{point}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)
