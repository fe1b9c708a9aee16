"""Every metric of the pipeline, defined once (see DESIGN.md).

L0   = mean over tokens of the number of non-zero latents
FVU  = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2     (whole-vector; explained variance = 1 - FVU)
FVU per dimension = mean over dimensions d of  sum_t (x_td - x_hat_td)^2 / sum_t (x_td - mean_d)^2
"""

from __future__ import annotations

import torch


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """sum ||x - mean(x)||^2 over the batch: [batch, d] -> scalar."""
    return (x - x.mean(0)).pow(2).sum()


def token_variance(x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x - mean(x)||^2 (the FVU denominator per token)."""
    return total_variance(x) / len(x)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, whole-vector definition."""
    return (x - x_hat).pow(2).sum() / total_variance(x)


def fvu_per_dimension(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """FVU computed per dimension, then averaged over dimensions."""
    return ((x - x_hat).pow(2).sum(0) / (x - x.mean(0)).pow(2).sum(0).clamp_min(1e-12)).mean()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x - x_hat||^2 / d (mean squared error per element)."""
    return (x - x_hat).pow(2).mean()


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero latents per token: [batch, d_sae] -> scalar."""
    return (codes != 0).sum(-1).float().mean()
