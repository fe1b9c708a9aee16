"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the batch_size * k largest ReLU(pre) over the whole batch, so tokens get a variable
number of latents (k on average). The loss is TopK's (FVU + AuxK), on the same sparse kernels
(`sparse.py`). For inference a single threshold replaces the batch selection: the mean over batches
of the smallest selected code, estimated on the final weights when the dictionary is saved
(`calibrate`) and saved as `threshold` (z = pre where pre > threshold, as JumpReLU).
"""

from __future__ import annotations

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


class BatchTopKSae(Sae, architecture="batchtopk"):
    uses_k = True
    has_threshold = True

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
        """The batch_size * k largest ReLU(pre) of x [batch, d_in] over the whole batch (and the dead
        latents' codes AuxK asks for)."""
        values, flat, aux_values, aux_latents = topk_encode(
            x, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, aux.mask, aux.k_aux, per_batch=True
        )
        return BatchCodes(values, *split_flat(flat, self.d_sae), aux_values, aux_latents)

    @torch.no_grad()
    def calibrate(self, sample: torch.Tensor, batch_size: int) -> None:
        """The inference threshold on the final weights: the mean, over batches of `batch_size` tokens of
        the sample [n, d_in], of the smallest positive code the batch selection keeps (Bussmann et
        al.'s estimate), so that a token gets k latents on average. A running mean taken during
        training lagged the weights (held-out L0 27-29 at k 32 after 300 steps, 11 after 32)."""
        smallest = []
        for x in sample.split(batch_size):
            if smallest and len(x) < batch_size:
                break  # a partial last batch: its selection is over fewer tokens
            values, _ = batch_topk(self.pre_acts(x.to(self.W_enc.device, self.W_enc.dtype)), self.cfg.k)
            smallest.append(torch.where(values > 0, values, torch.inf).min())
        smallest = torch.stack(smallest)
        positive = smallest[smallest.isfinite()]
        self.threshold.fill_(float(positive.mean()) if len(positive) else 0.0)
