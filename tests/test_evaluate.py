import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import metrics as M
from pipeline.dictionaries import DictionaryError
from pipeline.evaluation import NonFiniteActivations, evaluate_hook
from pipeline.hooks import capture_activations, splice_activations, validate_hooks
from pipeline.rundir import RunDir
from pipeline.sae import Sae
from pipeline.sae.formats import write_saelens
from pipeline.shards import ShardError
from pipeline.splits import SplitError
from pipeline.stages.evaluate import EvaluateConfig, evaluate_saes
from pipeline.tracking import WandbConfig
from tests.conftest import copy_run, poison_activation

HOOK = "blocks.1.resid_post"
CTX = 32
OFF = WandbConfig(mode="disabled")
REPO = Path(__file__).resolve().parent.parent


def _cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(**{"progress": False, "batch_size": 3, **kw})


def _identity_sae(d: int) -> Sae:
    """A ReLU dictionary that reconstructs x (to float rounding): z = ReLU(x + 64) (all positive), x_hat = z - 64."""
    sae = Sae.from_config_dict({"architecture": "relu", "d_in": d, "d_sae": d, "expansion": 1})
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.fill_(-64.0)
    return sae


def _zero_sae(d: int) -> Sae:
    sae = _identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def _windows(run_dir: Path, first: int = 32, count: int = 8) -> torch.Tensor:
    from pipeline.shards import ShardSet

    shards = ShardSet(run_dir / "activations" / HOOK)
    return shards.tokens_at(torch.arange(first * CTX, (first + count) * CTX)).view(count, CTX)


@pytest.mark.parametrize("hook_name", [HOOK, "blocks.1.mlp_out"])
def test_identity_splice_recovers_everything_and_zeros_nothing(trained_run, loaded, hook_name):
    hook = validate_hooks(loaded.model, [hook_name])[0]
    windows = _windows(trained_run)
    d = loaded.d_model
    results = evaluate_hook(
        loaded,
        hook,
        {"identity": _identity_sae(d), "zeros": _zero_sae(d)},
        windows,
        torch.randn(d),
        bos=0,
        cfg=_cfg(),
    )
    ident, zeros = results["identity"]["metrics"], results["zeros"]["metrics"]
    assert abs(ident["model_performance_preservation"]["ce_loss_score"] - 1) < 1e-4
    assert ident["model_behavior_preservation"]["kl_div_with_sae"] < 1e-6
    assert ident["reconstruction_quality"]["fvu"] < 1e-8
    assert abs(zeros["model_performance_preservation"]["ce_loss_score"]) < 1e-5
    assert abs(zeros["model_behavior_preservation"]["kl_div_score"]) < 1e-5
    assert zeros["model_behavior_preservation"]["kl_div_with_sae"] > 0.01


