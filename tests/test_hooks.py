import copy

import pytest
import torch

from pipeline.hooks import (
    HookError,
    capture_activations,
    decoder_layers,
    parse_hook_name,
    prefix_layers,
    record_prefix,
    replay_prefix,
    splice_activations,
    splice_transcoder,
    validate_hooks,
)
from tests.conftest import make_model

ARCHS = ["llama", "gpt2", "neox", "gemma2"]


def _ids(vocab=100, batch=2, seq=12):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_parse_hook_name():
    hook = parse_hook_name("blocks.6.resid_post")
    assert (hook.layer, hook.point, hook.name) == (6, "resid_post", "blocks.6.resid_post")
    for bad in [
        "blocks.6",
        "layers.6.resid_post",
        "blocks.x.resid_post",
        "blocks.6.resid",
        "blocks.-1.mlp_out",
    ]:
        with pytest.raises(HookError, match="blocks.<layer>.<point>"):
            parse_hook_name(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_hooks_match_hidden_states(arch):
    model = make_model(arch, 100)
    ids = _ids()
    hidden = model(ids, output_hidden_states=True).hidden_states
    n = len(decoder_layers(model))
    for layer in range(n):
        names = [f"blocks.{layer}.resid_pre", f"blocks.{layer}.resid_post"]
        acts = capture_activations(model, ids, validate_hooks(model, names))
        torch.testing.assert_close(acts[names[0]], hidden[layer])
        if layer < n - 1:  # HF applies the final norm to the last entry
            torch.testing.assert_close(acts[names[1]], hidden[layer + 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_components_add_up_to_the_residual_stream(arch):
    model = make_model(arch, 100)
    ids = _ids()
    for layer in range(3):
        names = [
            f"blocks.{layer}.{p}" for p in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
        ]
        a = capture_activations(model, ids, validate_hooks(model, names))
        pre, attn, mid, mlp, post = (a[n] for n in names)
        torch.testing.assert_close(mid, pre + attn)
        torch.testing.assert_close(post, mid + mlp)


def test_attn_and_mlp_out_are_the_module_outputs():
    model = make_model("llama", 100)
    layer = decoder_layers(model)[1]
    seen = {}
    layer.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0]))
    layer.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out))
    ids = _ids()
    model(ids)
    acts = capture_activations(model, ids, validate_hooks(model, ["blocks.1.attn_out", "blocks.1.mlp_out"]))
    torch.testing.assert_close(acts["blocks.1.attn_out"], seen["attn"])
    torch.testing.assert_close(acts["blocks.1.mlp_out"], seen["mlp"])


def test_parallel_residual_has_no_resid_mid():
    model = make_model("neox", 100, use_parallel_residual=True)
    with pytest.raises(HookError, match="parallel"):
        validate_hooks(model, ["blocks.0.resid_mid"])
    ids = _ids()
    names = ["blocks.1.resid_pre", "blocks.1.attn_out", "blocks.1.mlp_out", "blocks.1.resid_post"]
    a = capture_activations(model, ids, validate_hooks(model, names))
    torch.testing.assert_close(a[names[3]], a[names[0]] + a[names[1]] + a[names[2]])


def test_truncated_forward_skips_later_layers():
    model = make_model("llama", 100)
    calls = []
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    capture_activations(model, _ids(), validate_hooks(model, ["blocks.0.mlp_out"]))
    assert calls == [0]


def test_invalid_hooks_list_the_valid_ones():
    model = make_model("gpt2", 100)
    with pytest.raises(HookError, match=r"layers 0\.\.2.*resid_pre\|resid_mid"):
        validate_hooks(model, ["blocks.3.resid_post"])
    with pytest.raises(HookError, match="resid_pre, resid_mid, resid_post, attn_out, mlp_in, mlp_out"):
        validate_hooks(model, ["blocks.0.residual"])
    with pytest.raises(HookError, match="no hook points"):
        validate_hooks(model, [])


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_in_is_what_the_mlp_reads(arch):
    """The normalized stream the MLP computes on: the MLP of mlp_in gives mlp_out."""
    model = make_model(arch, 100)
    ids = _ids()
    acts = capture_activations(model, ids, validate_hooks(model, ["blocks.1.mlp_in", "blocks.1.mlp_out", "blocks.1.resid_mid"] if arch != "neox" else ["blocks.1.mlp_in", "blocks.1.mlp_out"]))
    mlp_out = decoder_layers(model)[1].mlp(acts["blocks.1.mlp_in"])
    if arch == "gemma2":  # the sandwich norm after the MLP is part of what it adds to the stream
        mlp_out = decoder_layers(model)[1].post_feedforward_layernorm(mlp_out)
    torch.testing.assert_close(mlp_out, acts["blocks.1.mlp_out"])
    if arch != "neox":
        assert not torch.allclose(acts["blocks.1.mlp_in"], acts["blocks.1.resid_mid"])  # after the norm


