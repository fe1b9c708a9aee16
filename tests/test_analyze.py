import html
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.attribution import encoder_terms, input_attribution, loss_contribution
from pipeline.dashboard import link_report, load_features, write_dashboard, write_explanations
from pipeline.dashboard.pages import highlighted_examples
from pipeline.dictionaries import DictionaryError
from pipeline.hooks import validate_hooks
from pipeline.locks import LockedError, exclusive
from pipeline.sae import Sae
from pipeline.shards import ShardError, ShardSet
from pipeline.stages.analyze import AnalyzeConfig, AnalyzeError, analyze_saes
from pipeline.tracking import WandbConfig
from tests.conftest import copy_run, poison_activation, staged_by_wandb

HOOK = "blocks.1.resid_post"
OFF = WandbConfig(mode="disabled")


def _cfg(**kw) -> AnalyzeConfig:
    base = dict(progress=False, top_k=5, samples=8, detail_features=4, context_before=6)
    return AnalyzeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def analyzed(trained_run, model_cfg, loaded, tmp_path_factory):
    """The trained dictionary analyzed, plus a copy whose feature 0 can never fire."""
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    with torch.no_grad():
        sae.W_enc[:, 0] = 0
        sae.b_enc[0] = -1e4
    silent = sae.save(
        tmp_path_factory.mktemp("sae") / "with-silent"
    )  # outside the run: other tests see one SAE
    out = analyze_saes(model_cfg, _cfg(saes=["topk-k8-x4", str(silent)]), trained_run, OFF, loaded=loaded)
    return {name.split("/")[-1]: path for name, path in out.items()}, silent


def test_features_match_a_brute_force_computation(trained_run, analyzed):
    meta, records = load_features(analyzed[0]["topk-k8-x4"])
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    shards = ShardSet(trained_run / "activations" / HOOK)
    tokens = shards.tokens_at(torch.arange(shards.n_tokens))
    with torch.no_grad():
        codes = sae.encode(shards.gather(torch.arange(shards.n_tokens)).float())
    codes[tokens == shards.manifest.bos_token_id] = 0
    assert meta["tokens"] == shards.n_tokens and len(records) == sae.d_sae
    for record in records[:40]:
        f = record["id"]
        column = codes[:, f]
        assert record["count"] == int((column > 0).sum())
        assert record["max_activation"] == pytest.approx(float(column.max()), abs=1e-3)
        assert [e["activation"] for e in record["top"]] == pytest.approx(_distinct_top(column, tokens, 5), abs=1e-3)
        for example in record["top"]:
            t = example["window"] * 32 + example["position"]
            assert example["ids"][example["position"] - example["start"]] == int(tokens[t])
            start = example["window"] * 32 + example["start"]
            expected = column[start : start + len(example["ids"])]
            assert example["acts"] == pytest.approx(expected.tolist(), abs=2e-2)
        shown = {(e["window"], e["position"]) for e in record["top"]}
        for group in record["quantile_groups"]:
            for example in group["examples"]:
                assert group["low"] <= example["activation"] <= group["high"]
                assert (example["window"], example["position"]) not in shown  # not the top ones again
        if record["quantile_groups"]:
            assert sum(g["share"] for g in record["quantile_groups"]) == pytest.approx(1, abs=1e-3)
    _check_correlations_and_neighbours(records, sae, shards, codes, tokens != shards.manifest.bos_token_id)
    norms = shards.gather(torch.arange(shards.n_tokens)).float().norm(dim=-1)
    ratio = norms / norms[tokens != shards.manifest.bos_token_id].median()
    for record in records:
        for example in record["top"]:
            t = example["window"] * 32 + example["position"]
            assert example["norm_ratio"] == pytest.approx(float(ratio[t]), abs=0.02)
            assert example["outlier"] == (example["norm_ratio"] > 2.0)
    assert meta["outlier_norm"] == 2.0 and 0 <= meta["features_peaking_at_outliers"] <= 1


