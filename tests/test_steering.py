import pytest
import torch

from pipeline.hooks import validate_hooks
from pipeline.sae import Sae
from pipeline.steering import (
    SteeringError,
    feature_edit,
    generate,
    next_token_logprobs,
    next_token_shift,
    plain_outputs,
    steering_report,
)

HOOK = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def steered(trained_run, loaded):
    sae = Sae.load(trained_run / "sae" / HOOK / "topk-k8-x4")
    return sae, validate_hooks(loaded.model, [HOOK])[0]


def test_each_edit_moves_the_activation_along_the_decoder_direction(steered):
    sae, _ = steered
    x = torch.randn(5, 7, sae.d_in) * 3
    d = sae.W_dec[3].detach()
    z = sae.encode(x)[..., 3:4].detach()
    torch.testing.assert_close(feature_edit(sae, 3, "add", 2.5)(x) - x, (2.5 * d).expand_as(x))
    torch.testing.assert_close(feature_edit(sae, 3, "clamp", 4.0)(x) - x, (4.0 - z) * d)
    torch.testing.assert_close(feature_edit(sae, 3, "remove", 0.0)(x) - x, -z * d)
    with pytest.raises(SteeringError, match="not one of add, clamp, remove"):
        feature_edit(sae, 3, "double", 1.0)


def test_generation_is_the_models_greedy_one_and_an_edit_changes_it(steered, loaded):
    sae, hook = steered
    ids = loaded.tokenizer("the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = loaded.model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                                       pad_token_id=0)  # fmt: skip
    assert generate(loaded, hook, None, ["the cat"], 6) == [loaded.tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)]
    assert generate(loaded, hook, feature_edit(sae, 3, "add", 0.0), ["the cat"], 6) == generate(loaded, hook, None, ["the cat"], 6)
    plain = next_token_logprobs(loaded, hook, None, ["the cat", "a dog"])
    pushed = next_token_logprobs(loaded, hook, feature_edit(sae, 3, "add", 50.0), ["the cat", "a dog"])
    shifts = next_token_shift(plain, pushed, n=3)
    assert all(s.kl > 0 and len(s.risen) == 3 and s.risen[0][1] > 0 for s in shifts)
    assert next_token_shift(plain, plain)[0].kl == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_prompts_of_different_lengths_together_give_what_each_gives_alone(steered, loaded, mode):
    """Prompts go through the model together, left-padded: in fp32 (the test model) each continuation
    and next-token distribution must be the one the prompt gets on its own, edited or not."""
    sae, hook = steered
    prompts = ["the cat", "a dog sat on the mat and", "x"]
    assert len({len(loaded.tokenizer(p).input_ids) for p in prompts}) == 3
    for edit in (None, feature_edit(sae, 3, mode, 6.0)):
        assert generate(loaded, hook, edit, prompts, 5) == [generate(loaded, hook, edit, [p], 5)[0] for p in prompts]
        alone = torch.cat([next_token_logprobs(loaded, hook, edit, [p]) for p in prompts])
        torch.testing.assert_close(next_token_logprobs(loaded, hook, edit, prompts), alone, atol=1e-4, rtol=1e-4)


def test_a_strongly_added_feature_raises_the_tokens_it_promotes(steered, loaded):
    """The logit lens says which tokens a decoder direction pushes; added large enough at the hook,
    those tokens must become more likely after the prompts."""
    sae, hook = steered
    prompts = ["the cat", "a dog sat"]
    plain = plain_outputs(loaded, hook, prompts, 4)
    report = steering_report(loaded, hook, sae, 3, "add", 1.0, [0.0, 80.0], plain, prompts, 4)
    assert [s["scale"] for s in report["scales"]] == [0.0, 80.0] and len(report["promoted_tokens"]) == 10
    assert report["scales"][0]["promoted_rise"] == pytest.approx(0, abs=1e-5)
    assert report["scales"][0]["texts"] == report["plain"]
    assert report["scales"][1]["promoted_rise"] > 0
