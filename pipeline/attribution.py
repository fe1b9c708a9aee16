"""Why a feature fires and what it does, computed on the real model.

  logit_effects            the message it sends: its decoder direction through the final norm and the
                           unembedding (logit lens), i.e. the output tokens it promotes / suppresses
  input_attribution        gradient x input: how much each context token's embedding contributed to
                           the feature's pre-activation at the example's max token
  component_attribution    the pre-activation at the max token split exactly into what the embedding,
                           every attention head and every MLP wrote into the residual stream, and for
                           heads, into pattern[dst, src] x (OV message from src . encoder direction)
  loss_contribution        the change in next-token loss at every position when the feature is removed
                           from the residual stream of the example (a real forward pass)
All take the encoder direction w = W_enc[:, f] and its constant b (b_enc[f] - b_dec . w for an SAE,
b_enc[f] for a transcoder), so that pre-activation = x . w + b.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import metrics as M
from pipeline.hooks import (
    HookPoint,
    capture_activations,
    clean_pass,
    decoder_layers,
    prefix_layers,
    replay_prefix,
    splice_activations,
    watch_activation,
)

_FINAL_NORMS = (
    "model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    for attr in path.split("."):
        model = getattr(model, attr, None)
        if model is None:
            return None
    return model


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the unembedding."""
    for path in _FINAL_NORMS:
        module = _get(model, path)
        if module is not None:
            return module
    raise ValueError(
        f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(_FINAL_NORMS)})"
    )


@torch.no_grad()
def logit_effects(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] that directions [n, d_model] produce through the final norm and the
    unembedding, minus what an empty stream produces (a LayerNorm's bias is no feature's doing)."""
    norm = final_norm(model)
    unembed = model.get_output_embeddings()
    weight = unembed.weight.float()  # [vocab, d_model]
    dtype = next(norm.parameters()).dtype

    def through(x: torch.Tensor) -> torch.Tensor:
        normed = norm(x.to(dtype)).float()
        return normed @ weight.T + (unembed.bias.float() if unembed.bias is not None else 0)

    empty = through(torch.zeros(1, directions.shape[1], device=directions.device))
    return through(directions) - empty


def encoder_terms(sae, latent: int) -> tuple[torch.Tensor, float]:
    """(w [d_in], b) with pre-activation = x . w + b for `latent`."""
    w = sae.W_enc[:, latent].detach().float()
    with torch.no_grad():  # the pre-activation of a zero input is the constant
        return w, float(sae.pre_acts(sae.b_dec.new_zeros(sae.d_in))[latent])


# ---------------------------------------------------------------- input tokens


def input_attribution(
    model: nn.Module,
    hook: HookPoint,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    w: torch.Tensor,
    b: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x input of the pre-activation at `positions` [batch] with respect to the token
    embeddings of tokens [batch, seq]: ([batch, seq] attributions, [batch] pre-activations)."""
    embed = model.get_input_embeddings()
    with torch.enable_grad():
        inputs = embed(tokens).detach().requires_grad_(True)  # [batch, seq, d_model]
        x = capture_activations(model, None, [hook], inputs_embeds=inputs)[hook.name]
        pre = x[torch.arange(len(tokens)), positions].float() @ w.to(x.device) + b
        (grad,) = torch.autograd.grad(pre.sum(), inputs)
    return (grad.float() * inputs.detach().float()).sum(-1), pre.detach()


# ---------------------------------------------------------------- components


@dataclass
class _Heads:
    """Where a layer's attention heads write: output = sum_h z_h @ out_weight[h] (+ out_bias)."""

    z_module: nn.Module  # its input is z, the heads' outputs side by side [.., n_heads * head_dim]
    out_weight: torch.Tensor  # [n_heads, head_dim, d_model]
    out_bias: torch.Tensor | None
    value_of: callable | None  # module output -> values [batch, seq, n_kv_heads, head_dim]
    value_module: nn.Module | None
    n_heads: int
    n_kv: int