def _distinct_top(column: torch.Tensor, tokens: torch.Tensor, n: int) -> list[float]:
    """The activations of the n highest firings with distinct contexts (6 tokens before, 4 after,
    within the window of 32) among the 2n highest firings, by brute force."""
    order = column.argsort(descending=True)[: 2 * n]
    seen, values = set(), []
    for t in order[column[order] > 0].tolist():
        window, position = divmod(t, 32)
        context = tuple(tokens[window * 32 + max(0, position - 6) : window * 32 + min(32, position + 5)].tolist())
        if context not in seen:
            seen.add(context)
            values.append(float(column[t]))
    return values[:n]


def _check_correlations_and_neighbours(records, sae, shards, codes, counted):
    """Correlated dimensions are Pearson's r over the non-BOS tokens; neighbours the nearest decoder rows."""
    x = shards.gather(torch.arange(shards.n_tokens)).double()[counted]
    unit = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=-1)
    for record in [r for r in records if r["count"] > 2][:10]:
        f = record["id"]
        r = np.corrcoef(codes[counted, f].double().numpy(), x.T.numpy())[0, 1:]
        dims, values = zip(*record["correlated_dimensions"], strict=True)
        assert values == pytest.approx(r[list(dims)].tolist(), abs=2e-3)
        assert abs(values[0]) == pytest.approx(np.abs(r).max(), abs=2e-3)
        cosines = unit[f] @ unit.T
        cosines[f] = -2
        ids, values = zip(*record["neighbours"], strict=True)
        assert values == pytest.approx(cosines.topk(len(ids)).values.tolist(), abs=1e-3)
        for _other, lift, together, given in record["coactivation"]:
            assert together >= 3 and lift > 0 and 0 < given <= 1


def test_detail_features_get_attributions(analyzed):
    _, records = load_features(analyzed[0]["topk-k8-x4"])
    detailed = [r for r in records if r["components"] is not None]
    assert len(detailed) == 4
    for record in detailed:
        parts = record["components"]
        total = sum(v for _, v in parts["components"]) + parts["constant"]
        assert total == pytest.approx(parts["pre_activation"], abs=1e-3)
        assert parts["pre_activation"] == pytest.approx(record["top"][0]["activation"], abs=1e-3)
        for example in _shown(record):
            assert len(example["loss"]) == len(example["ids"]) == len(example["attribution"])
            # written with the digits kept, not as float32's nearest double (2.7049999237060547)
            assert all(len(repr(v).partition(".")[2]) <= 3 for v in example["acts"])
            assert all(len(repr(v).partition(".")[2]) <= 4 for v in example["loss"] + example["attribution"])
        assert record["logits"]["positive"][0][1] >= record["logits"]["negative"][0][1]
        steering = record["steering"]  # the steering panel: the feature added at 1x and 4x its max
        assert steering["unit"] == pytest.approx(record["max_activation"], abs=1e-3)
        assert [s["scale"] for s in steering["scales"]] == [1.0, 4.0] and len(steering["plain"]) == 3
        assert all(len(s["texts"]) == 3 for s in steering["scales"])
    assert all(r["steering"] is None for r in records if r["components"] is None)
    meta, _ = load_features(analyzed[0]["topk-k8-x4"])
    assert meta["steered_features"] == 4 and set(meta["steering_promoted_rise"]) == {"1.0", "4.0"}


def _shown(record: dict) -> list[dict]:
    return record["top"] + [e for group in record["quantile_groups"] for e in group["examples"]]


