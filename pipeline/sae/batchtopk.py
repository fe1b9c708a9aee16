"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the batch_size * k largest ReLU(pre) over the whole batch, so tokens get a variable
number of latents (k on average). The loss is TopK's (FVU + AuxK), on the same sparse kernels
(`sparse.py`). For inference a single threshold replaces the batch selection: the mean over batches
of the smallest selected code, estimated on the final weights when the dictionary is saved
(`calibrate`) and saved as `threshold` (z = pre where pre > threshold, as JumpReLU).

Balanced selection (`sae.balance` a > 0, this project's): the batch keeps the largest scores
pre_i * w_i instead, w_i = (r_i / mean r)^-a with r_i latent i's firing rate (a moving average over
about BALANCE_HORIZON firings of an average latent), the ratio clipped to [1/8, 8]. A rarely firing
latent wins a place with a smaller code, a frequent one needs a larger one; the codes themselves stay
pre_i. So the rates spread less and fewer latents fall idle, where a natural spread leaves the rarest
ones idle over any window. Inference keeps the weights as a threshold per latent, threshold / w_i,
so a saved dictionary selects as training did (z = pre where pre > threshold_i).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pipeline import metrics as M
from pipeline.sae.base import Sae, TrainOutput
from pipeline.sae.sparse import bag_decode, batch_topk, split_flat, topk_encode
from pipeline.sae.topk import AuxRequest, sparse_train_output


class BatchCodes(NamedTuple):
    """A batch's BatchTopK codes as selected entries, ordered by token: [batch * k] each."""

    values: torch.Tensor
    tokens: torch.Tensor
    latents: torch.Tensor
    aux_values: torch.Tensor
    """[batch, k_aux]: the dead latents' codes for AuxK (k_aux 0 when there is no AuxK this step)"""
    aux_latents: torch.Tensor


BALANCE_HORIZON = 64
"""The firing rates behind the balanced selection average over about this many firings of an
average latent: batch_size * k / d_sae per step."""
BALANCED_FROM = 400
"""BatchTopK balances its selection by default where d_sae / k is at least this (`default_balance`)."""
BALANCE_CLIP = 8.0
"""A latent's rate over the mean rate is clipped to [1 / BALANCE_CLIP, BALANCE_CLIP] in its weight."""


class BatchTopKSae(Sae, architecture="batchtopk"):
    uses_k = True
    has_threshold = True
    selects_per_batch = True

    @staticmethod
    def default_balance(k: int, d_sae: int) -> float:
        """0.25 where an average latent fires less than once in BALANCED_FROM tokens (d_sae / k at
        least that), else 0. Where latents fire that rarely the balanced selection lowered both FVU and
        dead latents (k 16 16x and 32x: FVU 1.2 / 1.4 % lower, 0.22 / 0.63 % dead against 0.78 /
        1.78 %); where they fire more often few are dead without it and it cost 1-3 % FVU (the
        README's rule table)."""
        return 0.25 if d_sae >= BALANCED_FROM * k else 0.0

    def __init__(self, cfg, d_in, meta=None):
        super().__init__(cfg, d_in, meta)
        # each latent's firing rate per token: training state (in checkpoints), not in the saved file
        self.register_buffer("firing_rate", torch.full((self.d_sae,), cfg.k / self.d_sae))

    @staticmethod
    def default_aux_weight(k: int, d_sae: int) -> float:
        """k / 64, at least 0.5: a larger weight leaves fewer dead and silent latents, at an FVU cost
        that falls with k (none at k 64; the README's rule table)."""
        return max(0.5, k / 64)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor, variance: torch.Tensor, sparsity_scale: float = 1.0
    ) -> TrainOutput:
        aux = AuxRequest.of(self, dead_mask)
        codes = self.batch_codes(x, aux)
        x_hat = bag_decode(codes.values, codes.tokens, codes.latents, self.W_dec, len(x)) + self.b_dec
        fvu = M.fvu(x, x_hat, variance)
        loss, terms = aux.add_to(fvu, {"fvu": fvu.detach()}, self, x, x_hat, codes.aux_values, codes.aux_latents,
                                 variance)  # fmt: skip
        return sparse_train_output(x_hat, loss, terms, codes.values, codes.latents, self.d_sae, len(x))

    def batch_codes(self, x: torch.Tensor, aux: AuxRequest) -> BatchCodes:
        """The batch_size * k largest ReLU(pre) of x [batch, d_in] over the whole batch, weighed by
        `selection_weights` (and the dead latents' codes AuxK asks for)."""
        values, flat, aux_values, aux_latents = topk_encode(
            x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, aux.mask, aux.k_aux, per_batch=True,
            select_weights=self.selection_weights(),
        )  # fmt: skip
        return BatchCodes(values, *split_flat(flat, self.d_sae), aux_values, aux_latents)

    def selection_weights(self) -> torch.Tensor | None:
        """w [d_sae] = (rate / mean rate)^-balance, or None where balance is 0 (the plain selection)."""
        exponent = self.cfg.balance_exponent(self.d_in)
        if exponent == 0:
            return None
        relative = self.firing_rate / self.firing_rate.mean().clamp_min(1e-12)
        return relative.clamp(1 / BALANCE_CLIP, BALANCE_CLIP).pow(-exponent)

    @torch.no_grad()
    def observe_firing(self, counts: torch.Tensor, tokens: int) -> None:
        """Move the firing rates toward this batch's, counts [d_sae] over `tokens`: a moving average
        over about BALANCE_HORIZON firings of an average latent, whatever the batch size."""
        keep = math.exp(-tokens * self.cfg.k / (BALANCE_HORIZON * self.d_sae))
        self.firing_rate.mul_(keep).add_(counts.to(self.firing_rate.dtype), alpha=(1 - keep) / tokens)

    @torch.no_grad()
    def calibrate(self, sample: torch.Tensor, batch_size: int) -> None:
        """The inference thresholds on the final weights: the mean, over batches of `batch_size` tokens
        of the sample [n, d_in], of the smallest positive score the batch selection keeps (Bussmann et
        al.'s estimate), so that a token gets k latents on average; over each latent's selection
        weight where the selection is balanced. A running mean taken during training lagged the
        weights (held-out L0 27-29 at k 32 after 300 steps, 11 after 32)."""
        weights = self.selection_weights()
        smallest = []
        for x in sample.split(batch_size):
            if smallest and len(x) < batch_size:
                break  # a partial last batch: its selection is over fewer tokens
            scores = self.pre_acts(x.to(self.W_enc.device, self.W_enc.dtype))
            values, _ = batch_topk(scores if weights is None else scores * weights, self.cfg.k)
            smallest.append(torch.where(values > 0, values, torch.inf).min())
        smallest = torch.stack(smallest)
        positive = smallest[smallest.isfinite()]
        self.threshold.fill_(float(positive.mean()) if len(positive) else 0.0)
        if weights is not None:
            self.threshold.div_(weights)
