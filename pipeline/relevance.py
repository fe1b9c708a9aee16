"""Which features a task relies on: attribution patching over the task's next-token loss.

For the task's windows and a dictionary at its hook, with L the task loss (next-token NLL summed
over the windows), z_i(t) feature i's activation and d_i its decoder row, removing the feature at
every position (x -> x - z_i d_i, BOS left alone) changes L by about

    effect_i = - sum_t z_i(t) (d_i . dL/dx(t))          (> 0: the task needs the feature)

(attribution patching: Nanda 2023, Syed et al. 2023; Marks et al. 2024 for SAE features): one forward
and one backward from the hook give it for every feature at once. `ablation_effects` measures the
same change exactly, one forward per feature, to check the estimate on a sample. A transcoder's
feature is coded from the activation it reads and removed from the one it writes (y -> y - z_i d_i at
mlp_out), where the gradient is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.corpus import CorpusConfig
from pipeline.harvesting import HarvestConfig, corpus_windows
from pipeline.hooks import HookPoint, splice_activations, splice_transcoder, watch_activation
from pipeline.models import LoadedModel
from pipeline.steering import feature_edit


@dataclass
class TaskAttribution:
    """Per feature, summed over the task's windows."""

    effect: torch.Tensor
    """float64 [d_sae]: the estimated change of the task loss when the feature is removed."""
    count: torch.Tensor
    """float64 [d_sae]: positions it fired on (BOS left out)."""
    tokens: int
    """Positions counted (BOS left out)."""
    loss: float
    """Mean next-token loss of the task."""
    predictions: int
    """Next-token predictions the loss is the mean of."""

    def plus(self, other: TaskAttribution) -> TaskAttribution:
        """The attribution over both parts' windows together."""
        predictions = self.predictions + other.predictions
        loss = (self.loss * self.predictions + other.loss * other.predictions) / max(1, predictions)
        return TaskAttribution(self.effect + other.effect, self.count + other.count, self.tokens + other.tokens,
                               loss, predictions)  # fmt: skip


def task_windows(loaded: LoadedModel, corpus: CorpusConfig, context_length: int, tokens: int) -> torch.Tensor:
    """The task corpus as windows [n, context_length], as harvest would cut them (the relevance and
    track stages' task)."""
    cut = HarvestConfig(context_length=context_length, tokens=tokens)
    return torch.stack(list(corpus_windows(loaded, corpus, cut)))  # (a corpus shorter than a window says so)


def _task_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL summed over windows ids [b, ctx] (fp32)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def attribution_patching(model, hook: HookPoint, sae, windows: torch.Tensor, bos: int | None, batch: int = 4,
                         writes: HookPoint | None = None) -> TaskAttribution:  # fmt: skip
    """The estimate for every feature over windows [n, ctx] of the task. A transcoder's codes come from
    `hook` and its decoder writes at `writes`, where the gradient is taken."""
    device = next(model.parameters()).device
    effect = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    count = torch.zeros_like(effect)
    loss, tokens = 0.0, 0
    for lo in range(0, len(windows), batch):
        ids = windows[lo : lo + batch].to(device, torch.long)
        leaf: list[torch.Tensor] = []

        def as_leaf(a: torch.Tensor, leaf: list = leaf) -> torch.Tensor:  # the backward stops at the hook
            leaf.append(a.detach().requires_grad_(True))
            return leaf[0]

        reads = hook if writes else None  # a transcoder's input, kept from the same pass
        with torch.enable_grad(), watch_activation(model, reads) as read, splice_activations(model, writes or hook, as_leaf):
            task_loss = _task_loss(model(input_ids=ids, use_cache=False).logits, ids)
            (grad,) = torch.autograd.grad(task_loss, leaf[0])
        counted = (ids != bos).flatten() if bos is not None else torch.ones(ids.numel(), dtype=torch.bool, device=device)
        with torch.no_grad():
            x = read[0] if writes else leaf[0]  # what the dictionary reads
            z = sae.encode(x.detach().float().flatten(0, 1))[counted]  # [positions, d_sae]
            pushed = grad.float().flatten(0, 1)[counted] @ sae.W_dec.float().T  # [positions, d_sae]: d_i . dL/dx
            effect -= (z * pushed).sum(0).double()
            count += (z > 0).sum(0).double()
        loss += float(task_loss.detach())
        tokens += int(counted.sum())
    predictions = windows.numel() - len(windows)
    return TaskAttribution(effect.cpu(), count.cpu(), tokens, loss / max(1, predictions), predictions)


def _removal(model, sae, f: int, keep: torch.Tensor, hook: HookPoint, writes: HookPoint | None):
    """The splice removing feature f where `keep` [b, ctx, 1]: x - z(x) d at the hook for an SAE; for a
    transcoder y - z(x) d at `writes`, z coded from the activation x at `hook` of the same pass."""
    remove = feature_edit(sae, f, "remove", 0.0, where=keep)
    return splice_activations(model, hook, remove) if writes is None else splice_transcoder(model, hook, writes, remove)


@torch.no_grad()
def ablation_effects(model, hook: HookPoint, sae, windows: torch.Tensor, bos: int | None, features: list[int],
                     batch: int = 4, writes: HookPoint | None = None) -> torch.Tensor:  # fmt: skip
    """The true change of the task loss (summed over windows [n, ctx]) when each of `features` is
    removed at every position but BOS: float64 [len(features)]. A transcoder's feature (coded from
    `hook`) is removed from the activations it writes, at `writes`."""
    device = next(model.parameters()).device
    changes = torch.zeros(len(features), dtype=torch.float64)
    for lo in range(0, len(windows), batch):
        ids = windows[lo : lo + batch].to(device, torch.long)
        keep = (ids != bos)[..., None] if bos is not None else torch.ones_like(ids, dtype=torch.bool)[..., None]
        clean = float(_task_loss(model(input_ids=ids, use_cache=False).logits, ids))
        for j, f in enumerate(features):
            with _removal(model, sae, f, keep, hook, writes):
                changes[j] += float(_task_loss(model(input_ids=ids, use_cache=False).logits, ids)) - clean
    return changes