def test_each_example_gets_the_attributions_of_its_own_window(trained_run, analyzed, loaded):
    """Examples are computed several at a time on windows cut at the longest context: each must get what
    its own window alone gives (the model is causal), for top examples and quantile samples alike."""
    _, records = load_features(analyzed[0]["topk-k8-x4"])
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4").to(loaded.device)
    shards = ShardSet(trained_run / "activations" / HOOK)
    tokens = shards.tokens_at(torch.arange(shards.n_tokens)).view(-1, 32)
    hook = validate_hooks(loaded.model, [HOOK])[0]
    checked = 0
    for record in [r for r in records if r["components"] is not None]:
        w, b = encoder_terms(sae, record["id"])
        for e in _shown(record)[::3]:
            end = e["start"] + len(e["ids"])
            ids = tokens[e["window"], :end][None]
            _, delta = loss_contribution(loaded.model, hook, sae, record["id"], ids)  # [1, end - 1]: tokens 1..end-1
            loss = torch.cat([torch.zeros(1), delta[0].cpu()])[e["start"] :]
            assert e["loss"] == pytest.approx(loss.tolist(), abs=2e-3)
            attribution, _ = input_attribution(loaded.model, hook, ids[:, : e["position"] + 1],
                                               torch.tensor([e["position"]]), w, b)  # fmt: skip
            alone = torch.cat([attribution[0, e["start"] :].cpu(), torch.zeros(end - e["position"] - 1)])
            assert e["attribution"] == pytest.approx(alone.tolist(), abs=2e-3)
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("no_steering", [{"steer_scales": []}, {"steer_prompts": []}])
def test_synthesized_inputs_and_no_steering_panel(trained_run, model_cfg, loaded, tmp_path, no_steering):
    """analyze.synthesize: each detailed feature gets an input searched from its top example and one
    from random tokens; steer_scales=[] or steer_prompts=[] leaves the steering panel out."""
    run = copy_run(trained_run, tmp_path / "run")
    cfg = _cfg(detail_features=2, synthesize=True, synth_steps=3, synth_length=5, saes=["topk-k8-x4"], **no_steering)
    out = analyze_saes(model_cfg, cfg, run, OFF, loaded=loaded)[f"{HOOK}/topk-k8-x4"]
    meta, records = load_features(out)
    detailed = [r for r in records if r["components"] is not None]
    assert len(detailed) == 2 and all(r["steering"] is None for r in records)
    for record in detailed:
        assert [s["start"] for s in record["synthesized"]] == ["top example", "random"]
        assert all(len(s["ids"]) <= 5 and s["activation"] >= 0 and s["steps"] <= 3 for s in record["synthesized"])
    assert set(meta["synthesized_over_corpus_max"]) == {"top example", "random"} and meta["steered_features"] == 0


def test_index_rows_say_what_a_feature_fires_on(analyzed):
    """features.json: the tokens at the top examples' maxima, and the top example split at its maximum."""
    out = analyzed[0]["topk-k8-x4"]
    _, records = load_features(out)
    rows = json.loads((out / "features.json").read_text())["features"]
    vocab = json.loads((out / "data" / "vocab.js").read_text().split("(", 1)[1].rsplit(")", 1)[0])
    for record, row in zip(records, rows, strict=True):
        if not record["top"]:
            assert row["fires_on"] == [] and row["example"] == ["", "", ""]
            continue
        at = [vocab[e["ids"][e["position"] - e["start"]]] for e in record["top"]]
        assert row["fires_on"][0] == max(at, key=at.count) and set(row["fires_on"]) <= set(at)
        assert row["example"][1] == at[0]
    assert any(row["detail"] for row in rows)


def test_outlier_positions_can_be_left_out(trained_run, model_cfg, loaded, tmp_path):
    """analyze.exclude_outliers with a limit at the median norm: no example sits above it."""
    run = copy_run(trained_run, tmp_path / "run")
    out = analyze_saes(model_cfg, _cfg(detail_features=0, exclude_outliers=True, outlier_norm=1.0, saes=["topk-k8-x4"]),
                       run, OFF, loaded=loaded)["blocks.1.resid_post/topk-k8-x4"]  # fmt: skip
    meta, records = load_features(out)
    ratios = [e["norm_ratio"] for r in records for e in r["top"]]
    assert ratios and max(ratios) <= 1.005 and meta["outlier_positions"] > 0.3  # about half the positions are above


def test_a_feature_that_never_fires_is_shown_as_silent(analyzed):
    meta, records = load_features(analyzed[0]["with-silent"])
    assert records[0]["silent"] and records[0]["top"] == [] and records[0]["count"] == 0
    assert meta["silent_features"] >= 1
    index = json.loads((analyzed[0]["with-silent"] / "features.json").read_text())
    assert index["features"][0]["silent"]


