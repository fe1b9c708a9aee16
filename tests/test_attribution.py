import pytest
import torch

from pipeline.attribution import (
    component_attribution,
    encoder_terms,
    input_attribution,
    logit_effects,
    loss_contribution,
)
from pipeline.hooks import capture_activations, splice_activations, validate_hooks
from pipeline.sae import SaeConfig, build_sae
from tests.conftest import make_model


def _sae(d: int, seed: int = 0):
    sae = build_sae(SaeConfig(architecture="topk", expansion=4, k=8), d)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def _tokens(batch=4, seq=12, seed=0):
    return torch.randint(2, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_a_bf16_model_states_what_its_rounding_leaves_unattributed():
    """In bf16 the parts miss the pre-activation by the model's rounding: that is its own line, so
    parts + constant + unattributed is the pre-activation exactly."""
    model = make_model("llama", 100).to(torch.bfloat16)
    hook = validate_hooks(model, ["blocks.1.resid_post"])[0]
    w, b = encoder_terms(_sae(model.config.hidden_size), 5)
    out = component_attribution(model, hook, _tokens()[0], position=9, w=w, b=b)
    parts = sum(v for _, v in out["components"]) + out["constant"]
    assert out["unattributed"] != 0 and parts + out["unattributed"] == pytest.approx(out["pre_activation"], abs=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("point", ["resid_pre", "resid_mid", "resid_post"])
def test_components_add_up_to_the_pre_activation(arch, point):
    model = make_model(arch, 100)
    hook = validate_hooks(model, [f"blocks.1.{point}"])[0]
    sae = _sae(model.config.hidden_size)
    w, b = encoder_terms(sae, 5)
    tokens = _tokens()[0]
    out = component_attribution(model, hook, tokens, position=9, w=w, b=b)
    x = capture_activations(model, tokens[None], [hook])[hook.name][0, 9].detach()
    assert out["pre_activation"] == pytest.approx(float(x @ w + b), abs=1e-5)
    total = sum(v for _, v in out["components"]) + out["constant"]
    assert total == pytest.approx(out["pre_activation"], abs=1e-4)
    assert abs(out["unattributed"]) < 1e-4 and total + out["unattributed"] == pytest.approx(out["pre_activation"], abs=1e-9)
    names = [n for n, _ in out["components"]]
    assert names[0] == "embed"
    if arch != "gemma2" and point != "resid_pre":  # heads add linearly except behind Gemma-2's norm
        assert "L1.H0" in names and "L1.attn" not in names
        values = dict(out["components"])
        for source in out["head_sources"]:  # pattern x message summed over sources = the head's part
            assert sum(source["sources"]) == pytest.approx(values[source["component"]], abs=1e-5)
        assert out["head_sources"]


def test_input_attribution_finds_the_tokens_that_matter(trained_llama_dir):
    """Ablating (zeroing the embedding of) the top-attributed token lowers the pre-activation more
    than ablating a random earlier token, averaged over latents and examples."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_llama_dir).eval()
    hook = validate_hooks(model, ["blocks.1.resid_post"])[0]
    sae = _sae(model.config.hidden_size)
    tokens = _tokens(batch=8, seq=16, seed=1)
    positions = torch.full((8,), 15)
    gen = torch.Generator().manual_seed(0)
    top_drop, random_drop = [], []
    for latent in range(0, 128, 8):
        w, b = encoder_terms(sae, latent)
        attribution, pre = input_attribution(model, hook, tokens, positions, w, b)
        embeds = model.get_input_embeddings()(tokens)
        for i in range(8):
            for chosen, bucket in ((int(attribution[i].argmax()), top_drop),
                                   (int(torch.randint(16, (1,), generator=gen)), random_drop)):  # fmt: skip
                ablated = embeds[i : i + 1].clone()
                ablated[0, chosen] = 0
                x = capture_activations(model, None, [hook], inputs_embeds=ablated)[hook.name][0, 15]
                bucket.append(float((pre[i] - (x @ w + b)).detach()))
    assert sum(top_drop) / len(top_drop) > 2 * sum(random_drop) / len(random_drop)
    assert sum(top_drop) > 0


def test_logit_effects_follow_the_final_norm_and_unembedding():
    model = make_model("llama", 100)
    d = torch.randn(3, 32)
    norm = model.model.norm
    expected = (d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight) @ (
        model.lm_head.weight.T
    )
    torch.testing.assert_close(logit_effects(model, d), expected, atol=1e-5, rtol=1e-5)
    gpt2 = make_model("gpt2", 100)
    assert logit_effects(gpt2, torch.zeros(1, 48)).abs().max() == 0  # the LayerNorm bias is not the feature's


def test_loss_contribution_is_a_real_ablation():
    model = make_model("llama", 100)
    hook = validate_hooks(model, ["blocks.1.resid_post"])[0]
    sae = _sae(32)
    tokens = _tokens()
    acts, delta = loss_contribution(model, hook, sae, 3, tokens)
    x = capture_activations(model, tokens, [hook])[hook.name]
    torch.testing.assert_close(acts, sae.encode(x)[..., 3])
    with splice_activations(model, hook, lambda a: a - sae.encode(a)[..., 3:4] * sae.W_dec[3]):
        ablated = model(tokens).logits
    from pipeline.metrics import next_token_ce

    expected = next_token_ce(ablated, tokens) - next_token_ce(model(tokens).logits, tokens)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


def test_a_transcoder_latent_is_read_at_its_input_and_removed_from_its_output():
    model = make_model("llama", 100)
    reads, writes = validate_hooks(model, ["blocks.1.mlp_in", "blocks.1.mlp_out"])
    transcoder = build_sae(SaeConfig(architecture="transcoder", expansion=4, k=8), 32)
    transcoder.reset_parameters(torch.Generator().manual_seed(0))
    tokens = _tokens()
    acts, delta = loss_contribution(model, reads, transcoder, 3, tokens, writes=writes)
    x = capture_activations(model, tokens, [reads])[reads.name]
    torch.testing.assert_close(acts, transcoder.encode(x)[..., 3])
    with torch.inference_mode(), splice_activations(model, writes, lambda y: y - acts[..., None] * transcoder.W_dec[3]):
        ablated = model(tokens).logits
    from pipeline.metrics import next_token_ce

    expected = next_token_ce(ablated, tokens) - next_token_ce(model(tokens).logits, tokens)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    w, b = encoder_terms(transcoder, 3)  # no b_dec in a transcoder's pre-activation
    torch.testing.assert_close(x @ w + b, transcoder.pre_acts(x)[..., 3], atol=1e-5, rtol=1e-4)
