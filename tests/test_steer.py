import json
import subprocess
import sys

import pytest
import torch

from pipeline.sae import Sae
from pipeline.shards import ShardSet
from pipeline.stages.steer import SteerConfig, steer
from pipeline.steering import SteeringError
from tests.conftest import copy_run

HOOK = "blocks.1.resid_post"


def _cfg(**kw) -> SteerConfig:
    return SteerConfig(**{"feature": 3, "sae": "topk-k8-x4", "prompts": ["the cat", "a dog"], "max_new_tokens": 4,
                          "scales": [1.0, 6.0], **kw})  # fmt: skip


def test_steering_a_feature_writes_its_report_and_prints_it(trained_run, model_cfg, loaded, capsys):
    out = steer(model_cfg, _cfg(), trained_run, loaded=loaded)
    assert out == trained_run / "steer" / HOOK / "topk-k8-x4" / "feature-3.json"
    report = json.loads(out.read_text())
    shards = ShardSet(trained_run / "activations" / HOOK)
    idx = torch.arange(shards.n_tokens)
    with torch.no_grad():
        codes = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4").encode(shards.gather(idx).float())[:, 3]
    largest = float(codes[shards.tokens_at(idx) != shards.manifest.bos_token_id].max())
    assert report["feature"] == 3 and report["mode"] == "add" and report["unit"] == pytest.approx(largest, rel=1e-4)
    assert [s["scale"] for s in report["scales"]] == [1.0, 6.0]
    assert all(len(s["texts"]) == 2 for s in report["scales"]) and len(report["plain"]) == 2
    printed = capsys.readouterr().out
    assert "'the cat'" in printed and "plain" in printed and "tokens it promotes" in printed
    absolute = json.loads(steer(model_cfg, _cfg(relative=False, mode="clamp"), trained_run, loaded=loaded).read_text())
    assert absolute["unit"] == 1 and absolute["mode"] == "clamp"


def test_steer_bad_inputs_say_what_to_change(trained_run, model_cfg, loaded, tmp_path):
    with pytest.raises(SteeringError, match="steer.feature is not set"):
        SteerConfig()
    with pytest.raises(SteeringError, match="steer.mode='double'"):
        _cfg(mode="double")
    with pytest.raises(SteeringError, match="steer.prompts is empty"):
        _cfg(prompts=[])
    with pytest.raises(SteeringError, match="steer.feature=9999 is not a feature of topk-k8-x4"):
        steer(model_cfg, _cfg(feature=9999), trained_run, loaded=loaded)
    run = copy_run(trained_run, tmp_path / "run")
    silent = Sae.load(run / "sae" / HOOK / "topk-k8-x4")
    with torch.no_grad():
        silent.W_enc[:, 3] = 0
        silent.b_enc[3] = -1e4
    silent.save(run / "sae" / HOOK / "silent")
    with pytest.raises(SteeringError, match="names 2 dictionaries"):
        steer(model_cfg, _cfg(sae=None), run, loaded=loaded)
    with pytest.raises(SteeringError, match="feature 3 never fires"):
        steer(model_cfg, _cfg(sae="silent"), run, loaded=loaded)


def test_steer_on_the_command_line(trained_run, model_cfg, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "pipeline", "steer", f"run_dir={run}", "steer.feature=3", "steer.sae=topk-k8-x4",
           "steer.max_new_tokens=3", "steer.prompts=[the cat]", f"model.path={model_cfg.path}", "model.package=null",
           "model.gguf_file=null", "model.dtype=float32", "wandb.mode=disabled"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'the cat'" in result.stdout and (run / "steer" / HOOK / "topk-k8-x4" / "feature-3.json").exists()


def _greedy(loaded, prompt: str) -> str:
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids),
                                    pad_token_id=loaded.tokenizer.eos_token_id)  # fmt: skip
    return loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_transcoder_feature_is_added_where_it_writes(transcoder_run, model_cfg, loaded):
    """Its decoder row goes into the MLP's output (it is what the transcoder writes there)."""
    from pipeline.hooks import splice_activations, validate_hooks

    cfg = _cfg(sae="transcoder-k8-x4", relative=False, scales=[8.0], prompts=["the cat"])
    report = json.loads(steer(model_cfg, cfg, transcoder_run, loaded=loaded).read_text())
    assert (report["hook"], report["edited_at"]) == ("blocks.1.mlp_in", "blocks.1.mlp_out")
    direction = Sae.load(transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-k8-x4").W_dec[3].detach()
    writes = validate_hooks(loaded.model, ["blocks.1.mlp_out"])[0]
    with splice_activations(loaded.model, writes, lambda y: y + 8.0 * direction):
        assert report["scales"][0]["texts"][0] == _greedy(loaded, "the cat")


@pytest.mark.parametrize("mode, scale", [("clamp", 6.0), ("remove", 0.0)])
def test_a_transcoder_feature_is_set_from_the_mlp_input_of_the_same_pass(transcoder_run, model_cfg, loaded, mode,
                                                                         scale):  # fmt: skip
    """clamp / remove: the MLP's output y becomes y + (s - z(x)) d, z(x) the transcoder's code of that
    pass's MLP input x (checked against a plain forward hook on the MLP module), for the feature most
    active on the prompt's last token."""
    sae, mlp = Sae.load(transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-k8-x4"), loaded.model.model.layers[1].mlp
    inputs = []
    handle = mlp.register_forward_hook(lambda _module, args, _y: inputs.append(args[0].float()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=loaded.tokenizer("the cat", return_tensors="pt").input_ids)
    finally:
        handle.remove()
    with torch.no_grad():
        feature = int(sae.encode(inputs[0])[0, -1].argmax())  # at the last token: it shapes the next one

    def edited(_module, args, y):
        z = sae.encode(args[0].float())[..., feature : feature + 1]
        return (y.float() + (scale - z) * sae.W_dec[feature]).to(y.dtype)

    cfg = _cfg(sae="transcoder-k8-x4", feature=feature, mode=mode, relative=False, scales=[scale], prompts=["the cat"])
    report = json.loads(steer(model_cfg, cfg, transcoder_run, loaded=loaded).read_text())
    handle = mlp.register_forward_hook(edited)
    try:
        expected = _greedy(loaded, "the cat")
    finally:
        handle.remove()
    assert report["scales"][0]["texts"][0] == expected and report["scales"][0]["kl"][0] > 0
