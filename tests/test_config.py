from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, check_settings, to_dataclass
from pipeline.corpus import CorpusConfig, CorpusError
from pipeline.evaluation import EvaluationError, EvaluationSettings
from pipeline.harvesting import HarvestConfig, HarvestError
from pipeline.models import ModelConfig, ModelLoadError
from pipeline.sae import SaeConfig
from pipeline.sae.base import SaeConfigError
from pipeline.stages.analyze import AnalyzeConfig, AnalyzeError
from pipeline.stages.compare import CompareConfig, CompareError
from pipeline.stages.finetune import FinetuneConfig
from pipeline.tracking import WandbConfig
from pipeline.training import TrainConfig, TrainError

PAIR = {"base": "a", "other": "b"}


@pytest.mark.parametrize(
    ("cls", "error", "key", "value"),
    [
        (HarvestConfig, HarvestError, "batch_size", 0),
        (HarvestConfig, HarvestError, "dtype", "float8"),
        (TrainConfig, TrainError, "lr", -0.001),
        (TrainConfig, TrainError, "lr", 0.0),
        (TrainConfig, TrainError, "epochs", 0.0),
        (TrainConfig, TrainError, "holdout_tokens", -1),
        (TrainConfig, TrainError, "average_power", -1.0),
        (TrainConfig, TrainError, "dead_lr_scale", 0.0),
        (TrainConfig, TrainError, "lr_decay", "step"),
        (TrainConfig, TrainError, "lr_decay_start", 1.5),
        (TrainConfig, TrainError, "grad_clip", -1.0),
        (TrainConfig, TrainError, "dead_tokens", 0),
        (TrainConfig, TrainError, "checkpoint_every", -5),
        (SaeConfig, SaeConfigError, "k", 0),
        (SaeConfig, SaeConfigError, "aux_coefficient", -0.5),
        (SaeConfig, SaeConfigError, "balance", -0.25),
        (SaeConfig, SaeConfigError, "jumprelu_bandwidth", 0.0),
        (EvaluationSettings, EvaluationError, "batch_size", 0),
        (EvaluationSettings, EvaluationError, "holdout_tokens", -1),
        (AnalyzeConfig, AnalyzeError, "context_before", -1),
        (AnalyzeConfig, AnalyzeError, "tokens", 0),
        (CompareConfig, CompareError, "top_k", 0),
        (FinetuneConfig, ConfigError, "lr", 0.0),
        (CorpusConfig, CorpusError, "shuffle_buffer", 0),
        (ModelConfig, ModelLoadError, "dtype", "fp8"),
        (WandbConfig, ConfigError, "mode", "cloud"),
    ],
)
def test_every_numeric_and_named_setting_is_checked_naming_its_key(cls, error, key, value):
    extra = PAIR if cls is CompareConfig else {}
    with pytest.raises(error, match=rf"\.{key}={value!r}"):
        cls(**{**extra, key: value})


def test_dead_lr_scale_is_signums_only():
    with pytest.raises(TrainError, match=r"train.dead_lr_scale=2.0 applies to train.optimizer=signum only"):
        TrainConfig(optimizer="adam", dead_lr_scale=2.0)
    assert TrainConfig(optimizer="adam").dead_step_scale() == 1.0
    assert TrainConfig().dead_step_scale() == 3.0 and TrainConfig(dead_lr_scale=1.5).dead_step_scale() == 1.5
    assert TrainConfig().dead_step_scale(transcoder=True) == 1.0  # transcoders: none unless set
    assert TrainConfig(dead_lr_scale=2.0).dead_step_scale(transcoder=True) == 2.0


def test_bad_model_device_and_adam_betas():
    with pytest.raises(ModelLoadError, match="model.device='gpu'"):
        ModelConfig(device="gpu")
    with pytest.raises(TrainError, match=r"train.adam_betas=\[0.9, 1.0\]"):
        TrainConfig(adam_betas=[0.9, 1.0])
    with pytest.raises(AnalyzeError, match="analyze.detail_features=-2"):
        AnalyzeConfig(detail_features=-2)


def test_wrong_types_and_unknown_keys_name_the_key():
    node = OmegaConf.create({"train": {"lr": "abc"}, "sae": {"kk": 3}})
    with pytest.raises(
        ConfigError, match="train.lr: Value 'abc' of type 'str' could not be converted to Float"
    ):
        to_dataclass(TrainConfig, node.train)
    with pytest.raises(ConfigError, match="sae.kk: Key 'kk' not in 'SaeConfig'"):
        to_dataclass(SaeConfig, node.sae)


def test_check_settings_lets_none_through():
    class Cfg:
        tokens = None
        lr = 0.1

    check_settings(Cfg(), "x", positive=("tokens", "lr"))


def test_every_sae_config_node_names_its_architecture():
    """`sae=<name>` on the command line: conf/sae/<name>.yaml builds that architecture."""
    from pipeline.sae import architectures

    nodes = sorted((Path(__file__).parents[1] / "conf" / "sae").glob("*.yaml"))
    assert sorted(p.stem for p in nodes) == sorted(architectures())
    for node in nodes:
        assert to_dataclass(SaeConfig, OmegaConf.load(node)).architecture == node.stem


@pytest.mark.parametrize("stage", ["harvest", "train", "evaluate", "analyze", "steer", "relevance", "compare", "finetune"])
def test_every_stage_setting_is_in_its_config_node(stage):
    """conf/stage/<stage>.yaml lists every field of the stage's settings (finetune's model and corpus
    come from config groups), so that each can be overridden on the command line."""
    import dataclasses
    import importlib

    from pipeline.harvesting import HarvestConfig

    classes = {"harvest": HarvestConfig, "train": TrainConfig}
    module = importlib.import_module(f"pipeline.stages.{stage}")
    cls = classes.get(stage) or getattr(module, f"{stage.capitalize()}Config")
    keys = set(OmegaConf.load(Path(__file__).parents[1] / "conf" / "stage" / f"{stage}.yaml"))
    fields = {f.name for f in dataclasses.fields(cls)} - ({"model", "corpus"} if stage == "finetune" else set())
    assert fields == keys