@pytest.mark.parametrize("hook_name", ["blocks.0.resid_pre", "blocks.1.resid_mid", HOOK])
def test_ablations_and_splices_match_plain_forward_passes(trained_run, loaded, hook_name):
    """The shortcuts (replayed prefix, one ablated forward for all windows) give what full forward
    passes with the activation replaced give."""
    hook = validate_hooks(loaded.model, [hook_name])[0]
    model, windows = loaded.model, _windows(trained_run).long()
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    mean = torch.randn(loaded.d_model)
    result = evaluate_hook(loaded, hook, {"sae": sae}, windows, mean, bos=0, cfg=_cfg())
    keep = (windows != 0)[..., None]
    clean_lp = M.log_probs(model(windows).logits)
    expected = {"ce_clean": M.next_token_nll(clean_lp, windows)}
    for kind, value in (("zero", torch.zeros_like(mean)), ("mean", mean)):
        with splice_activations(model, hook, lambda a, v=value: torch.where(keep, v, a)):
            lp = M.log_probs(model(windows).logits)
        expected[f"ce_{kind}"] = M.next_token_nll(lp, windows)
        expected[f"kl_{kind}"] = M.kl_divergence(clean_lp[:, :-1], lp[:, :-1])
    with splice_activations(model, hook, lambda a: torch.where(keep, sae(a).x_hat, a)):
        lp = M.log_probs(model(windows).logits)
    expected["ce_with_sae"] = M.next_token_nll(lp, windows)
    expected["kl"] = M.kl_divergence(clean_lp[:, :-1], lp[:, :-1])
    for key, value in expected.items():
        torch.testing.assert_close(result["sae"]["per_token"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    assert not result["sae"]["per_token"]["counted"][:, 0].any() or windows[:, 1].ne(0).all()


def test_stage_writes_metrics_plots_and_skips_a_finished_evaluation(trained_run, model_cfg, loaded, capsys):
    reports = evaluate_saes(model_cfg, _cfg(tokens=CTX * 6), trained_run, OFF, loaded=loaded)
    out = trained_run / "eval" / HOOK / "topk-k8-x4"
    report = json.loads((out / "metrics.json").read_text())
    assert reports[f"{HOOK}/topk-k8-x4"]["config_hash"] == report["config_hash"]
    assert report["eval_tokens"] == CTX * 6 and report["model_id"] == loaded.model_id
    assert report["eval_windows"]["first"] == 32  # the 8 held-out windows start after 32 trained ones
    assert report["metrics"]["token_stats"]["total_tokens_eval_reconstruction"] == 6 * (CTX - 1)
    assert 0 < report["metrics"]["reconstruction_quality"]["fvu"] < 1
    assert report["metrics"]["sparsity"]["l0"] == pytest.approx(8)
    assert len(report["worst_tokens"]) == 20
    assert sum(report["density_histogram"]["counts"]) + report["density_histogram"]["silent"] == 4 * 32
    per_token = load_file(out / "per_token.safetensors")
    assert per_token["tokens"].shape == (6, CTX) and per_token["kl"].shape == (6, CTX - 1)
    for png in (out / "density.png", trained_run / "eval" / "pareto.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert "CE rec." in capsys.readouterr().out
    mtime = (out / "metrics.json").stat().st_mtime_ns
    evaluate_saes(model_cfg, _cfg(tokens=CTX * 6), trained_run, OFF, loaded=loaded)
    assert (out / "metrics.json").stat().st_mtime_ns == mtime  # same config: not evaluated again


def test_wandb_gets_a_row_per_dictionary(trained_run, model_cfg, loaded, tmp_path):
    """The evaluate run's `dictionaries` table: L0, FVU and CE recovered per dictionary, charted by W&B."""
    run = copy_run(trained_run, tmp_path / "run")
    evaluate_saes(model_cfg, _cfg(tokens=CTX * 4), run, WandbConfig(mode="offline"), loaded=loaded)
    table = json.loads(next(run.glob("wandb/offline-run-*/files/media/table/dictionaries*.table.json")).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["label"] for r in rows] == ["topk-k8-x4"] and rows[0]["l0"] == pytest.approx(8)
    assert 0 < rows[0]["ce_loss_score"] <= 1


def test_saelens_copy_evaluates_like_a_reference_from_its_format(trained_run, model_cfg, loaded, tmp_path):
    """A dictionary converted to SAELens' format, evaluated by the stage, matches a reference
    computation written from that format's definition (tolerance 1e-5 relative)."""
    native = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    saelens_dir = write_saelens(native, tmp_path / "saelens-topk")
    report = evaluate_saes(model_cfg, _cfg(saes=[str(saelens_dir)], holdout_tokens=CTX * 8), trained_run, OFF,
                           loaded=loaded)[f"{HOOK}/saelens-topk"]  # fmt: skip
    weights = load_file(saelens_dir / "sae_weights.safetensors")
    k = json.loads((saelens_dir / "cfg.json").read_text())["k"]

    def reference(x):  # SAELens TopK: ReLU of the top-k of (x - b_dec) W_enc + b_enc
        pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return z @ weights["W_dec"] + weights["b_dec"], z

    windows = _windows(trained_run).long()
    hook = validate_hooks(loaded.model, [HOOK])[0]
    keep = (windows != 0)[..., None]
    with splice_activations(loaded.model, hook, lambda a: torch.where(keep, reference(a)[0], a)):
        ce_sae = M.next_token_ce(loaded.model(windows).logits, windows)
    seen = {}
    with splice_activations(loaded.model, hook, lambda a: seen.setdefault("x", a)):
        ce_clean = M.next_token_ce(loaded.model(windows).logits, windows)
    x = seen["x"][windows != 0]
    x_hat, z = reference(x)
    perf = report["metrics"]["model_performance_preservation"]
    assert perf["ce_loss_with_sae"] == pytest.approx(float(ce_sae.mean()), rel=1e-5)
    assert perf["ce_loss_without_sae"] == pytest.approx(float(ce_clean.mean()), rel=1e-5)
    assert report["metrics"]["reconstruction_quality"]["fvu"] == pytest.approx(
        float(M.fvu(x, x_hat)), rel=1e-5
    )
    assert report["metrics"]["sparsity"]["l0"] == pytest.approx(float(M.l0(z)), rel=1e-6)


def test_bad_inputs_are_named(trained_run, model_cfg, loaded, tmp_path):
    base = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")

    def saved(name, **meta):
        sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
        sae.meta.update(meta)
        return str(sae.save(tmp_path / name))

    def evaluate(**kw):
        return evaluate_saes(model_cfg, _cfg(**kw), trained_run, OFF, loaded=loaded)

    with pytest.raises(DictionaryError, match="trained on 'gpt2'.*evaluate.force=true"):
        evaluate(saes=[saved("other-model", model_id="gpt2")])
    evaluate(saes=[saved("forced", model_id="gpt2")], force=True, tokens=CTX)
    with pytest.raises(
        DictionaryError, match="trained at blocks.1.resid_post, not at evaluate.hook=blocks.0"
    ):
        evaluate(saes=[str(trained_run / "sae" / HOOK / "topk-k8-x4")], hook="blocks.0.resid_post")
    with pytest.raises(DictionaryError, match="layer 7 is out of range"):
        evaluate(saes=[saved("deep", hook="blocks.7.resid_post")])
    wide = Sae.from_config_dict({**base.config_dict(), "d_in": 64, "d_sae": 128})
    with pytest.raises(DictionaryError, match="d_in=64.*d_model=32"):
        evaluate(saes=[str(wide.save(tmp_path / "wide"))], force=True)
    with pytest.raises(SplitError, match="more than the 256 held-out tokens"):
        evaluate(tokens=CTX * 9)
    with pytest.raises(DictionaryError, match="too few evaluation tokens"):
        EvaluateConfig(tokens=1)
    with pytest.raises(SplitError, match="all of them were used in training"):
        evaluate(saes=[saved("all-trained", training_split_tokens=CTX * 40)])
    with pytest.raises(DictionaryError, match="no harvested activations for blocks.2.resid_post"):
        evaluate(saes=[saved("unharvested", hook="blocks.2.resid_post")])
    with pytest.raises(DictionaryError, match="neither an SAE directory nor"):
        evaluate(saes=["no-such-sae"])


@pytest.mark.slow
def test_command_line(trained_run, trained_llama_dir):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", f"run_dir={trained_run}", "wandb.mode=disabled",
         "model=hub", f"model.path={trained_llama_dir}", "model.dtype=float32", "evaluate.tokens=64",
         "evaluate.progress=false"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "topk-k8-x4" in result.stdout


@pytest.mark.parametrize("hook_name", ["blocks.1.resid_pre", HOOK])
def test_stored_activations_give_the_same_evaluation(trained_run, loaded, hook_name):
    """Feeding the harvested activations instead of computing the layers before the hook changes nothing."""
    from pipeline.shards import ShardSet

    hook = validate_hooks(loaded.model, [hook_name])[0]
    windows = _windows(trained_run)
    shards = ShardSet(trained_run / "activations" / HOOK)
    layer_input = hook_name.endswith("resid_pre")
    acts = torch.stack([shards.sequence(32 + i)[1] for i in range(8)])
    if layer_input:  # resid_pre of layer 1 is resid_post of layer 0: compute it here
        from pipeline.hooks import capture_activations

        acts = capture_activations(loaded.model, windows.long(), [hook])[hook_name]
    sae = _identity_sae(loaded.d_model)
    args = (loaded, hook, {"sae": sae}, windows, torch.randn(loaded.d_model), 0, _cfg())
    computed = evaluate_hook(*args)["sae"]["per_token"]
    fed = evaluate_hook(*args, stored=lambda rows: acts[rows])["sae"]["per_token"]
    for key in ("ce_clean", "ce_zero", "ce_mean", "ce_with_sae", "kl"):
        torch.testing.assert_close(fed[key], computed[key], atol=1e-5, rtol=1e-5, msg=key)


def test_evaluate_config_composes():
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR, to_dataclass

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="evaluate", overrides=["evaluate.tokens=4096", "evaluate.saes=[topk-k32-x16]"]
        )
    parsed = to_dataclass(EvaluateConfig, cfg.evaluate)
    assert parsed.tokens == 4096 and parsed.saes == ["topk-k32-x16"] and cfg.model.gguf_file


def test_pareto_plot_collects_other_runs(trained_run, model_cfg, loaded, tmp_path):
    """evaluate.compare_with puts another run's dictionaries (e.g. of a sweep) on the same plot."""
    import shutil

    from pipeline.stages.evaluate import collect_reports

    evaluate_saes(model_cfg, _cfg(tokens=CTX * 2), trained_run, OFF, loaded=loaded)
    other = tmp_path / "other-run"
    shutil.copytree(trained_run / "eval", other / "eval")
    reports = collect_reports([RunDir(trained_run), RunDir(other)])
    assert len(reports) == 2 * len(collect_reports([RunDir(trained_run)]))
    evaluate_saes(model_cfg, _cfg(tokens=CTX * 2, compare_with=[str(other)]), trained_run, OFF, loaded=loaded)
    assert (trained_run / "eval" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="evaluate.compare_with: .*missing holds no evaluated dictionaries"):
        evaluate_saes(model_cfg, _cfg(compare_with=[str(tmp_path / "missing")]), trained_run, OFF, loaded=loaded)


def test_bad_activations_stop_the_evaluation_with_shard_and_position(
    trained_run, model_cfg, loaded, tmp_path
):
    run = copy_run(trained_run, tmp_path / "run")
    hook_dir = run / "activations" / HOOK
    poison_activation(hook_dir, window=36, position=5)  # a held-out window
    with pytest.raises(ShardError, match=r"NaN or Inf .*shard-00000.safetensors \(window 36, position 5\)"):
        evaluate_saes(model_cfg, _cfg(), run, OFF, loaded=loaded)
    assert not (run / "eval" / HOOK / "topk-k8-x4" / "metrics.json").exists()
    path = hook_dir / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # corrupt bytes, checksum not updated
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00000.safetensors is corrupt"):
        evaluate_saes(model_cfg, _cfg(), run, OFF, loaded=loaded)


def test_non_finite_activations_from_the_model_are_located(trained_run, loaded, monkeypatch):
    """Where the clean pass computes the activations itself, a NaN there is reported too."""
    hook = validate_hooks(loaded.model, [HOOK])[0]
    d = loaded.d_model
    overflow = splice_activations(
        loaded.model, hook, lambda a: a.index_fill(1, torch.tensor([7]), float("inf"))
    )
    where = r"blocks.1.resid_post, evaluation window 0, position 7"
    with overflow, pytest.raises(NonFiniteActivations, match=where):
        evaluate_hook(
            loaded, hook, {"identity": _identity_sae(d)}, _windows(trained_run), torch.zeros(d), 0, _cfg()
        )


def test_leftover_temporaries_are_cleared_and_the_marker_comes_last(trained_run, model_cfg, loaded, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    out = run / "eval" / HOOK / "topk-k8-x4"
    out.mkdir(parents=True)
    (out / ".metrics.json.abc.tmp").write_text("{")
    (out / "metrics.json").write_text('{"config_hash": "stale"}')
    evaluate_saes(model_cfg, _cfg(tokens=CTX * 2), run, OFF, loaded=loaded)
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "metrics.json").read_text())["config_hash"] != "stale"


@pytest.mark.gpu
def test_evaluate_on_cuda_gives_the_cpu_metrics(trained_run, model_cfg, loaded, tmp_path):
    from dataclasses import replace

    from pipeline.evaluation import summary_row

    cpu = evaluate_saes(model_cfg, _cfg(tokens=CTX * 4), copy_run(trained_run, tmp_path / "cpu"), OFF, loaded=loaded)
    cuda = evaluate_saes(replace(model_cfg, device="cuda"), _cfg(tokens=CTX * 4),
                         copy_run(trained_run, tmp_path / "cuda"), OFF)  # fmt: skip
    for key, report in cpu.items():
        expected, got = summary_row(report), summary_row(cuda[key])
        for metric in ("fvu", "l0", "ce_loss_with_sae", "ce_loss_score", "kl_div_with_sae"):
            assert got[metric] == pytest.approx(expected[metric], rel=1e-3, abs=1e-4), metric


def test_a_transcoder_is_spliced_in_for_the_mlp_output(transcoder_run, loaded):
    """Its prediction from mlp_in replaces mlp_out (BOS kept clean), ablations zero / mean mlp_out:
    the per-token losses are those of plain forward passes doing that."""
    reads, writes = validate_hooks(loaded.model, ["blocks.1.mlp_in", "blocks.1.mlp_out"])
    model, windows = loaded.model, _windows(transcoder_run).long()
    sae = Sae.load(transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-skip-k8-x4")
    mean = torch.randn(loaded.d_model)
    result = evaluate_hook(loaded, writes, {"tc": sae}, windows, mean, bos=0, cfg=_cfg(), reads=reads)
    keep = (windows != 0)[..., None]
    x = capture_activations(model, windows, [reads])[reads.name]
    clean_lp = M.log_probs(model(windows).logits)
    expected = {}
    for kind, value in (("zero", torch.zeros_like(mean)), ("mean", mean), ("with_sae", sae(x).x_hat)):
        with splice_activations(model, writes, lambda y, v=value: torch.where(keep, v, y)):
            lp = M.log_probs(model(windows).logits)
        expected[f"ce_{kind}"] = M.next_token_nll(lp, windows)
        expected["kl" if kind == "with_sae" else f"kl_{kind}"] = M.kl_divergence(clean_lp[:, :-1], lp[:, :-1])
    for key, value in expected.items():
        torch.testing.assert_close(result["tc"]["per_token"][key], value, atol=2e-5, rtol=1e-4, msg=key)


def test_the_stage_evaluates_transcoders_on_their_output(transcoder_run, model_cfg, loaded, capsys):
    """metrics.json names both hooks; the FVU is of mlp_out on the held-out windows, as training measured."""
    reports = evaluate_saes(model_cfg, _cfg(), transcoder_run, OFF, loaded=loaded)
    assert set(reports) == {"blocks.1.mlp_in/transcoder-k8-x4", "blocks.1.mlp_in/transcoder-skip-k8-x4"}
    for key, report in reports.items():
        assert (report["hook"], report["hook_out"]) == ("blocks.1.mlp_in", "blocks.1.mlp_out")
        trained = Sae.load(transcoder_run / "sae" / key).meta["metrics"]
        fvu = report["metrics"]["reconstruction_quality"]["fvu"]
        assert fvu == pytest.approx(trained["fvu"], rel=1e-4)
        assert report["metrics"]["model_performance_preservation"]["ce_loss_score"] > 0.5
    assert "blocks.1.mlp_in -> blocks.1.mlp_out" in capsys.readouterr().out
