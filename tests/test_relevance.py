import json
import subprocess
import sys

import pytest
import torch

from pipeline.hooks import validate_hooks
from pipeline.relevance import ablation_effects, attribution_patching
from pipeline.sae import Sae
from pipeline.shards import ShardSet
from pipeline.tracking import WandbConfig
from tests.conftest import copy_run

HOOK = "blocks.1.resid_post"


def _task(trained_run, loaded):
    shards = ShardSet(trained_run / "activations" / HOOK)
    windows = shards.tokens_at(torch.arange(8 * 32)).view(8, 32)
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    return windows, sae, validate_hooks(loaded.model, [HOOK])[0], shards.manifest.bos_token_id


def test_the_estimate_is_the_first_order_change_of_a_small_removal(trained_run, loaded):
    """Scaled down (removing a hundredth of the feature), the true change of the task loss is linear in
    the removal, and the attribution-patching estimate must match it (at a tenth the tiny model is
    already 10-80 % off linear)."""
    windows, sae, hook, bos = _task(trained_run, loaded)
    estimate = attribution_patching(loaded.model, hook, sae, windows, bos)
    assert estimate.tokens == int((windows != bos).sum()) and estimate.loss > 0
    features = torch.argsort(estimate.count, descending=True)[:4].tolist()
    with torch.no_grad():
        sae.W_dec.mul_(0.01)  # x - z (0.01 d): a hundredth of each removal
    true = ablation_effects(loaded.model, hook, sae, windows, bos, features)
    with torch.no_grad():
        sae.W_dec.mul_(100)
    torch.testing.assert_close(true, 0.01 * estimate.effect[features], rtol=0.15, atol=2e-4)


def test_features_that_never_fire_have_no_effect(trained_run, loaded):
    windows, sae, hook, bos = _task(trained_run, loaded)
    estimate = attribution_patching(loaded.model, hook, sae, windows, bos)
    silent = estimate.count == 0
    assert (estimate.effect[silent] == 0).all() and (estimate.count <= estimate.tokens).all()


def _cfg(**kw):
    from pipeline.stages.relevance import RelevanceConfig

    return RelevanceConfig(**{"sae": "topk-k8-x4", "tokens": 32 * 8, "context_length": 32, "top": 5,
                              "check_features": 4, "check_tokens": 32 * 4, **kw})  # fmt: skip


def test_the_stage_ranks_features_and_links_them_to_the_dashboard(trained_run, model_cfg, loaded, text_corpus, tmp_path):
    from pipeline.stages.relevance import rank_features

    run = copy_run(trained_run, tmp_path / "run")
    features = run / "features" / HOOK / "topk-k8-x4"
    features.mkdir(parents=True)
    (features / "features.json").write_text(json.dumps({"meta": {}, "features": [{"id": i, "fires_on": ["tok<"]} for i in range(32)]}))
    out = rank_features(model_cfg, text_corpus, _cfg(), run, WandbConfig(mode="disabled"), loaded=loaded)
    assert out == run / "relevance" / HOOK / "topk-k8-x4" / text_corpus.name
    report = json.loads((out / "relevance.json").read_text())
    effects = [f["effect"] for f in report["needed"]]
    assert effects == sorted(effects, reverse=True) and all(e > 0 for e in effects) and len(effects) <= 5
    assert all(f["effect"] < 0 for f in report["in_the_way"])
    check = report["check"]
    assert len(check["features"]) == len(check["ablation"]) == 4 and -1 <= check["pearson"] <= 1
    page = (out / "relevance.html").read_text()
    first = report["needed"][0]["id"]
    assert f"href='../../../../features/{HOOK}/topk-k8-x4/feature.html#{first}'" in page
    assert "tok&lt;" in page or first >= 32  # fires_on from the dashboard, escaped


def test_relevance_bad_inputs(trained_run, model_cfg, loaded, text_corpus, tmp_path):
    from pipeline.corpus import CorpusError
    from pipeline.stages.relevance import RelevanceError, rank_features

    with pytest.raises(RelevanceError, match="relevance.top=0 must be positive"):
        _cfg(top=0)
    with pytest.raises(CorpusError, match="fewer than one window of 100000"):
        rank_features(model_cfg, text_corpus, _cfg(context_length=100_000, tokens=100_000), trained_run,
                      WandbConfig(mode="disabled"), loaded=loaded)  # fmt: skip
    run = copy_run(trained_run, tmp_path / "run")
    Sae.load(run / "sae" / HOOK / "topk-k8-x4").save(run / "sae" / HOOK / "second")
    with pytest.raises(RelevanceError, match="names 2 dictionaries"):
        rank_features(model_cfg, text_corpus, _cfg(sae=None), run, WandbConfig(mode="disabled"), loaded=loaded)


def test_relevance_on_the_command_line(trained_run, model_cfg, text_corpus, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "pipeline", "relevance", f"run_dir={run}", "relevance.sae=topk-k8-x4",
           "relevance.tokens=256", "relevance.context_length=32", "relevance.check_tokens=64", "relevance.check_features=2",
           f"model.path={model_cfg.path}", "model.package=null", "model.gguf_file=null", "model.dtype=float32",
           "corpus=files", f"corpus.path={text_corpus.path}", "wandb.mode=disabled"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "relevance" / HOOK / "topk-k8-x4" / "files" / "relevance.html").exists()


def test_a_transcoders_estimate_is_the_first_order_change_of_removing_it_from_its_output(transcoder_run, loaded):
    """Coded from mlp_in, removed from mlp_out (where the gradient is taken): the same linearity check."""
    shards = ShardSet(transcoder_run / "activations" / "blocks.1.mlp_in")
    windows, bos = shards.tokens_at(torch.arange(8 * 32)).view(8, 32), shards.manifest.bos_token_id
    sae = Sae.load(transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-skip-k8-x4")
    reads, writes = validate_hooks(loaded.model, ["blocks.1.mlp_in", "blocks.1.mlp_out"])
    estimate = attribution_patching(loaded.model, reads, sae, windows, bos, writes=writes)
    features = torch.argsort(estimate.count, descending=True)[:4].tolist()
    with torch.no_grad():
        sae.W_dec.mul_(0.01)
    true = ablation_effects(loaded.model, reads, sae, windows, bos, features, writes=writes)
    torch.testing.assert_close(true, 0.01 * estimate.effect[features], rtol=0.15, atol=2e-4)
    assert true.abs().max() > 1e-3  # the removals change the loss: the check is not of zeros


def test_the_stage_ranks_a_transcoders_features(transcoder_run, model_cfg, loaded, text_corpus, tmp_path):
    from pipeline.stages.relevance import rank_features

    run = copy_run(transcoder_run, tmp_path / "run")
    out = rank_features(model_cfg, text_corpus, _cfg(sae="transcoder-k8-x4"), run, WandbConfig(mode="disabled"),
                        loaded=loaded)  # fmt: skip
    report = json.loads((out / "relevance.json").read_text())
    assert out == run / "relevance" / "blocks.1.mlp_in" / "transcoder-k8-x4" / text_corpus.name
    assert report["needed"] and len(report["check"]["ablation"]) == 4
