"""Features followed through fine-tuning: one dictionary (trained on the base model θ₀) applied to the
activations of every checkpoint θ_t on the same windows.

Per feature and step: how often it fires, and the cosine between its activations over those
positions and its activations under θ₀ (1: it fires on the same tokens as strongly as before). A
feature is kept while that cosine stays at or above `kept`, shifted below it, vanished once it fires
at under `vanished` times its θ₀ rate; a feature silent under θ₀ has appeared once it fires on
`appeared` positions. θ₀'s codes are kept sparse between the steps (a TopK code is k of d_sae).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from pipeline.hooks import HookPoint, capture_activations

STATUS_NAMES = ("kept", "shifted", "vanished", "appeared", "silent")
KEPT, SHIFTED, VANISHED, APPEARED, SILENT = range(len(STATUS_NAMES))


@torch.no_grad()
def batch_codes(model, hook: HookPoint, sae, windows: torch.Tensor, bos: int | None, batch: int) -> Iterator[torch.Tensor]:
    """The dictionary's codes [positions, d_sae] of each batch of windows [n, ctx], BOS positions left out."""
    device = next(model.parameters()).device
    for lo in range(0, len(windows), batch):
        ids = windows[lo : lo + batch].to(device, torch.long)
        x = capture_activations(model, ids, [hook])[hook.name]
        z = sae.encode(x.to(sae.W_dec.device, torch.float32).flatten(0, 1))
        yield z[(ids != bos).flatten().to(z.device)] if bos is not None else z


@dataclass
class StepStats:
    """One checkpoint's features against θ₀'s, over the same positions."""

    frequency: torch.Tensor
    """float64 [d_sae]: the share of positions the feature fires on."""
    count: torch.Tensor
    """float64 [d_sae]: the positions it fires on."""
    cosine: torch.Tensor
    """float64 [d_sae]: cosine of its activations with θ₀'s over the positions (NaN where either is silent)."""
    positions: int


def reference_codes(codes: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """θ₀'s codes, kept sparse on the CPU for the later steps."""
    return [z.cpu().to_sparse() for z in codes]


def step_stats(codes: Iterable[torch.Tensor], reference: list[torch.Tensor]) -> StepStats:
    """A checkpoint's codes (batches as reference_codes' of θ₀, same windows) against θ₀'s."""
    count = dot = own = base = None
    positions = 0
    for z, z0 in zip(codes, reference, strict=True):
        z, z0 = z.double().cpu(), z0.to_dense().double()
        if count is None:
            count, dot, own, base = (torch.zeros(z.shape[1], dtype=torch.float64) for _ in range(4))
        count += (z > 0).sum(0)
        dot += (z * z0).sum(0)
        own += z.pow(2).sum(0)
        base += z0.pow(2).sum(0)
        positions += len(z)
    cosine = dot / (own * base).sqrt()  # 0/0 -> NaN where either side is silent
    return StepStats(count / max(1, positions), count, cosine, positions)


def classify(first: StepStats, step: StepStats, kept: float, vanished: float, appeared: int) -> torch.Tensor:
    """Each feature's status (STATUS_NAMES index) at `step` against θ₀ (`first`): int64 [d_sae]."""
    alive = first.count > 0
    lower = step.frequency < vanished * first.frequency
    status = torch.where(lower, VANISHED, torch.where(step.cosine.nan_to_num(0.0) < kept, SHIFTED, KEPT))
    return torch.where(alive, status, torch.where(step.count >= appeared, APPEARED, SILENT))


def first_change(statuses: torch.Tensor) -> torch.Tensor:
    """Per feature, the first step index whose status is neither kept nor silent (-1: none); statuses
    [steps, d_sae]."""
    changed = (statuses != KEPT) & (statuses != SILENT)
    first = changed.float().argmax(0)
    return torch.where(changed.any(0), first, -1)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def relevance_of_moved(effect: torch.Tensor, task_count: torch.Tensor, movement: torch.Tensor, moved: torch.Tensor,
                       alive: torch.Tensor, top: int) -> dict:  # fmt: skip
    """Were the features the task relies on the ones fine-tuning moved? `effect` [d_sae]: each feature's
    attribution to the task loss under θ₀ (relevance.py), `task_count` the task positions it fires on,
    `movement` 1 - its final cosine, `moved` its final status not kept, `alive` firing under θ₀."""
    firing = torch.nonzero((task_count > 0) & alive).flatten()
    ranked = firing[effect[firing].abs().argsort(descending=True)][:top]
    both = torch.stack([_ranks(effect[firing].abs()), _ranks(movement[firing].nan_to_num(1.0))])
    spearman = float(torch.corrcoef(both)[0, 1]) if len(firing) > 2 else float("nan")
    return {
        "top": len(ranked),
        "moved_share_of_top_relevant": float(moved[ranked].double().mean()) if len(ranked) else float("nan"),
        "moved_share_of_all": float(moved[alive].double().mean()) if alive.any() else float("nan"),
        "spearman_relevance_vs_movement": spearman,
        "top_relevant": ranked.tolist(),
    }
