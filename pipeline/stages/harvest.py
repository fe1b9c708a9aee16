"""Harvest stage: stream a corpus through a model and store activations at hook points as shards.

    python -m pipeline harvest model=smollm2 corpus=pydoc harvest.hooks=[blocks.9.resid_post] \
        harvest.tokens=200000 run_dir=outputs/demo

Writes `<run_dir>/activations/<hook>/shard-*.safetensors` and `manifest.json`; crash-safe,
resumable and splittable over workers (harvesting.py has how).
"""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.cli import stage_main
from pipeline.config import to_dataclass
from pipeline.corpus import CorpusConfig
from pipeline.harvesting import HarvestConfig, harvest_activations
from pipeline.models import ModelConfig
from pipeline.shards import Manifest
from pipeline.tracking import WandbConfig


def run(cfg: DictConfig) -> dict[str, Manifest]:
    """The harvest stage on a composed Hydra config."""
    return harvest_activations(
        to_dataclass(ModelConfig, cfg.model),
        to_dataclass(CorpusConfig, cfg.corpus),
        to_dataclass(HarvestConfig, cfg.harvest),
        cfg.run_dir,
        wandb_cfg=to_dataclass(WandbConfig, cfg.wandb),
    )


main = stage_main("harvest", run)
