import json
import subprocess
import sys

import pytest
import torch

from pipeline.explainers import LocalLanguageModel
from pipeline.models import ModelConfig
from pipeline.stages.analyze import AnalyzeConfig, analyze_saes
from pipeline.stages.explain import ExplainConfig, ExplainError, explain_features
from pipeline.tracking import WandbConfig
from tests.conftest import copy_run
from tests.test_explainers import chat_model_dir

HOOK, SAE = "blocks.1.resid_post", "topk-k8-x4"


@pytest.fixture(scope="module")
def analyzed_run(trained_run, model_cfg, loaded, tmp_path_factory):
    run = copy_run(trained_run, tmp_path_factory.mktemp("explain") / "run")
    analyze_saes(model_cfg, AnalyzeConfig(progress=False, top_k=8, samples=8, detail_features=0, context_before=6),
                 run, WandbConfig(mode="disabled"), loaded=loaded)  # fmt: skip
    return run


@pytest.fixture(scope="module")
def explainer(model_cfg, tmp_path_factory) -> ModelConfig:
    path = chat_model_dir(model_cfg.path, tmp_path_factory.mktemp("explainer") / "model")
    return ModelConfig(name="tiny-chat", path=str(path), dtype="float32", device="cpu")


def _cfg(**kw) -> ExplainConfig:
    return ExplainConfig(**{"features": 4, "explain_examples": 4, "score_examples": 3, "negative_windows": 16,
                            "max_tokens": 6, "progress": False, **kw})  # fmt: skip


def test_features_are_explained_scored_against_the_references_and_shown(analyzed_run, explainer):
    path = explain_features(explainer, _cfg(), analyzed_run, WandbConfig(mode="offline"))
    assert path == analyzed_run / "features" / HOOK / SAE / "explanations.json"
    report = json.loads(path.read_text())
    assert len(report["features"]) == 4 and report["identity"]["explainer"].startswith(explainer.path)
    for entry in report["features"].values():
        assert entry["tokens"].startswith("the tokens ") and entry["random"] != entry["explainer"] or len(set(
            e["explainer"] for e in report["features"].values())) == 1  # fmt: skip
        for kind in ("explainer", "tokens", "random"):
            detection = entry["scores"][kind]["detection"]
            assert detection["items"] == 6 and 0 <= detection["accuracy"] <= 1  # 3 activating, 3 silent texts
    assert set(report["summary"]) >= {"explainer/detection_auroc", "tokens/fuzzing_accuracy", "random/fuzzing_auroc"}
    script = (path.parent / "data" / "explanations.js").read_text()
    assert script.startswith("SAE_DASHBOARD.explanations(") and str(next(iter(report["features"]))) in script
    tables = list((analyzed_run / "wandb").glob("offline-run-*/files/media/table/explanations*.table.json"))
    assert len(tables) == 1


def test_a_rerun_keeps_what_was_explained_with_the_same_explainer(analyzed_run, explainer, monkeypatch):
    explain_features(explainer, _cfg(), analyzed_run, WandbConfig(mode="disabled"))
    written = []
    monkeypatch.setattr(LocalLanguageModel, "write", lambda self, messages, max_tokens: written.append(1) or "x")
    explain_features(explainer, _cfg(), analyzed_run, WandbConfig(mode="disabled"))
    assert written == []
    explain_features(explainer, _cfg(features=6), analyzed_run, WandbConfig(mode="disabled"))
    assert len(written) == 2  # only the features not explained before
    explain_features(explainer, _cfg(features=6, max_tokens=7), analyzed_run, WandbConfig(mode="disabled"))
    assert len(written) == 2 + 6  # another setting: all again


def test_explain_bad_inputs(trained_run, analyzed_run, explainer, tmp_path):
    with pytest.raises(ExplainError, match="explain.features=0 must be positive"):
        _cfg(features=0)
    with pytest.raises(ExplainError, match="needs explain.endpoint_model"):
        _cfg(backend="endpoint")
    with pytest.raises(ExplainError, match="is not analyzed: run `python -m pipeline analyze"):
        explain_features(explainer, _cfg(), copy_run(trained_run, tmp_path / "bare"), WandbConfig(mode="disabled"))


def test_explain_on_the_command_line(analyzed_run, explainer, tmp_path):
    cmd = [sys.executable, "-m", "pipeline", "explain", f"run_dir={analyzed_run}", "explain.features=2",
           "explain.explain_examples=3", "explain.score_examples=2", "explain.max_tokens=4", "explain.force=true",
           f"explainer_model.path={explainer.path}", "explainer_model.package=null", "explainer_model.gguf_file=null",
           "wandb.mode=disabled"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((analyzed_run / "features" / HOOK / SAE / "explanations.json").read_text())["features"]) == 2


def test_a_feature_that_fires_in_every_window_still_gets_texts_where_it_does_not(analyzed_run):
    from pipeline.dashboard import load_features, load_vocab
    from pipeline.dictionaries import find_dictionaries
    from pipeline.rundir import RunDir
    from pipeline.stages.explain import _silent_texts

    run = RunDir.open(analyzed_run)
    d = find_dictionaries(run, [SAE], None, False, "explain")[0]
    directory = run.features(HOOK, SAE)
    _, records = load_features(directory)
    commonest = max(records, key=lambda r: r["frequency"])
    shards = run.shards(HOOK)
    with torch.no_grad():
        windows_fired = [bool((d.sae.encode(shards.sequence(w)[1].float())[:, commonest["id"]] > 0).any())
                         for w in range(16)]  # fmt: skip
    assert all(windows_fired)  # no window is free of it: only quiet stretches can serve
    texts = _silent_texts(run, d, [commonest["id"]], load_vocab(directory), _cfg(score_examples=4), length=6)
    assert len(texts[commonest["id"]]) == 4 and all(len(t.tokens) == 6 for t in texts[commonest["id"]])
