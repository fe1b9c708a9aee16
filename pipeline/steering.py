"""What a feature does: edit it in the model's forward pass and see what the model says.

Three edits at the dictionary's hook, at every position (the prompt's and each generated one's):

    add      x + s * d                      d: the feature's decoder row (unit norm), s: the scale
    clamp    x + (s - z(x)) * d             the feature's activation z(x) set to s
    remove   x - z(x) * d                   the feature taken out (as the loss contribution does)

A transcoder's edits go into the output it writes (`hook`), its code z(x) computed from the input it
reads (`reads`) in the same pass. `generate` continues prompts greedily under an edit;
`next_token_shift` compares the next-token distribution after a prompt with and without it;
`promoted_rise` asks whether the tokens the feature promotes by the logit lens
(attribution.logit_effects) become more likely when it is added. `steering_report` puts them
together for one feature (the steer stage's report, and the steering panel of the dashboard's
detailed features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.attribution import logit_effects
from pipeline.errors import PipelineError
from pipeline.hooks import HookPoint, splice_activations, splice_transcoder
from pipeline.models import LoadedModel, left_padded, pad_id

MODES = ("add", "clamp", "remove")


class SteeringError(PipelineError, ValueError):
    """A steering request that cannot run; the message says what to change."""


def feature_edit(sae, latent: int, mode: str, scale: float,
                 where: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """The edit of activations [..., d_in] at the hook for `mode` (one of MODES) at `scale`; only at
    the positions where `where` (bool [..., 1]) is True, when given. `edit(x)` edits an SAE's
    activations x (its code z(x) from them); `edit(x, y)` a transcoder's output y, z(x) coded from its
    input x of the same pass (hooks.splice_transcoder calls it so)."""
    if mode not in MODES:
        raise SteeringError(f"steering mode {mode!r} is not one of {', '.join(MODES)}")
    direction = sae.W_dec[latent].detach()

    def edit(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = x if y is None else y
        d = direction.to(y.device, torch.float32)
        if mode == "add":
            change = scale * d
        else:
            z = sae.encode(x.float())[..., latent : latent + 1]  # [..., 1]
            change = ((scale if mode == "clamp" else 0.0) - z) * d
        return (y.float() + (change if where is None else change * where)).to(y.dtype)

    return edit


def _edited(loaded: LoadedModel, hook: HookPoint, edit: Callable | None, reads: HookPoint | None):
    """The context of a forward pass under `edit` at `hook` (a transcoder's: `reads` given)."""
    if edit is None:
        return contextlib.nullcontext()
    if reads is None:
        return splice_activations(loaded.model, hook, edit)
    return splice_transcoder(loaded.model, reads, hook, edit)


def _prompts_batch(loaded: LoadedModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The prompts' tokens as one left-padded batch on the model's device: (ids, attention mask,
    position ids, pad id); generation continues every row in place."""
    tokenizer = loaded.tokenizer
    pad = pad_id(tokenizer)
    ids, mask, positions = left_padded([tokenizer(prompt).input_ids for prompt in prompts], pad)
    return ids.to(loaded.device), mask.to(loaded.device), positions.to(loaded.device), pad


@torch.inference_mode()
def generate(loaded: LoadedModel, hook: HookPoint, edit: Callable | None, prompts: list[str], max_new_tokens: int,
             reads: HookPoint | None = None) -> list[str]:  # fmt: skip
    """The greedy continuation of each prompt (its new text only), under `edit` (None: the plain model);
    the prompts go through the model together (one generation for all: 2-3x faster on a CPU; in bf16
    a batch rounds differently from a lone prompt, so a near-tie can go the other way)."""
    ids, mask, _, pad = _prompts_batch(loaded, prompts)
    with _edited(loaded, hook, edit, reads):
        out = loaded.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=pad)  # fmt: skip
    return [loaded.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]


@torch.inference_mode()
def next_token_logprobs(loaded: LoadedModel, hook: HookPoint, edit: Callable | None, prompts: list[str],
                        reads: HookPoint | None = None) -> torch.Tensor:  # fmt: skip
    """Log-probabilities [prompts, vocab] of the token after each prompt, under `edit` (one forward)."""
    ids, mask, positions, _ = _prompts_batch(loaded, prompts)
    with _edited(loaded, hook, edit, reads):
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
    return logits[:, -1].float().log_softmax(-1).cpu()


@dataclass
class Shift:
    """How an edit moves the next-token distribution after one prompt."""

    kl: float
    """KL(steered || plain) in nats."""
    risen: list[tuple[int, float]]
    """The tokens whose probability rose most: (token id, change in probability)."""


def next_token_shift(plain: torch.Tensor, steered: torch.Tensor, n: int = 5) -> list[Shift]:
    """Per prompt, from log-probabilities [prompts, vocab] without and with the edit."""
    shifts = []
    for before, after in zip(plain, steered, strict=True):
        kl = float((after.exp() * (after - before)).sum())
        change = after.exp() - before.exp()
        top = change.topk(n)
        shifts.append(Shift(kl, [(int(i), float(v)) for i, v in zip(top.indices, top.values, strict=True)]))
    return shifts


def promoted_rise(plain: torch.Tensor, steered: torch.Tensor, promoted: list[int]) -> float:
    """Mean change in log-probability of the `promoted` tokens over the prompts (> 0: they rose)."""
    index = torch.tensor(promoted)
    return float((steered[:, index] - plain[:, index]).mean())


@dataclass
class Plain:
    """The unedited model on the prompts (computed once, shared by every feature steered on them)."""

    texts: list[str]
    logprobs: torch.Tensor  # [prompts, vocab]: of the token after each prompt


def plain_outputs(loaded: LoadedModel, hook: HookPoint, prompts: list[str], max_new_tokens: int) -> Plain:
    return Plain(generate(loaded, hook, None, prompts, max_new_tokens), next_token_logprobs(loaded, hook, None, prompts))


def steering_report(loaded: LoadedModel, hook: HookPoint, sae, latent: int, mode: str, unit: float,
                    scales: list[float], plain: Plain, prompts: list[str], max_new_tokens: int,
                    reads: HookPoint | None = None) -> dict:  # fmt: skip
    """JSON-ready: the plain and edited continuations of every prompt at every scale (x `unit`), the
    next-token shift after each prompt, and the log-probability change of the feature's 10 most
    promoted tokens (logit lens). The edit is at `hook`, a transcoder's coded from `reads`."""
    promoted = logit_effects(loaded.model, sae.W_dec[latent : latent + 1].detach())[0].topk(10).indices.tolist()
    steps = []
    for scale in scales:
        edit = feature_edit(sae, latent, mode, scale * unit)
        steered = next_token_logprobs(loaded, hook, edit, prompts, reads)
        shifts = next_token_shift(plain.logprobs, steered)
        steps.append({"scale": scale, "texts": generate(loaded, hook, edit, prompts, max_new_tokens, reads),
                      "kl": [float(f"{s.kl:.4g}") for s in shifts],  # significant digits: a small edit keeps its KL
                      "risen": [[[t, round(p, 4)] for t, p in s.risen] for s in shifts],
                      "promoted_rise": round(promoted_rise(plain.logprobs, steered, promoted), 4)})  # fmt: skip
    return {"feature": latent, "mode": mode, "unit": round(unit, 4), "prompts": prompts,
            "promoted_tokens": promoted, "plain": plain.texts, "scales": steps}  # fmt: skip
