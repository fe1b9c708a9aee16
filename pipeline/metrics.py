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


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting tokens[:, t+1] from logits[:, t]: [batch, seq-1]."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().long(), reduction="none"
    ).view(tokens.shape[0], -1)


def kl_clean_to_spliced(clean_logits: torch.Tensor, spliced_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || spliced) of the next-token distributions per position: [batch, seq]."""
    clean = clean_logits.float().log_softmax(-1)
    spliced = spliced_logits.float().log_softmax(-1)
    return (clean.exp() * (clean - spliced)).sum(-1)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean): 1 for a perfect reconstruction, 0 for zeros."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


class StreamingReconstructionStats:
    """The metrics above accumulated over many batches (float64 sums), for held-out evaluation."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        self.n += len(x)
        self.sq_err += (x - x_hat).pow(2).sum().double()
        self.sum_x += x.sum(0).double()
        self.sum_sq += x.pow(2).sum().double()
        self.active += (codes != 0).sum().double()
        self.fired |= (codes != 0).any(0)

    def fvu(self) -> float:
        """Whole-vector FVU over everything seen: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
        return float(self.sq_err / (self.sum_sq - self.sum_x.pow(2).sum() / self.n))

    def l0(self) -> float:
        return float(self.active / self.n)

    def never_fired_fraction(self) -> float:
        return float((~self.fired).float().mean())