def _heads(model: nn.Module, layer: nn.Module) -> _Heads | None:
    """The head structure of Llama-family and GPT-2 layers; None where heads do not add linearly
    into the stream (Gemma-2's post-attention norm) or the layout is not known."""
    config = model.config
    if hasattr(layer, "pre_feedforward_layernorm"):
        return None
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "o_proj") and hasattr(attn, "v_proj"):
        n_heads = config.num_attention_heads
        head_dim = attn.o_proj.in_features // n_heads
        n_kv = attn.v_proj.out_features // head_dim
        return _Heads(
            attn.o_proj,
            attn.o_proj.weight.detach().float().T.reshape(n_heads, head_dim, -1),
            None if attn.o_proj.bias is None else attn.o_proj.bias.detach().float(),
            lambda v: v.unflatten(-1, (n_kv, head_dim)),
            attn.v_proj,
            n_heads,
            n_kv,
        )
    attn = getattr(layer, "attn", None)
    if attn is not None and hasattr(attn, "c_proj") and hasattr(attn, "c_attn"):  # GPT-2 (Conv1D: [in, out])
        n_heads, d = config.n_head, config.n_embd
        return _Heads(
            attn.c_proj,
            attn.c_proj.weight.detach().float().reshape(n_heads, d // n_heads, d),
            attn.c_proj.bias.detach().float(),
            lambda qkv: qkv[..., 2 * d :].unflatten(-1, (n_heads, d // n_heads)),
            attn.c_attn,
            n_heads,
            n_heads,
        )
    return None


def _component_hooks(hook: HookPoint) -> list[tuple[str, HookPoint]]:
    """The writes into the residual stream that add up to the activation at a resid hook."""
    parts = [("embed", HookPoint(0, "resid_pre"))]
    for layer in range(hook.layer + 1):
        if layer < hook.layer or hook.point in ("resid_mid", "resid_post"):
            parts.append((f"L{layer}.attn", HookPoint(layer, "attn_out")))
        if layer < hook.layer or hook.point == "resid_post":
            parts.append((f"L{layer}.mlp", HookPoint(layer, "mlp_out")))
    return parts


@dataclass
class _Seen:
    """What a forward pass left in the head hooks, per layer: the heads' outputs z (the output
    projection's input), the value projections' outputs and the attention patterns."""

    z: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    patterns: dict[int, torch.Tensor]


@contextlib.contextmanager
def _watching_heads(model: nn.Module, heads: dict[int, _Heads | None]) -> Iterator[_Seen]:
    """Within the block, forward passes record each layer's z, values and attention pattern (eager
    attention: the only implementation that returns patterns)."""
    seen = _Seen({}, {}, {})
    layers = decoder_layers(model)
    handles = []
    for i, h in heads.items():
        if h is not None:
            handles.append(
                h.z_module.register_forward_pre_hook(lambda _m, args, i=i: seen.z.__setitem__(i, args[0]))
            )
            handles.append(
                h.value_module.register_forward_hook(lambda _m, _a, out, i=i: seen.values.__setitem__(i, out))
            )
        attention = _get(layers[i], "self_attn") or _get(layers[i], "attn")
        if attention is not None:
            handles.append(
                attention.register_forward_hook(lambda _m, _a, out, i=i: seen.patterns.__setitem__(i, out[1]))
            )
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield seen
    finally:
        model.set_attn_implementation(previous)
        for handle in handles:
            handle.remove()


def _head_sources(heads: dict[int, _Heads | None], seen: _Seen, largest: list[tuple[int, int]], position: int,
                  w: torch.Tensor) -> list[dict]:  # fmt: skip
    """For the heads (layer, head) in `largest`: each source position's part of the head's
    contribution, pattern[dst, src] x (OV message from src . w)."""
    sources = []
    for layer, head in largest:
        h = heads[layer]
        if seen.patterns.get(layer) is None or layer not in seen.values:
            continue
        pattern = seen.patterns[layer][0, head, position].float()  # [seq] over source positions
        value = h.value_of(seen.values[layer])[0, :, head // (h.n_heads // h.n_kv)].float()  # [seq, head_dim]
        message = value @ h.out_weight[head].to(value.device) @ w  # [seq]: OV message . w
        sources.append(
            {"component": f"L{layer}.H{head}", "sources": (pattern * message)[: position + 1].tolist()}
        )
    return sources


@torch.no_grad()
def component_attribution(
    model: nn.Module, hook: HookPoint, tokens: torch.Tensor, position: int, w: torch.Tensor, b: float,
    top_heads: int = 3,
) -> dict:  # fmt: skip
    """The pre-activation x[position] . w + b of one window tokens [seq] split into the embedding,
    each layer's attention (per head where heads add linearly) and MLP, plus the constant b and what
    the model's rounding left unattributed; for the `top_heads` largest heads, the part that came
    from each source position."""
    if not hook.on_residual_stream:
        raise ValueError(f"component attribution needs a residual-stream hook, not {hook.name}")
    parts = _component_hooks(hook)
    layers = decoder_layers(model)
    heads = {i: _heads(model, layers[i]) for i in range(hook.layer + 1)}
    ids = tokens[None].to(next(model.parameters()).device, torch.long)
    with _watching_heads(model, heads) as seen:
        acts = capture_activations(model, ids, [hp for _, hp in parts] + [hook])
    w_dev = w.to(ids.device)
    contributions, head_parts = [], []
    for name, hp in parts:
        h = heads.get(hp.layer) if hp.point == "attn_out" else None
        if h is None or hp.layer not in seen.z:
            contributions.append([name, float(acts[hp.name][0, position].float() @ w_dev)])
            continue
        z = seen.z[hp.layer][0, position].float().view(h.n_heads, -1)  # [heads, head_dim]
        per_head = torch.einsum("hk,hkd,d->h", z, h.out_weight.to(z.device), w_dev)
        for head, value in enumerate(per_head.tolist()):
            contributions.append([f"L{hp.layer}.H{head}", value])
            head_parts.append((abs(value), hp.layer, head))
        if h.out_bias is not None:
            contributions.append([f"L{hp.layer}.attn_bias", float(h.out_bias.to(w_dev.device) @ w_dev)])
    largest = [(layer, head) for _, layer, head in sorted(head_parts, reverse=True)[:top_heads]]
    pre_activation = float(acts[hook.name][0, position].float() @ w_dev + b)
    return {
        "pre_activation": pre_activation,
        "constant": b,
        "components": contributions,
        # what the parts miss: the model adds them in its own dtype (bf16: ~0.1 %); 0 in fp32
        "unattributed": pre_activation - b - sum(value for _, value in contributions),
        "head_sources": _head_sources(heads, seen, largest, position, w_dev),
    }


# ---------------------------------------------------------------- loss


@torch.inference_mode()
def loss_contribution(
    model: nn.Module,
    hook: HookPoint,
    sae,
    latent: int,
    tokens: torch.Tensor,
    stored: torch.Tensor | None = None,
    last: int | None = None,
    writes: HookPoint | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove `latent`'s contribution (activation x decoder row) from the stream at `hook` on every
    position of windows tokens [batch, seq] and run on: ([batch, seq] the latent's activation,
    [batch, n] change in the loss of predicting token t+1 at t; > 0: the feature helped), for the
    predictions at the `last` positions but one (all when None; n = last - 1 or seq - 1).
    `stored` [batch, seq, d_model]: the activations at a resid_pre / resid_post hook as this model
    computes them; then no pass computes the layers before the hook. A transcoder's latent is read at
    `hook` and removed from the activations it predicts, at `writes`."""
    at = writes or hook
    device = next(model.parameters()).device
    ids = tokens.to(device, torch.long)
    keep = {} if last is None else {"logits_to_keep": last}
    with watch_activation(model, hook if writes else None) as read:
        clean_logits, x, kept = clean_pass(model, at, ids, stored, **keep)
    acts = sae.encode((read[0] if writes else x).float())[..., latent]  # [batch, seq]
    removed = (x.float() - acts[..., None] * sae.W_dec[latent].float()).to(x.dtype)
    with splice_activations(model, at, lambda _a: removed), replay_prefix(model, prefix_layers(at), kept):
        ablated_logits = model(input_ids=ids, use_cache=False, **keep).logits
    targets = ids[:, -clean_logits.shape[1] :]
    nll_clean, others = M.next_token_losses(clean_logits, {"ablated": ablated_logits}, targets)
    return acts, others["ablated"][0] - nll_clean
