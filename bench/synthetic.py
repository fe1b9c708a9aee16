"""Synthetic SAE training data shared by the training benchmarks: sparse combinations of random
directions plus noise, so reconstruction quality (FVU) means something."""

from __future__ import annotations

import torch

D_IN, D_SAE, K, BATCH = 576, 9216, 32, 4096


def synthetic_activations(
    n_tokens: int, seed: int = 0, n_features: int = 4096, d_in: int = D_IN, active: int = 24, device: str = "cpu"
) -> torch.Tensor:
    """[n_tokens, d_in]: each token `active` random unit directions out of `n_features`, with
    exponential magnitudes, plus noise and a mean offset; made on `device` in chunks of rows."""
    gen = torch.Generator(device).manual_seed(seed)
    basis = torch.randn(n_features, d_in, generator=gen, device=device)
    basis /= basis.norm(dim=1, keepdim=True)
    out = torch.empty(n_tokens, d_in, device=device)
    for start in range(0, n_tokens, 8192):
        n = min(8192, n_tokens - start)
        idx = torch.randint(0, n_features, (n, active), generator=gen, device=device)
        mags = torch.empty(n, active, device=device).exponential_(generator=gen)
        out[start : start + n] = torch.einsum("nk,nkd->nd", mags, basis[idx]) + 0.05 * torch.randn(
            n, d_in, generator=gen, device=device
        )
    return out + 0.5  # a mean offset, as real residual streams have


def heldout_fvu(reconstruct, data: torch.Tensor) -> float:
    """Whole-vector FVU of `reconstruct` (fp32 batches -> reconstructions) on `data`."""
    with torch.no_grad():
        x_hat = torch.cat([reconstruct(data[i : i + BATCH]) for i in range(0, len(data), BATCH)])
    return float((data - x_hat).pow(2).sum() / (data - data.mean(0)).pow(2).sum())
