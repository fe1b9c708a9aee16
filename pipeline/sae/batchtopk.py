"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the batch_size * k largest ReLU(pre) over the whole batch, so tokens get a variable
number of latents (k on average). The loss is TopK's (FVU + AuxK). For inference a single
threshold replaces the batch selection: the running mean of the smallest selected activation,
estimated during training and saved as `threshold` (z = pre where pre > threshold, as JumpReLU).
"""

from __future__ import annotations

import torch

from pipeline import metrics as M
from pipeline.sae.base import Sae, TrainOutput, dense_train_output
from pipeline.sae.sparse import dead_topk
from pipeline.sae.topk import auxk_loss

THRESHOLD_MOMENTUM = 0.99


class BatchTopKSae(Sae, architecture="batchtopk"):
    uses_k = True
    has_threshold = True

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor, variance: torch.Tensor, sparsity_scale: float = 1.0
    ) -> TrainOutput:
        pre = self.pre_acts(x).relu()  # [batch, d_sae]
        z = self.batch_topk(pre)
        x_hat = z @ self.W_dec + self.b_dec
        fvu = M.fvu(x, x_hat, variance)
        loss, terms = self.with_auxk(fvu, {"fvu": fvu.detach()}, x, x_hat, pre, dead_mask, variance)
        return dense_train_output(x_hat, loss, terms, z)

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense codes keeping the batch_size * k largest of pre [batch, d_sae] (>= 0) over the whole
        batch; updates the inference threshold."""
        values, flat = pre.flatten().topk(self.cfg.k * len(pre), sorted=False)
        self._update_threshold(values)
        return torch.zeros_like(pre).flatten().scatter_(0, flat, values).view_as(pre)

    def with_auxk(self, loss: torch.Tensor, terms: dict, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                  dead_mask: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, dict]:  # fmt: skip
        """`loss` plus AuxK on the dead latents (TopK's), with its term."""
        n_dead = dead_mask.sum()
        k_aux = self.cfg.aux_latents(self.d_in)
        if bool(n_dead > 0) and self.cfg.aux_coefficient > 0:
            aux_values, aux_idx = dead_topk(pre, dead_mask, k_aux)
            e_hat = torch.zeros_like(pre).scatter_(1, aux_idx, aux_values) @ self.W_dec
            aux = auxk_loss(x, x_hat, e_hat, n_dead, k_aux, variance, self.cfg.aux_rescale)
            loss = loss + self.cfg.aux_coefficient * aux
            terms = {**terms, "auxk": aux.detach()}
        return loss, terms

    @torch.no_grad()
    def _update_threshold(self, selected: torch.Tensor) -> None:
        positive = selected[selected > 0]
        if len(positive):
            smallest = positive.min().to(self.threshold.dtype)
            initialized = self.threshold[0] > 0
            new = torch.where(
                initialized,
                THRESHOLD_MOMENTUM * self.threshold + (1 - THRESHOLD_MOMENTUM) * smallest,
                smallest,
            )
            self.threshold.copy_(new.expand_as(self.threshold))
