"""Weights & Biases logging that never stands in the way: offline by default, and any failure of
W&B (not installed, not logged in, no network) turns logging off with a warning instead of stopping
the stage. `wandb sync <run_dir>/wandb/offline-run-*` uploads an offline run later.

Everything W&B writes stays in `<run_dir>/wandb/`: besides the runs, its staging area for tables and
media, its cache and its settings go there instead of the user's home (unless the user chose their
places with W&B's own environment variables).

W&B records the files it stages (a table's rows, its HTML cells) by absolute path, and `wandb sync`
reads them there. So W&B stages through a link of the same name on every machine,
`<tmp>/sae-pipeline-wandb/<id>` -> `<run_dir>/wandb/data` (the id is kept in the run directory):
after a run directory is copied or moved, `python -m pipeline.tracking <run_dir>` (or any stage run
on it) points the link at the new place, and `wandb sync` finds every file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import check_settings
from pipeline.fileio import atomic_write

log = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline | online | disabled."""
    project: str = "sae-pipeline"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_settings(self, "wandb", choices={"mode": ("offline", "online", "disabled")})


# W&B's own files (artifact staging, cache, settings), which it would otherwise keep under ~/
_OWN_DIRS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config"}
LINKS_VARIABLE = "SAE_PIPELINE_WANDB_LINKS"
"""Where the staging links live (default <tmp>/sae-pipeline-wandb: a path every machine can write)."""
_LINK_ID = "data-link"


def staging_link(files: Path) -> Path:
    """The path W&B stages through for the run directory whose W&B folder is `files`: a link, made
    or re-pointed here, to `files`/data (that folder itself where links cannot be made)."""
    target = files / _OWN_DIRS["WANDB_DATA_DIR"]
    target.mkdir(parents=True, exist_ok=True)
    id_file = files / _LINK_ID
    if not id_file.exists():
        atomic_write(id_file, uuid.uuid4().hex.encode())
    link = Path(os.environ.get(LINKS_VARIABLE) or Path(tempfile.gettempdir()) / "sae-pipeline-wandb") / id_file.read_text()
    if link.is_symlink() and link.resolve() == target.resolve():
        return link
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        fresh = link.with_name(f"{link.name}.{os.getpid()}.tmp")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(target.resolve(), target_is_directory=True)
        fresh.replace(link)
    except OSError as err:
        log.warning("W&B stages in %s directly (no link: %s); a moved copy syncs without its tables", target, err)
        return target
    return link


@contextlib.contextmanager
def _own_files_in(directory: Path) -> Iterator[None]:
    """While inside, W&B keeps its own files under `directory` (variables the user set are kept),
    staging through staging_link."""
    placed = [var for var in _OWN_DIRS if var not in os.environ]
    for var in placed:
        os.environ[var] = str(directory / _OWN_DIRS[var])
    if "WANDB_DATA_DIR" in placed:
        os.environ["WANDB_DATA_DIR"] = str(staging_link(directory))
    try:
        yield
    finally:
        for var in placed:
            os.environ.pop(var, None)


class Tracker:
    """A W&B run, or nothing: `log` and `finish` are always safe to call.

    Every stage's runs of one run directory share a group (the run directory, or its URL: `group`),
    have the stage as job_type, and are named `<stage> [detail] · <run directory>`.
    """

    def __init__(
        self, cfg: WandbConfig, run_dir: str | Path, stage: str, config: dict, rank: int = 0,
        group: str | None = None, detail: str = "",
    ):  # fmt: skip
        self._run = None
        group = group or str(Path(run_dir).absolute())
        self._files = Path(run_dir) / "wandb"
        if cfg.mode == "disabled" or rank != 0:
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._files.mkdir(parents=True, exist_ok=True)
            with _own_files_in(self._files):
                self._run = wandb.init(
                    project=cfg.project,
                    entity=cfg.entity,
                    name=f"{stage}{' ' + detail if detail else ''} · {group}",
                    group=group,
                    job_type=stage,
                    tags=list(cfg.tags),
                    mode=cfg.mode,
                    dir=str(self._files.parent),  # W&B adds the `wandb` folder itself
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
            with _own_files_in(self._files):
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

    def table(self, key: str, rows: list[dict]) -> None:
        """Log rows (dicts with the same keys) as a W&B table: one row per dictionary, say, so that
        W&B charts a metric across them."""
        if self._run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.log({key: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})

    def summary(self, metrics: dict) -> None:
        if self._run is not None:
            self._run.summary.update(metrics)

    def finish(self) -> None:
        if self._run is not None:
            try:
                with _own_files_in(self._files):
                    self._run.finish()
            except Exception as err:
                log.warning("W&B finish failed (%s)", err)
            self._run = None


def main() -> None:
    """`python -m pipeline.tracking <run_dir>`: point the W&B staging link at this (copied or moved)
    run directory, then say how to sync it."""
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "wandb").is_dir():
        sys.stderr.write("usage: python -m pipeline.tracking <run_dir>   (a run directory with a wandb/ folder)\n")
        sys.exit(2)
    files = Path(sys.argv[1]) / "wandb"
    link = staging_link(files)
    sys.stdout.write(f"{link} -> {files / _OWN_DIRS['WANDB_DATA_DIR']}\nnow: wandb sync {files}/offline-run-*\n")


if __name__ == "__main__":
    main()
