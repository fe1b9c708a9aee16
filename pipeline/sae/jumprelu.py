"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead").

    z = pre * H(pre - theta)               theta = exp(log_threshold) > 0, one per latent
    loss = sum_d (x - x_hat)^2 + l0_coefficient * sum_i H(pre_i - theta_i)       (mean over tokens)
The step function H has no gradient with respect to theta; straight-through estimators with a
rectangle kernel of width `bandwidth` supply one (paper, eq. 11-12):
    d z / d theta      = -(theta / eps) * K((pre - theta) / eps)
    d H / d theta      = -(1 / eps) * K((pre - theta) / eps),     K(u) = 1{|u| < 1/2}
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline import metrics as M
from pipeline.sae.base import Sae, TrainOutput, dense_train_output


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_threshold.sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0), None


class JumpReluSae(Sae, architecture="jumprelu"):
    has_threshold = True

    def __init__(self, cfg, d_in, meta=None):
        super().__init__(cfg, d_in, meta)
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        # log_threshold is what training moves; the `threshold` buffer is its copy for the file, made
        # when saving (reading the buffer here measured a trained dictionary with its initial thresholds)
        return pre * (pre > self.log_threshold.exp())

    def latent_parameters(self) -> list[tuple[nn.Parameter, int]]:
        return [*super().latent_parameters(), (self.log_threshold, 0)]

    def file_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.threshold.copy_(self.log_threshold.exp())
        return super().file_tensors()

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_file_tensors(tensors)
        self.log_threshold.copy_(self.threshold.clamp_min(1e-12).log())

    @torch.no_grad()
    def fold_input_scale(self, scale: float, out_scale: float | None = None) -> None:
        super().fold_input_scale(scale, out_scale)
        self.log_threshold.sub_(math.log(scale if out_scale is None else out_scale))

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor, variance: torch.Tensor, sparsity_scale: float = 1.0
    ) -> TrainOutput:
        pre = self.pre_acts(x)
        threshold = self.log_threshold.exp()
        bandwidth = self.cfg.jumprelu_bandwidth
        z = _JumpReLU.apply(pre, threshold, bandwidth)
        x_hat = self.decode(z)
        fvu = M.fvu(x, x_hat, variance)
        reconstruction = fvu * variance  # sum over dimensions of the squared error, mean over tokens
        l0 = _Step.apply(pre, threshold, bandwidth).sum(1).mean()
        loss = reconstruction + sparsity_scale * self.cfg.l0_coefficient * l0
        terms = {
            "mse_sum": reconstruction.detach(),
            "l0_penalty": l0.detach(),
            "fvu": fvu.detach(),
        }
        return dense_train_output(x_hat, loss, terms, z)
