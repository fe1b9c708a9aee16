"""What every stage's command line shares: the Hydra entry point, errors reported as one line, and
run_dir checked before Hydra writes its logs into it (a remote run_dir's access before any compute).

A stage run from the command line prints a PipelineError, or an OSError (a full disk, a read-only
run directory, a path that is a file), as one line and exits with status 1; the traceback shows only
with HYDRA_FULL_ERROR=1 (Hydra's convention). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR
from pipeline.errors import PipelineError
from pipeline.fileio import nearest_existing
from pipeline.remote import Remote, is_remote, local_run_dir

# Hydra's log folder (conf/base.yaml) lies in the run directory, or in a remote run's local mirror
OmegaConf.register_new_resolver("local_run_dir", local_run_dir, replace=True)


class RunDirError(PipelineError, ValueError):
    """run_dir cannot hold the run's outputs."""


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


def check_run_dir(run_dir: str | Path) -> None:
    """run_dir must be a directory, or one that can be made, where this user may write; a URL must
    be reachable and writable with the credentials at hand."""
    if is_remote(run_dir):
        Remote(str(run_dir)).check()
        return
    existing = nearest_existing(run_dir)
    if not existing.is_dir():
        raise RunDirError(f"run_dir={run_dir}: {existing} is a file, not a directory; choose another run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"run_dir={run_dir}: {existing} is not writable; choose a run_dir you may write to")


class RunDirCheck(Callback):
    """Hydra callback (conf/base.yaml): check run_dir before Hydra makes its log folder there."""

    def on_run_start(self, config, **kwargs) -> None:
        with reported_as_one_line():
            check_run_dir(config.run_dir)


def stage_main(config_name: str, run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """The `main` of a stage: Hydra composes conf/<config_name>.yaml with the command line's overrides,
    and `run(cfg)` runs on it, its errors reported as one line."""

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> None:
        with reported_as_one_line():
            OmegaConf.resolve(cfg)
            run(cfg)

    return main
