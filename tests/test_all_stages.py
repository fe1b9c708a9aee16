import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR
from pipeline.shards import ShardSet
from pipeline.stages.all import run_all
from tests.conftest import TEXT


def _config(run_dir: Path, model_dir: Path, *extra: str):
    overrides = [
        f"run_dir={run_dir}", "wandb.mode=disabled",
        "model=hub", f"model.path={model_dir}", "model.dtype=float32", "model.device=cpu",
        "corpus=files", f"corpus.path={TEXT}",
        "harvest.hooks=[blocks.1.resid_post]", "harvest.tokens=1280", "harvest.context_length=32",
        "harvest.progress=false",
        "train.hook=blocks.1.resid_post", "train.holdout_tokens=256", "train.batch_size=128", "train.progress=false",
        "sae.expansion=4", "sae.k=8",
        "evaluate.progress=false", "analyze.top_k=5", "analyze.detail_features=2", "analyze.progress=false",
        *extra,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="pipeline", overrides=overrides)


def _mtimes(run_dir: Path) -> dict:
    names = ("manifest.json", "sae.safetensors", "metrics.json", "features.json")
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name in names}


def test_all_stages_run_in_order_and_rerun_skips_finished_work(tmp_path, trained_llama_dir, capsys):
    run_all(_config(tmp_path, trained_llama_dir))
    sae_dir = tmp_path / "sae" / "blocks.1.resid_post" / "batchtopk-k8-x4"
    assert (sae_dir / "sae.safetensors").exists()
    assert (tmp_path / "eval" / "blocks.1.resid_post" / "batchtopk-k8-x4" / "metrics.json").exists()
    index = tmp_path / "features" / "blocks.1.resid_post" / "batchtopk-k8-x4" / "index.html"
    assert index.exists() and str(index) in capsys.readouterr().out
    before = _mtimes(tmp_path)
    assert len(before) == 4
    run_all(_config(tmp_path, trained_llama_dir))
    assert _mtimes(tmp_path) == before  # nothing redone
    run_all(_config(tmp_path, trained_llama_dir, "analyze.top_k=4"))  # only the analysis changes
    after = _mtimes(tmp_path)
    changed = {p.name for p in after if after[p] != before[p]}
    assert changed == {"features.json"}


def test_all_stages_on_a_dictionary_trained_from_the_model(tmp_path, trained_llama_dir, caplog):
    """train.source=model: no harvest, only the held-out split is stored, evaluate and analyze run on it."""
    caplog.set_level("INFO")
    run_all(_config(tmp_path, trained_llama_dir, "train.source=model", "train.tokens=2560", "train.buffer_tokens=1024"))
    assert "harvest: skipped" in caplog.text
    assert ShardSet(tmp_path / "activations" / "blocks.1.resid_post").n_tokens == 256
    report = json.loads((tmp_path / "eval" / "blocks.1.resid_post" / "batchtopk-k8-x4" / "metrics.json").read_text())
    assert report["metrics"]["reconstruction_quality"]["explained_variance"] > 0
    assert (tmp_path / "features" / "blocks.1.resid_post" / "batchtopk-k8-x4" / "index.html").exists()


def test_the_trained_hook_must_be_harvested(tmp_path, trained_llama_dir):
    with pytest.raises(ValueError, match=r"\['blocks.0.resid_post'\] are not all among harvest.hooks"):
        run_all(_config(tmp_path, trained_llama_dir, "train.hook=blocks.0.resid_post"))
    with pytest.raises(ValueError, match=r"\['blocks.1.resid_post', 'blocks.1.mlp_out'\] are not all among harvest.hooks"):
        run_all(_config(tmp_path, trained_llama_dir, "sae=transcoder", "train.hook_out=blocks.1.mlp_out"))
    # ... unless training computes its activations: it stores the held-out split of its own hook
    run_all(_config(tmp_path, trained_llama_dir, "train.hook=blocks.0.resid_post", "train.source=model",
                    "train.tokens=1280", "train.buffer_tokens=1280", "analyze.detail_features=0"))  # fmt: skip
    assert (tmp_path / "eval" / "blocks.0.resid_post" / "batchtopk-k8-x4" / "metrics.json").exists()


@pytest.mark.parametrize("experiment", ["demo", "smollm2_full", "gpu_pythia160m"])
def test_experiment_presets_compose(experiment):
    from pipeline.config import to_dataclass
    from pipeline.corpus import CorpusConfig
    from pipeline.harvesting import HarvestConfig
    from pipeline.models import ModelConfig
    from pipeline.sae import SaeConfig
    from pipeline.stages.analyze import AnalyzeConfig
    from pipeline.stages.evaluate import EvaluateConfig
    from pipeline.stages.train import TrainConfig

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"experiment={experiment}"])
    for cls, node in ((ModelConfig, cfg.model), (CorpusConfig, cfg.corpus), (HarvestConfig, cfg.harvest),
                      (TrainConfig, cfg.train), (SaeConfig, cfg.sae), (EvaluateConfig, cfg.evaluate),
                      (AnalyzeConfig, cfg.analyze)):  # fmt: skip
        to_dataclass(cls, node)
    assert cfg.train.hook in cfg.harvest.hooks


@pytest.mark.parametrize("config_name", ["finetune", "track"])
def test_the_track_demo_preset_composes_for_its_stages(config_name):
    from pipeline.config import to_dataclass
    from pipeline.stages.finetune import FinetuneConfig
    from pipeline.stages.track import TrackConfig

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=["experiment=track_demo"])
    if config_name == "finetune":
        assert to_dataclass(FinetuneConfig, cfg.finetune).save_every == 10
    else:
        assert to_dataclass(TrackConfig, cfg.track).checkpoints == cfg.finetune.out == "outputs/demo-finetune-steps"


def test_all_stages_with_the_explain_step(tmp_path, trained_llama_dir):
    from tests.test_explainers import chat_model_dir

    explainer = chat_model_dir(trained_llama_dir, tmp_path / "explainer")
    run_all(_config(tmp_path / "run", trained_llama_dir, "explain_after_analyze=true", "explain.features=2",
                    "explain.explain_examples=3", "explain.score_examples=2", "explain.max_tokens=3",
                    "explain.progress=false", "model@explainer_model=hub", f"explainer_model.path={explainer}",
                    "explainer_model.dtype=float32", "explainer_model.device=cpu"))  # fmt: skip
    report = tmp_path / "run" / "features" / "blocks.1.resid_post" / "batchtopk-k8-x4" / "explanations.json"
    assert len(json.loads(report.read_text())["features"]) == 2