def test_bad_inputs(trained_run, model_cfg, loaded, tmp_path):
    with pytest.raises(AnalyzeError, match="too few for analyze.top_k=50"):
        analyze_saes(
            model_cfg, _cfg(tokens=32, top_k=50, saes=["topk-k8-x4"]), trained_run, OFF, loaded=loaded
        )
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    sae.meta["model_id"] = "gpt2"
    other = str(sae.save(tmp_path / "other"))
    with pytest.raises(DictionaryError, match="trained on 'gpt2'.*analyze.force=true"):
        analyze_saes(model_cfg, _cfg(saes=[other]), trained_run, OFF, loaded=loaded)
    with pytest.raises(DictionaryError, match="not at analyze.hook=blocks.0.resid_post"):
        analyze_saes(
            model_cfg, _cfg(saes=["topk-k8-x4"], hook="blocks.0.resid_post"), trained_run, OFF, loaded=loaded
        )
    with pytest.raises(AnalyzeError, match="analyze.top_k=0 must be positive"):
        AnalyzeConfig(top_k=0)


MARKUP = '<img src=x onerror="window.__pwned=1">'


def _hostile_dashboard(directory: Path) -> Path:
    """A one-feature dashboard whose tokens contain markup."""
    vocab = ["<bos>", MARKUP, "<script>window.__pwned=2</script>", " plain", "\u00e9\u4e2d\n"]
    example = {"window": 0, "position": 2, "start": 0, "activation": 2.0, "ids": [0, 1, 2, 3, 4],
               "acts": [0.0, 1.0, 2.0, 0.5, 0.0], "loss": [0, 0.1, -0.2, 0, 0], "attribution": [0, 1, -1, 0, 0],
               "norm_ratio": 3.2, "outlier": True}  # fmt: skip
    record = {
        "id": 0, "silent": False, "frequency": 0.5, "count": 2, "mean_activation": 1.5, "max_activation": 2.0,
        "histogram": [1, 1], "top": [example], "quantile_groups": [{"low": 1, "high": 2, "examples": [example]}],
        "logits": {"positive": [[1, 2.0]], "negative": [[2, -1.0]], "histogram": [1, 2], "low": -1, "high": 2},
        "dimensions": [[3, 0.5]], "correlated_dimensions": [[3, 0.9]], "coactivation": [],
        "neighbours": [[1, 0.2]], "components": None,
    }  # fmt: skip
    meta = {"sae": "s", "hook": HOOK, "model_id": "m", "corpus_id": "c", "d_sae": 1, "tokens": 4, "silent_features": 0,
            "chunk_size": 256, "histogram_edges": [0.5, 1, 2], "architecture": "topk", "context_length": 5}  # fmt: skip
    return write_dashboard(directory, meta, [[record]], vocab)


def test_wandb_html_escapes_tokens_and_flags_outliers():
    vocab = ["a", MARKUP]
    record = {"max_activation": 1.0, "top": [{"ids": [0, 1], "acts": [0.5, 1.0], "outlier": True, "norm_ratio": 3.2}]}
    out = highlighted_examples(record, vocab)
    assert MARKUP not in out and html.escape(MARKUP) in out
    assert "⚠ outlier position (activation norm 3.2x the median)" in out


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("SAE_PIPELINE_SKIP_BROWSER") == "1":
        pytest.skip("SAE_PIPELINE_SKIP_BROWSER=1 and no chromium")
    assert found, "chromium is missing: `make install` installs it (apt-get install -y chromium)"
    return found


