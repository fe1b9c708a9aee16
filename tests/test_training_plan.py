"""The training plan: settings checked against the activations before any step, and what enters
the config hash (the training itself: test_train.py)."""

from dataclasses import replace

import pytest

from pipeline.rundir import RunDir
from pipeline.sae import SaeConfig
from pipeline.shards import ShardError
from pipeline.training import TrainConfig, TrainError
from pipeline.training_plan import plan_training
from tests.conftest import make_shard_set

HOOK, TC_IN, TC_OUT = "blocks.1.resid_post", "blocks.1.mlp_in", "blocks.1.mlp_out"
SAE = SaeConfig(architecture="topk", expansion=4, k=4)
TRANSCODER = SaeConfig(architecture="transcoder", expansion=4, k=4)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"hook": HOOK, "batch_size": 128, "holdout_tokens": 256, "progress": False, **kw})


def _hash_of(run: RunDir, sae_cfg: SaeConfig) -> str:
    return plan_training(_cfg(), sae_cfg, run).config_hash


@pytest.fixture
def run(tmp_path) -> RunDir:
    make_shard_set(tmp_path / "activations" / HOOK)
    return RunDir(tmp_path)


def test_the_auxk_default_enters_the_config_hash_as_its_value(run):
    """k_aux null is hashed as the 2 k it means, so dictionaries trained under the old default
    (null meaning d_in / 2) train again and an explicit 2 k is the same training."""
    assert _hash_of(run, SAE) == _hash_of(run, replace(SAE, k_aux=2 * SAE.k))
    assert _hash_of(run, SAE) != _hash_of(run, replace(SAE, k_aux=SAE.k))


def test_the_auxk_weight_enters_the_config_hash_as_its_value(run):
    """A null weight is hashed as the number its rule gives, so TopK dictionaries trained when 0.25
    was the default stay current, and BatchTopK ones trained at 0.25 train again under the rule."""
    assert _hash_of(run, SAE) == _hash_of(run, replace(SAE, aux_coefficient=0.25))
    batch = replace(SAE, architecture="batchtopk")
    assert _hash_of(run, batch) == _hash_of(run, replace(batch, aux_coefficient=0.5))
    assert _hash_of(run, batch) != _hash_of(run, replace(batch, aux_coefficient=0.25))


def test_the_balanced_selection_enters_the_config_hash_where_it_is_not_zero(run):
    """Dictionaries the rule leaves at 0 (the selection before the setting) keep their hash; where it
    balances, it is hashed as its value, so earlier BatchTopK dictionaries there train again."""
    assert _hash_of(run, SAE) == _hash_of(run, replace(SAE, balance=0.0))
    batch = replace(SAE, architecture="batchtopk")  # d_sae / k = 16: the rule gives 0
    assert _hash_of(run, batch) == _hash_of(run, replace(batch, balance=0.0))
    assert _hash_of(run, batch) != _hash_of(run, replace(batch, balance=0.25))
    rare = replace(batch, k=1, d_sae=400)  # d_sae / k = 400: the rule gives 0.25
    assert _hash_of(run, rare) == _hash_of(run, replace(rare, balance=0.25))
    assert _hash_of(run, rare) != _hash_of(run, replace(rare, balance=0.0))


def test_variants_at_other_hooks_need_the_model_as_source(run):
    with pytest.raises(TrainError, match="need train.source=model"):
        plan_training(_cfg(variants=[{"k": 4}, {"hook": "blocks.2.resid_post"}]), SAE, run)


def test_transcoder_settings_are_checked(transcoder_run, tmp_path):
    with pytest.raises(TrainError, match="set train.hook_out, e.g. train.hook=blocks.3.mlp_in"):
        plan_training(_cfg(hook=TC_IN), TRANSCODER, RunDir.open(transcoder_run))
    with pytest.raises(TrainError, match="train.hook_out=blocks.1.mlp_out is set, but no dictionary is a transcoder"):
        plan_training(_cfg(hook=TC_IN, hook_out=TC_OUT), SAE, RunDir.open(transcoder_run))
    make_shard_set(tmp_path / "activations" / TC_IN, n_seq=48)
    make_shard_set(tmp_path / "activations" / TC_OUT, n_seq=32)
    with pytest.raises(ShardError, match=r"do not hold the same token windows.*harvest.hooks=\[blocks.1.mlp_in,blocks.1.mlp_out\]"):
        plan_training(_cfg(hook=TC_IN, hook_out=TC_OUT), TRANSCODER, RunDir.open(tmp_path))
