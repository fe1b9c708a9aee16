"""The run directory: every path the stages read and write, the config hash stored with each output,
and the check that an output is complete and current. Nothing else builds a run-directory path.

    <run>/activations/<hook>/            manifest.json + shard-NNNNN.safetensors        harvest
    <run>/sae/<hook>/<name>/             sae.safetensors + cfg.json                     train
    <run>/checkpoints/<hook>/<hash>.safetensors  a training not finished yet, per config  train
    <run>/eval/<hook>/<name>/            metrics.json, per_token.safetensors, density.png evaluate
    <run>/eval/pareto.png                every evaluated dictionary on one plot         evaluate
    <run>/features/<hook>/<name>/        the dashboard: features.json, data/, pages     analyze
    <run>/compare/                       report.json, matches.safetensors, index.html   compare
    <run>/wandb/                         offline W&B runs (and W&B's own files)         every stage
    <run>/logs/<stage>/<time>/           Hydra's config and log (conf/base.yaml)        every stage

An output is done when its marker file, written after everything it vouches for, records the
config hash of the settings that produced it: cfg.json for a dictionary, metrics.json for an
evaluation, features.json for a dashboard.

A run directory may be a URL (`s3://bucket/run`, remote.py): the stages then work in its local
mirror, and `publish` / `upload` / `remove` carry each finished output to the remote run; whether an
output is done is asked of the remote run, never of the mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

from pipeline.dashboard import FEATURE_PAGE, INDEX_FILE
from pipeline.remote import Remote, ShardCache, is_remote, run_budget
from pipeline.sae.base import CONFIG_FILE, WEIGHTS_FILE
from pipeline.shards import ShardSet

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def config_hash(payload: dict) -> str:
    """A short hash of everything an output depends on (weights, data, settings), stored with it so
    that a re-run with the same configuration is skipped and any change recomputes."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_dictionary(path: Path) -> bool:
    """A directory holding an SAE (this project's or another library's)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _current(text: str | None, hash_: str, *within: str) -> dict | None:
    """The JSON record `text` (a marker file's) if it holds config hash `hash_` (under the keys
    `within`), else None."""
    try:
        record = json.loads(text)
        recorded = record
        for key in within:
            recorded = recorded[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if recorded.get("config_hash") == hash_ else None


@dataclass(frozen=True)
class RunDir:
    """The layout of one run directory (see the module docstring)."""

    root: Path
    remote: Remote | None = None  # when the run lives at a URL: root is its local mirror

    def __post_init__(self) -> None:
        if is_remote(self.root):
            raise ValueError(f"{self.root} is a URL: open it with RunDir.open")
        object.__setattr__(self, "root", Path(self.root))  # a str is welcome too

    @classmethod
    def open(cls, run_dir: str | Path | RunDir) -> RunDir:
        """The run at `run_dir`: a local directory, or a URL, checked for access and mirrored locally."""
        if isinstance(run_dir, RunDir):
            return run_dir
        if not is_remote(run_dir):
            return cls(run_dir)
        remote = Remote(str(run_dir))
        remote.check()
        pulled = remote.pull()
        log.info("run %s: working in its local mirror %s (%d files brought up to date)", remote.url, remote.mirror, pulled)
        return cls(remote.mirror, remote)

    @property
    def location(self) -> str:
        """Where the run lives, for messages: its URL or its directory."""
        return self.remote.url if self.remote else str(self.root)

    def where(self, path: Path) -> str:
        """A path of the run for messages: its URL on a remote run (`path` is then in the mirror)."""
        return self.remote.url_of(path) if self.remote else str(path)

    def _text(self, path: Path) -> str | None:
        """A small file's text, from the remote run when there is one; None when there is none."""
        if self.remote:
            return self.remote.read_text(path)
        try:
            return path.read_text()
        except OSError:
            return None

    def _glob(self, pattern: str) -> list[Path]:
        return self.remote.glob(pattern) if self.remote else sorted(self.root.glob(pattern))

    # ------------------------------------------------------------ carrying outputs to a remote run

    def publish(self, directory: Path, marker: str) -> None:
        """A finished output directory, to the remote run (its marker last); nothing for a local run."""
        if self.remote:
            self.remote.publish(directory, marker)

    def upload(self, path: Path) -> None:
        """One finished file, to the remote run; nothing for a local run."""
        if self.remote:
            self.remote.push(path)

    def remove(self, path: Path) -> None:
        """Delete a file, and its remote copy."""
        path.unlink(missing_ok=True)
        if self.remote:
            self.remote.delete(path)

    def download(self, directory: Path) -> None:
        """Bring a whole remote output directory into the mirror (a dashboard, to browse it)."""
        if self.remote:
            self.remote.pull([f"{directory.relative_to(self.root).as_posix()}/*"])

    def refresh(self, directory: Path) -> None:
        """Bring the mirror's copy of a directory's small files up to date (what other processes wrote)."""
        if self.remote:
            relative = directory.relative_to(self.root).as_posix()
            self.remote.pull([f"{relative}/*.json", f"{relative}/*.sha256"])

    @classmethod
    def of_dictionary(cls, sae_dir: Path) -> RunDir | None:
        """The run directory a dictionary directory sits in (<run>/sae/<hook>/<name>), if any."""
        sae_dir = Path(sae_dir)
        return (
            cls(sae_dir.parents[2]) if len(sae_dir.parents) > 2 and sae_dir.parents[1].name == "sae" else None
        )

    # ------------------------------------------------------------ harvest

    def activations(self, hook: str) -> Path:
        return self.root / "activations" / hook

    def shards(self, hook: str, verify: bool = False) -> ShardSet:
        """The activations harvested at `hook`; a remote run's through a local cache, bounded for all
        hooks of the run together."""
        directory = self.activations(hook)
        if not self.remote:
            return ShardSet(directory, verify=verify)
        cache = ShardCache(self.remote, directory, budget=run_budget(self.root))
        shards = ShardSet(directory, verify=verify, cache=cache)
        weakref.finalize(shards, cache.close, False)  # read-ahead nobody will read stops with its reader
        return shards

    # ------------------------------------------------------------ train

    @property
    def sae_root(self) -> Path:
        return self.root / "sae"

    def sae(self, hook: str, name: str) -> Path:
        return self.sae_root / hook / name

    def checkpoint(self, hook: str, config_hash: str) -> Path:
        """The resumable state of the training with this config hash at `hook` (one file each, so
        trainings of other settings keep theirs)."""
        return self.root / "checkpoints" / hook / f"{config_hash}.safetensors"

    def dictionaries(self, name: str = "*") -> list[Path]:
        """Every dictionary directory of the run (named `name`, at any hook), sorted."""
        if self.remote:
            return [p.parent for p in self._glob(f"sae/*/{name}/{CONFIG_FILE}")]
        return sorted(p for p in self.sae_root.glob(f"*/{name}") if is_dictionary(p))

    def holds_dictionary(self, hook: str, name: str) -> bool:
        """A complete dictionary (its cfg.json) is at sae/<hook>/<name>, whatever it was trained with."""
        return self._text(self.sae(hook, name) / CONFIG_FILE) is not None

    def trained(self, hook: str, name: str, hash_: str) -> bool:
        directory = self.sae(hook, name)
        weights = directory / WEIGHTS_FILE
        return _current(self._text(directory / CONFIG_FILE), hash_) is not None and (
            self.remote.exists(weights) if self.remote else weights.exists()
        )

    # ------------------------------------------------------------ evaluate

    def evaluation(self, hook: str, name: str) -> Path:
        return self.root / "eval" / hook / name

    def evaluation_report(self, hook: str, name: str) -> Path:
        return self.evaluation(hook, name) / METRICS_FILE

    def evaluated(self, hook: str, name: str, hash_: str) -> dict | None:
        """The metrics.json of an evaluation made with this configuration, else None."""
        return _current(self._text(self.evaluation_report(hook, name)), hash_)

    def evaluation_reports(self) -> list[Path]:
        """The metrics.json of every evaluated dictionary of the run."""
        return self._glob(f"eval/*/*/{METRICS_FILE}")

    @property
    def pareto_plot(self) -> Path:
        return self.root / "eval" / "pareto.png"

    # ------------------------------------------------------------ analyze

    def features(self, hook: str, name: str) -> Path:
        return self.root / "features" / hook / name

    def relevance(self, hook: str, name: str, task: str) -> Path:
        """The relevance stage's ranking of a dictionary's features for one task corpus."""
        return self.root / "relevance" / hook / name / task

    def steering(self, hook: str, name: str, feature: int) -> Path:
        """The steer stage's report on one feature of a dictionary."""
        return self.root / "steer" / hook / name / f"feature-{feature}.json"

    def feature_page(self, hook: str, name: str) -> Path:
        """The dashboard page that shows one feature (`#<id>` selects it)."""
        return self.features(hook, name) / FEATURE_PAGE

    def analyzed(self, hook: str, name: str, hash_: str) -> bool:
        return _current(self._text(self.features(hook, name) / INDEX_FILE), hash_, "meta") is not None

    # ------------------------------------------------------------ compare

    @property
    def comparison(self) -> Path:
        return self.root / "compare"

    def tracking(self, name: str) -> Path:
        """The track stage's output for one fine-tuning (named after its directory)."""
        return self.root / "track" / name