def _browse(page: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
            "--window-size=1200,1600"]  # fmt: skip
    if screenshot is not None:
        subprocess.run(
            [*args, f"--screenshot={screenshot}", page], capture_output=True, timeout=120, check=True
        )
    result = subprocess.run(
        [*args, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


@pytest.mark.browser
def test_dashboard_in_headless_chromium(analyzed, tmp_path):
    out = analyzed[0]["topk-k8-x4"]
    index_dom = _browse(f"file://{out / 'index.html'}", tmp_path)
    assert "feature.html#" in index_dom and "features</span>" in index_dom
    assert 'class="tok max"' in index_dom and "◆" in index_dom  # the firing token, the attribution flag
    detailed = next(
        r["id"] for r in json.loads((out / "features.json").read_text())["features"] if r["detail"]
    )
    shot = tmp_path / "feature.png"
    dom = _browse(f"file://{out / 'feature.html'}#{detailed}", tmp_path, shot)
    assert f"Feature {detailed}" in dom
    assert dom.count('class="tok max"') >= 3  # highlighted top examples rendered
    assert "Component attribution" in dom and "Top promoted tokens" in dom and "Steering: the feature added" in dom
    assert "Co-activating features (by lift" in dom and "Nearest features by decoder direction" in dom
    assert "correlated with the activation" in dom
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    assert "max " in dom and "log scale" in dom  # the density axis ends at the true maximum
    assert 'data-mode="loss"' in dom and 'data-mode="attribution"' in dom and "Orange: the feature" in dom
    for asked in ("99999", "abc"):
        assert f"No feature \"{asked}\"" in _browse(f"file://{out / 'feature.html'}#{asked}", tmp_path)


@pytest.mark.browser
def test_token_markup_is_shown_not_injected(tmp_path):
    page = _hostile_dashboard(tmp_path / "dash").with_name("feature.html")
    dom = _browse(f"file://{page}#0", tmp_path)
    assert "<img" not in dom and "<script>window" not in dom
    assert html.escape(MARKUP, quote=False) in dom  # the token is there, as text
    assert "⚠ outlier" in dom and "peaks at an outlier position" in dom
    index_dom = _browse(f"file://{page.with_name('index.html')}", tmp_path)
    assert "<img" not in index_dom


def test_rerun_with_the_same_configuration_is_skipped(trained_run, model_cfg, loaded, analyzed):
    index = analyzed[0]["topk-k8-x4"] / "features.json"
    before = index.stat().st_mtime_ns
    analyze_saes(model_cfg, _cfg(saes=["topk-k8-x4"]), trained_run, OFF, loaded=loaded)
    assert index.stat().st_mtime_ns == before


def test_wandb_gets_the_feature_table(trained_run, model_cfg, loaded, tmp_path):
    """The table and every HTML file its cells point to sit in <run_dir>/wandb/: a copied run directory
    holds the whole table."""
    run = tmp_path / "run"
    shutil.copytree(trained_run / "activations", run / "activations")
    shutil.copytree(trained_run / "sae", run / "sae")
    analyze_saes(
        model_cfg, _cfg(detail_features=0, wandb_features=5), run, WandbConfig(mode="offline"), loaded=loaded
    )
    # the files the offline run's log points `wandb sync` to: the table's artifact, one HTML per row
    staged = staged_by_wandb(run)
    assert staged and all((run / "wandb") in p.resolve().parents and p.is_file() for p in staged)  # through the link
    html = [p for p in staged if p.read_text().lstrip().startswith("<")]
    (table_file,) = staged - set(html)
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["id", "frequency", "max_activation"] and len(table["data"]) == 5
    assert len(html) == 5 and all("<span style=\"background:rgba" in p.read_text() for p in html)


def test_a_dictionary_at_an_mlp_output(trained_run, model_cfg, loaded, tmp_path):
    """Off the residual stream: loss contributions and input attributions, no component split."""
    import shutil

    from pipeline.sae import SaeConfig
    from pipeline.stages.train import TrainConfig, train_saes

    run = tmp_path / "run"
    shutil.copytree(trained_run / "activations", run / "activations")
    train = TrainConfig(hook="blocks.1.mlp_out", batch_size=128, holdout_tokens=256, epochs=2, progress=False,
                        checkpoint_every=0, lr=3e-3)  # fmt: skip
    train_saes(train, SaeConfig(architecture="topk", expansion=4, k=8), run, OFF)
    out = analyze_saes(model_cfg, _cfg(detail_features=2), run, OFF, loaded=loaded)
    _, records = load_features(out["blocks.1.mlp_out/topk-k8-x4"])
    detailed = [r for r in records if r["top"] and "loss" in r["top"][0]]
    assert len(detailed) == 2
    assert all(r["components"] is None for r in records)


def test_bad_activations_stop_the_analysis_with_shard_and_position(trained_run, model_cfg, loaded, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    poison_activation(run / "activations" / HOOK, window=3, position=9)
    with pytest.raises(ShardError, match=r"NaN or Inf .*shard-00000.safetensors \(window 3, position 9\)"):
        analyze_saes(model_cfg, _cfg(saes=["topk-k8-x4"]), run, OFF, loaded=loaded)
    assert not (run / "features" / HOOK / "topk-k8-x4" / "features.json").exists()


def test_a_dashboard_interrupted_while_written_is_not_taken_as_done(trained_run, model_cfg, loaded, tmp_path):
    """features.json, the done marker, is removed before and written after everything else: an
    interrupted rewrite leaves no marker, and the next run analyzes again (and clears temporaries)."""
    run = copy_run(trained_run, tmp_path / "run")
    out = analyze_saes(model_cfg, _cfg(saes=["topk-k8-x4"]), run, OFF, loaded=loaded)[f"{HOOK}/topk-k8-x4"]

    def interrupted():
        yield []
        raise KeyboardInterrupt  # a kill while the data and pages are being written

    with pytest.raises(KeyboardInterrupt):
        write_dashboard(out, {"config_hash": "new"}, interrupted(), ["a"])
    assert not (out / "features.json").exists()
    (out / "data" / ".chunk-001.js.abc.tmp").write_text("half")
    analyze_saes(model_cfg, _cfg(saes=["topk-k8-x4"]), run, OFF, loaded=loaded)
    assert (out / "features.json").exists() and not list(out.rglob(".*.tmp"))


def test_a_dashboard_being_written_is_locked(trained_run, model_cfg, loaded, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    held = exclusive(run / "features" / HOOK / "topk-k8-x4", "test")
    with held, pytest.raises(LockedError, match="the dashboard .*topk-k8-x4 is being written by process"):
        analyze_saes(model_cfg, _cfg(saes=["topk-k8-x4"]), run, OFF, loaded=loaded)


@pytest.mark.browser
def test_later_stages_pages_are_listed_on_the_dashboard_index(analyzed, tmp_path):
    out = tmp_path / "dashboard"
    shutil.copytree(analyzed[0]["topk-k8-x4"], out)
    report = tmp_path / "relevance" / "task" / "relevance.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html></html>")
    link_report(out, "relevance/task", "what task relies on", report)
    link_report(out, "relevance/task", "what task relies on (again)", report)  # replaces, not adds
    dom = _browse(f"file://{out / 'index.html'}", tmp_path)
    assert dom.count("what task relies on") == 1 and "(again)" in dom
    assert 'href="../relevance/task/relevance.html"' in dom
    assert link_report(tmp_path / "not-analyzed", "k", "t", report) is None


@pytest.mark.browser
def test_explanations_show_on_the_index_and_the_feature_page_as_text(analyzed, tmp_path):
    out = tmp_path / "dashboard"
    shutil.copytree(analyzed[0]["topk-k8-x4"], out)
    write_explanations(out, {3: {"explanation": f"closing brackets {MARKUP}", "detection": 0.75, "fuzzing": 0.5}})
    index_dom = _browse(f"file://{out / 'index.html'}", tmp_path)
    assert "closing brackets" in index_dom and "(0.75)" in index_dom and "<img" not in index_dom
    dom = _browse(f"file://{out / 'feature.html'}#3", tmp_path)
    assert "Explanation: " in dom and "closing brackets" in dom and "fuzzing 0.50" in dom and "<img" not in dom


def test_a_transcoders_latents_are_analyzed_and_act_at_its_output(transcoder_run, model_cfg, loaded):
    """Examples come from its input (mlp_in); a feature's loss contribution is its removal from mlp_out
    (attribution.py checks that against a plain forward) and steering adds it there."""
    out = analyze_saes(model_cfg, _cfg(saes=["transcoder-skip-k8-x4"], detail_features=2), transcoder_run, OFF,
                       loaded=loaded)["blocks.1.mlp_in/transcoder-skip-k8-x4"]  # fmt: skip
    meta, records = load_features(out)
    assert (meta["hook"], meta["hook_out"]) == ("blocks.1.mlp_in", "blocks.1.mlp_out")
    sae = Sae.load(transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-skip-k8-x4")
    shards = ShardSet(transcoder_run / "activations" / "blocks.1.mlp_in")
    ctx = shards.manifest.context_length
    detailed = [r for r in records if r["steering"] is not None]
    assert len(detailed) == 2
    for record in detailed:
        top = record["top"][0]
        x = shards.gather(torch.tensor([top["window"] * ctx + top["position"]])).float()
        assert top["activation"] == pytest.approx(sae.encode(x)[0, record["id"]].item(), abs=1e-3)
        assert all(len(e["loss"]) == len(e["ids"]) for e in _shown(record))