@pytest.mark.parametrize("arch", ARCHS)
def test_a_transcoder_splice_replaces_the_mlp(arch):
    """Predicting mlp_out by the MLP itself changes nothing; by zero, it equals zero-ablating mlp_out."""
    model = make_model(arch, 100)
    ids = _ids()
    reads, writes = validate_hooks(model, ["blocks.1.mlp_in", "blocks.1.mlp_out"])
    layer = decoder_layers(model)[1]
    mlp = copy.deepcopy(layer.mlp)  # without the hooks the splice puts on the model's own
    if arch == "gemma2":
        norm = copy.deepcopy(layer.post_feedforward_layernorm)
    real = mlp if arch != "gemma2" else lambda x: norm(mlp(x))
    clean = model(ids).logits
    with splice_transcoder(model, reads, writes, lambda x, _y: real(x)):
        torch.testing.assert_close(model(ids).logits, clean)
    with splice_activations(model, writes, torch.zeros_like):
        ablated = model(ids).logits
    with splice_transcoder(model, reads, writes, lambda x, _y: torch.zeros_like(x)):
        torch.testing.assert_close(model(ids).logits, ablated)
    with splice_transcoder(model, reads, writes, lambda x, y: y - real(x)):  # what it is given: x, and y as computed
        torch.testing.assert_close(model(ids).logits, ablated, atol=1e-5, rtol=1e-4)
    with pytest.raises(HookError, match="fired before"), splice_transcoder(model, writes, reads, lambda x, y: x):
        model(ids)


@pytest.mark.parametrize("point", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out"])
def test_splicing_replaces_the_activation_downstream(point):

    model = make_model("llama", 100)
    ids = _ids()
    hook = validate_hooks(model, [f"blocks.1.{point}"])[0]
    clean = model(ids).logits
    with splice_activations(model, hook, lambda a: a):
        torch.testing.assert_close(model(ids).logits, clean)
    seen = {}
    with splice_activations(model, hook, lambda a: torch.zeros_like(a)):
        spliced = model(ids).logits
        seen.update(capture_activations(model, ids, [hook]))
    assert not torch.allclose(spliced, clean)
    assert seen[hook.name].abs().max() == 0  # a capture at the same hook sees the replacement
    torch.testing.assert_close(model(ids).logits, clean)  # the splice is gone after the block


def test_resid_post_splice_equals_running_on_from_the_replacement():
    """Splicing resid_post of layer 0 with x' gives what layer 1 computes from x'."""

    model = make_model("gpt2", 100)
    ids = _ids()
    pre1 = validate_hooks(model, ["blocks.1.resid_pre"])
    post0 = validate_hooks(model, ["blocks.0.resid_post"])[0]
    with splice_activations(model, post0, lambda a: a * 0.5):
        halved = capture_activations(model, ids, pre1)["blocks.1.resid_pre"]
    torch.testing.assert_close(halved, 0.5 * capture_activations(model, ids, [post0])[post0.name])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_resid_mid_splice_replaces_the_residual_branch_too(arch):
    """After a resid_mid splice, resid_post = replacement + what the MLP computes from it."""

    model = make_model(arch, 100)
    ids = _ids()
    mid, post, mlp = validate_hooks(model, ["blocks.1.resid_mid", "blocks.1.resid_post", "blocks.1.mlp_out"])
    clean_mid = capture_activations(model, ids, [mid])[mid.name]
    with splice_activations(model, mid, lambda a: a * 0.5):
        seen = capture_activations(model, ids, [post, mlp])
    torch.testing.assert_close(seen[post.name], 0.5 * clean_mid + seen[mlp.name])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("point", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
def test_replaying_the_clean_prefix_gives_the_same_spliced_logits(arch, point):

    model = make_model(arch, 100)
    ids = _ids()
    hook = validate_hooks(model, [f"blocks.1.{point}"])[0]
    n = prefix_layers(hook)
    with record_prefix(model, n) as kept:
        clean = model(ids).logits
    with splice_activations(model, hook, lambda a: a.flip(-1)):
        spliced = model(ids).logits
        with replay_prefix(model, n, kept):
            replayed = model(ids).logits
    assert not torch.allclose(spliced, clean)
    torch.testing.assert_close(replayed, spliced)
    torch.testing.assert_close(model(ids).logits, clean)  # layers compute again after the block
