"""ReLU SAE with the L1 penalty weighted by decoder norms (Anthropic, "Circuits Updates", April 2024).

    z = ReLU(pre)
    loss = sum_d (x - x_hat)^2 + l1_coefficient * sum_i z_i * ||W_dec,i||     (mean over tokens)
Decoder rows are not constrained to unit norm (the penalty keeps the norms in check); they start
at norm 0.1, the encoder at the decoder's transpose. The L1 weight warms up over training.
"""

from __future__ import annotations

import torch

from pipeline import metrics as M
from pipeline.sae.base import Sae, TrainOutput, dense_train_output

INIT_DECODER_NORM = 0.1


class ReluSae(Sae, architecture="relu"):
    unit_norm_decoder = False  # the norm-weighted L1 penalty keeps decoder norms meaningful

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        self.W_dec.mul_(INIT_DECODER_NORM)
        self.W_enc.mul_(INIT_DECODER_NORM)

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor, variance: torch.Tensor, sparsity_scale: float = 1.0
    ) -> TrainOutput:
        z = self.encode(x)
        x_hat = self.decode(z)
        fvu = M.fvu(x, x_hat, variance)
        reconstruction = fvu * variance  # sum over dimensions of the squared error, mean over tokens
        sparsity = (z * self.W_dec.norm(dim=1)).sum(1).mean()
        loss = reconstruction + sparsity_scale * self.cfg.l1_coefficient * sparsity
        terms = {
            "mse_sum": reconstruction.detach(),
            "l1": sparsity.detach(),
            "fvu": fvu.detach(),
        }
        return dense_train_output(x_hat, loss, terms, z)
