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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.dashboard import FEATURE_PAGE, INDEX_FILE
from pipeline.sae.base import CONFIG_FILE, WEIGHTS_FILE

METRICS_FILE = "metrics.json"


def config_hash(payload: dict) -> str:
    """A short hash of everything an output depends on (weights, data, settings), stored with it so
    that a re-run with the same configuration is skipped and any change recomputes."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_dictionary(path: Path) -> bool:
    """A directory holding an SAE (this project's or another library's)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _current(marker: Path, hash_: str, *within: str) -> dict | None:
    """The JSON record at `marker` if it holds config hash `hash_` (under the keys `within`), else None."""
    try:
        record = json.loads(marker.read_text())
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str is welcome too

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
        return sorted(p for p in self.sae_root.glob(f"*/{name}") if is_dictionary(p))

    def trained(self, hook: str, name: str, hash_: str) -> bool:
        directory = self.sae(hook, name)
        return _current(directory / CONFIG_FILE, hash_) is not None and (directory / WEIGHTS_FILE).exists()

    # ------------------------------------------------------------ evaluate

    def evaluation(self, hook: str, name: str) -> Path:
        return self.root / "eval" / hook / name

    def evaluation_report(self, hook: str, name: str) -> Path:
        return self.evaluation(hook, name) / METRICS_FILE

    def evaluated(self, hook: str, name: str, hash_: str) -> dict | None:
        """The metrics.json of an evaluation made with this configuration, else None."""
        return _current(self.evaluation_report(hook, name), hash_)

    def evaluation_reports(self) -> list[Path]:
        """The metrics.json of every evaluated dictionary of the run."""
        return sorted(self.root.glob(f"eval/*/*/{METRICS_FILE}"))

    @property
    def pareto_plot(self) -> Path:
        return self.root / "eval" / "pareto.png"

    # ------------------------------------------------------------ analyze

    def features(self, hook: str, name: str) -> Path:
        return self.root / "features" / hook / name

    def feature_page(self, hook: str, name: str) -> Path:
        """The dashboard page that shows one feature (`#<id>` selects it)."""
        return self.features(hook, name) / FEATURE_PAGE

    def analyzed(self, hook: str, name: str, hash_: str) -> bool:
        return _current(self.features(hook, name) / INDEX_FILE, hash_, "meta") is not None

    # ------------------------------------------------------------ compare

    @property
    def comparison(self) -> Path:
        return self.root / "compare"
