"""Inputs made for a feature: a short token sequence that makes it fire strongly and reads as text.

Greedy coordinate gradient search (Zou et al. 2023's GCG, with the language model's own prior for
fluency as in Thompson et al. 2024's evolutionary prompt optimisation of features): the objective of
a sequence t_1..t_L is

    J = pre_f(t_L) / unit + fluency * mean_i log p(t_i | t_<i)

where pre_f is the feature's pre-activation at the last token (smooth where the activation is cut
by TopK or a threshold) and `unit` its scale (the largest activation on the corpus), so that one
weight of fluency means the same for a strong feature as for a weak one. Each step takes the
gradient of J with respect to the one-hot tokens, draws
`candidates` single-token swaps among each position's `top_tokens` most promising, scores them in one
batched forward and keeps the best if it improves J. The search is bounded by `steps` and `seconds`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline.attribution import encoder_terms
from pipeline.hooks import HookPoint, watch_activation


@dataclass
class SynthesisSettings:
    steps: int = 40
    candidates: int = 64
    top_tokens: int = 32
    fluency: float = 0.1
    """Weight of the mean log-probability per token (nats), against the pre-activation in units of the
    feature's corpus maximum: 0.1 trades one nat per token for a tenth of that maximum."""
    seconds: float = 20.0
    """Time bound per search."""
    seed: int = 0


@dataclass
class Synthesized:
    ids: list[int]
    """The optimised tokens (BOS not included)."""
    activation: float
    """The feature's activation at the last token (the dictionary's own encoding)."""
    logprob: float
    """Mean log-probability per token under the model."""
    steps: int


def _objective(model, hook: HookPoint, w: torch.Tensor, b: float, embeds: torch.Tensor, onehot: torch.Tensor,
               prefix: int, fluency: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(J, mean log-probability per token), each [batch], of sequences given as
    input embeddings [batch, prefix + L, d] whose last L tokens are onehot [batch, L, vocab]."""
    with watch_activation(model, hook) as seen:
        logits = model(inputs_embeds=embeds, use_cache=False).logits.float()
    pre = seen[0][:, -1].float() @ w + b
    first = max(prefix, 1)  # the first token with a prediction (none for the very first)
    logp = logits[:, first - 1 : -1].log_softmax(-1)
    fluent = (logp * onehot[:, first - prefix :]).sum(-1).mean(-1)
    return pre + fluency * fluent, fluent


def synthesize(model, hook: HookPoint, sae, latent: int, start: torch.Tensor, bos: int | None,
               banned: torch.Tensor, settings: SynthesisSettings, unit: float = 1.0) -> Synthesized:  # fmt: skip
    """The best sequence found from `start` (int [L]: the tokens optimised, after a BOS where the model
    has one); `banned` (bool [vocab]) tokens are never tried; `unit`: the feature's activation scale."""
    device = next(model.parameters()).device
    table = model.get_input_embeddings().weight  # [vocab, d]
    w, b = encoder_terms(sae, latent)
    w, b = w.to(device) / unit, b / unit  # the pre-activation in units of the feature's scale
    head = torch.tensor([bos] if bos is not None else [], dtype=torch.long, device=device)
    ids, gen = start.to(device, torch.long).clone(), torch.Generator().manual_seed(settings.seed)
    vocab, prefix = table.shape[0], len(head)
    allowed = ~banned.to(device)

    def embed(onehot: torch.Tensor) -> torch.Tensor:
        body = onehot.to(table.dtype) @ table
        return torch.cat([table[head].expand(len(onehot), -1, -1), body], 1) if prefix else body

    best, began, step = None, time.perf_counter(), 0
    for step in range(settings.steps):  # noqa: B007  (its last value is reported)
        onehot = torch.nn.functional.one_hot(ids, vocab).float()[None].requires_grad_(True)
        with torch.enable_grad():
            score, _ = _objective(model, hook, w, b, embed(onehot), onehot, prefix, settings.fluency)
            (grad,) = torch.autograd.grad(score.sum(), onehot)
        best = float(score.detach()) if best is None else best
        promising = grad[0].masked_fill(~allowed, float("-inf")).topk(settings.top_tokens, dim=-1).indices  # [L, k]
        where = torch.randint(len(ids), (settings.candidates,), generator=gen).to(device)
        which = torch.randint(settings.top_tokens, (settings.candidates,), generator=gen).to(device)
        trials = ids.repeat(settings.candidates, 1)
        trials[torch.arange(settings.candidates), where] = promising[where, which]
        with torch.no_grad():
            trial_onehot = torch.nn.functional.one_hot(trials, vocab).float()
            scores, _ = _objective(model, hook, w, b, embed(trial_onehot), trial_onehot, prefix, settings.fluency)
        top = int(scores.argmax())
        if float(scores[top]) > best:
            ids, best = trials[top], float(scores[top])
        if time.perf_counter() - began > settings.seconds:
            break
    return _measured(model, hook, sae, latent, ids, embed, (w, b, prefix, settings.fluency), step + 1)


@torch.no_grad()
def _measured(model, hook, sae, latent: int, ids: torch.Tensor, embed, terms: tuple, steps: int) -> Synthesized:
    """The found sequence with the feature's true activation (its dictionary's encoding) at the end;
    terms: (w, b, prefix, fluency) of the objective."""
    w, b, prefix, fluency = terms
    onehot = torch.nn.functional.one_hot(ids, model.get_input_embeddings().weight.shape[0]).float()[None]
    with watch_activation(model, hook) as seen:
        _, fluent = _objective(model, hook, w, b, embed(onehot), onehot, prefix, fluency)
    activation = float(sae.encode(seen[0][:, -1].float())[0, latent])
    return Synthesized(ids.tolist(), activation, float(fluent), steps)
