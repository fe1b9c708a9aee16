"""Weights & Biases logging that never stands in the way: offline by default, and any failure of
W&B (not installed, not logged in, no network) turns logging off with a warning instead of stopping
the stage. `wandb sync <run_dir>/wandb/offline-run-*` uploads an offline run later.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline | online | disabled."""
    project: str = "sae-pipeline"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


class Tracker:
    """A W&B run, or nothing: `log` and `finish` are always safe to call."""

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, name: str, config: dict, rank: int = 0):
        self._run = None
        if cfg.mode == "disabled" or rank != 0:
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            directory = Path(run_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                tags=list(cfg.tags),
                mode=cfg.mode,
                dir=str(directory),
                config=config,
                reinit="create_new",
            )
        except Exception as err:  # W&B must never stop a stage
            log.warning("W&B logging is off (%s: %s)", type(err).__name__, err)

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as err:
            log.warning("W&B logging failed and is now off (%s)", err)
            self._run = None

    def log_images(self, paths: dict[str, Path]) -> None:
        """Log PNG files as W&B images under the given keys."""
        if self._run is None:
            return
        import wandb

        self.log({key: wandb.Image(str(path)) for key, path in paths.items()})

    def summary(self, metrics: dict) -> None:
        if self._run is not None:
            self._run.summary.update(metrics)

    def finish(self) -> None:
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as err:
                log.warning("W&B finish failed (%s)", err)
            self._run = None
