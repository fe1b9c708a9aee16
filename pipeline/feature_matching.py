"""Matching two dictionaries' features by decoder direction, and what a control says of the result.

    match_features   decoder cosine between every pair; the optimal one-to-one assignment (Hungarian;
                     greedy above DENSE_ASSIGNMENT_LIMIT entries) and each feature's best match
    classify         kept / shifted / vanished per base feature, new per other feature
    against_control  the same counts for a control dictionary (trained as the other one, on the base
                     model): how much of the movement any such training shows, the model unchanged

Two dictionaries trained separately disagree even on the same model, so a comparison's counts mix
the models' difference with training randomness; the control measures the latter.
"""

from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

DENSE_ASSIGNMENT_LIMIT = 1 << 28  # cosine matrices up to ~16k x 16k get the optimal assignment
STATUS_NAMES = ("kept", "shifted", "vanished")


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(weight.detach().float(), dim=-1)


def match_features(base, other) -> dict[str, torch.Tensor]:
    """Decoder-cosine matching of two dictionaries: the optimal one-to-one assignment (`assigned`,
    -1 where none; `assigned_cos`), best matches both ways, and encoder cosines of assigned pairs."""
    dec_b, dec_o = _unit_rows(base.W_dec), _unit_rows(other.W_dec)
    cos = dec_b @ dec_o.T  # [d_sae base, d_sae other]
    best_cos, best = cos.max(1)
    best_cos_other, _ = cos.max(0)
    assigned = torch.full((len(dec_b),), -1, dtype=torch.long)
    if cos.numel() <= DENSE_ASSIGNMENT_LIMIT:
        rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
        assigned[torch.from_numpy(rows)] = torch.from_numpy(cols)
    else:  # greedy one-to-one by decreasing cosine: near-optimal when most features have one clear partner
        log.warning("%d x %d cosine matrix: greedy assignment instead of the optimal one", *cos.shape)
        taken = torch.zeros(len(dec_o), dtype=torch.bool)
        for i in torch.argsort(best_cos, descending=True).tolist():
            row = cos[i].masked_fill(taken, -2)
            j = int(row.argmax())
            assigned[i], taken[j] = j, True
    has = assigned >= 0
    assigned_cos = torch.full((len(dec_b),), float("nan"))
    assigned_cos[has] = cos[has.nonzero()[:, 0], assigned[has]]
    enc_b, enc_o = _unit_rows(base.W_enc.T), _unit_rows(other.W_enc.T)
    encoder_cos = torch.full((len(dec_b),), float("nan"))
    encoder_cos[has] = (enc_b[has] * enc_o[assigned[has]]).sum(-1)
    partner_of_other = torch.full((len(dec_o),), -1, dtype=torch.long)
    partner_of_other[assigned[has]] = has.nonzero()[:, 0]
    other_cos = torch.full((len(dec_o),), float("nan"))
    other_cos[assigned[has]] = assigned_cos[has]
    return {
        "assigned": assigned,
        "assigned_cos": assigned_cos,
        "best": best,
        "best_cos": best_cos,
        "best_cos_other": best_cos_other,
        "encoder_cos": encoder_cos,
        "partner_of_other": partner_of_other,
        "other_assigned_cos": other_cos,
    }


def classify(matches: dict[str, torch.Tensor], kept: float, shifted: float) -> dict[str, torch.Tensor]:
    """Per base feature: 0 kept, 1 shifted, 2 vanished; per other feature: True if new."""
    cos = matches["assigned_cos"].nan_to_num(-1.0)
    status = torch.where(cos >= kept, 0, torch.where(cos >= shifted, 1, 2))
    new = matches["other_assigned_cos"].nan_to_num(-1.0) < shifted
    return {"status": status, "new": new}


def against_control(classes: dict[str, torch.Tensor], control: dict[str, torch.Tensor]) -> dict[str, int]:
    """Base features kept against the control but not against the other dictionary, and the reverse.
    With no difference beyond training randomness the two dictionaries are exchangeable and each of
    these features falls on either side with even odds, so `sign_test_z` = (first - second) / sqrt(sum)
    is about normal: above 3, the other model moved features beyond what the training alone moves."""
    kept, kept_control = classes["status"] == 0, control["status"] == 0
    beyond, only_control = int((kept_control & ~kept).sum()), int((kept & ~kept_control).sum())
    z = (beyond - only_control) / (beyond + only_control) ** 0.5 if beyond + only_control else 0.0
    return {"moved_beyond_control": beyond, "moved_only_in_control": only_control, "sign_test_z": round(z, 2)}
