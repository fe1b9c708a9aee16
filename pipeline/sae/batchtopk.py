"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the batch_size * k largest ReLU(pre) over the whole batch, so tokens get a variable
number of latents (k on average). The loss is TopK's (FVU + AuxK), on the same sparse kernels
(`sparse.py`). For inference a single threshold replaces the batch selection: the running mean of
the smallest selected activation, estimated during training and saved as `threshold`
(z = pre where pre > threshold, as JumpReLU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline import metrics as M
from pipeline.sae.base import Sae, TrainOutput
from pipeline.sae.sparse import bag_decode, split_flat, topk_encode
from pipeline.sae.topk import AuxRequest, sparse_train_output

THRESHOLD_MOMENTUM = 0.99


class BatchCodes(NamedTuple):
    """A batch's BatchTopK codes as selected entries, ordered by token: [batch * k] each."""

    values: torch.Tensor
    tokens: torch.Tensor
    latents: torch.Tensor
    aux_values: torch.Tensor
    """[batch, k_aux]: the dead latents' codes for AuxK (k_aux 0 when there is no AuxK this step)"""
    aux_latents: torch.Tensor


class BatchTopKSae(Sae, architecture="batchtopk"):
    uses_k = True
    has_threshold = True

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
        """The batch_size * k largest ReLU(pre) of x [batch, d_in] over the whole batch (and the dead
        latents' codes AuxK asks for); updates the inference threshold."""
        values, flat, aux_values, aux_latents = topk_encode(
            x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, aux.mask, aux.k_aux, per_batch=True
        )
        self._update_threshold(values)
        return BatchCodes(values, *split_flat(flat, self.d_sae), aux_values, aux_latents)

    @torch.no_grad()
    def _update_threshold(self, selected: torch.Tensor) -> None:
        """Move the threshold toward the smallest positive selected code (no host sync: a batch
        without one leaves it unchanged through `where`, not through a branch)."""
        smallest = torch.where(selected > 0, selected, torch.inf).min().to(self.threshold.dtype)
        ema = THRESHOLD_MOMENTUM * self.threshold + (1 - THRESHOLD_MOMENTUM) * smallest
        new = torch.where(self.threshold[0] > 0, ema, smallest)
        self.threshold.copy_(torch.where(smallest.isfinite(), new, self.threshold))
