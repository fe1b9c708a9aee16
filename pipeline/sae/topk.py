"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = TopK_k(ReLU(pre))            keep the k largest activations per token
    loss = FVU(x, x_hat) + aux_coefficient * AuxK
    AuxK = min(n_dead / k_aux, 1) * ||r - e_hat||^2 / sum ||x - mean x||^2,
           e_hat = decoder of the k_aux largest pre-activations among dead latents (no bias),
           r = e / sqrt(FVU), e = x - x_hat: the residual scaled to the input's variance
           (sae.aux_rescale; false: r = e, Gao et al.'s)
Dead latents learn the residual's directions at the size of a live latent's code, so that they win
places in the top k: with r = e their codes stay a residual's size, below the k-th largest live one
(measured in the README's rule table).
Training runs on the sparse kernels of `sparse.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import metrics as M
from pipeline.sae.base import Sae, TrainOutput
from pipeline.sae.sparse import sparse_decode, topk_encode


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense codes keeping the k largest of ReLU(pre) per row."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values.clamp_min(0))


def auxk_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    e_hat: torch.Tensor,
    n_dead: torch.Tensor,
    k_aux: int,
    variance: torch.Tensor,
    rescale: bool = True,
) -> torch.Tensor:
    """Gao et al.'s auxiliary loss: dead latents learn to model the main reconstruction's residual
    (`rescale`: scaled to the input's variance, as the module docstring says)."""
    residual = (x - x_hat).detach()
    if rescale:
        residual = residual * (variance / residual.pow(2).sum(-1).mean().clamp_min(1e-12)).sqrt()
    scale = (n_dead.float() / k_aux).clamp(max=1.0)
    return scale * (e_hat - residual).pow(2).sum(-1).mean() / variance


class TopKSae(Sae, architecture="topk"):
    uses_k = True

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_activation(pre, self.cfg.k)

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor, variance: torch.Tensor, sparsity_scale: float = 1.0
    ) -> TrainOutput:
        return self.topk_training(x, x, dead_mask, variance, self.b_dec)

    def topk_training(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor,
        variance: torch.Tensor,
        offset: torch.Tensor,
        direct: torch.Tensor | None = None,
    ) -> TrainOutput:
        """TopK codes of x - offset, the loss of their reconstruction (+ `direct`) of target [batch, d_in]
        (an SAE: x itself; a transcoder: another hook's activations) and AuxK."""
        aux = AuxRequest.of(self, dead_mask)
        values, indices, aux_values, aux_indices = topk_encode(
            x, offset, self.W_enc, self.b_enc, self.cfg.k, aux.mask, aux.k_aux
        )
        x_hat = sparse_decode(values, indices, self.W_dec) + self.b_dec
        if direct is not None:
            x_hat = x_hat + direct
        fvu = M.fvu(target, x_hat, variance)
        loss, terms = aux.add_to(fvu, {"fvu": fvu.detach()}, self, target, x_hat, aux_values, aux_indices, variance)
        return sparse_train_output(x_hat, loss, terms, values, indices, self.d_sae, len(x))


@dataclass
class AuxRequest:
    """Whether and how a training step of a TopK-coded dictionary computes AuxK."""

    mask: torch.Tensor | None
    """The dead latents [d_sae] bool, or None: no AuxK this step (none dead, or weight 0)."""
    n_dead: torch.Tensor
    k_aux: int
    weight: float
    """AuxK's weight in the loss, resolved once per step."""

    @classmethod
    def of(cls, sae: Sae, dead_mask: torch.Tensor) -> AuxRequest:
        n_dead, weight = dead_mask.sum(), sae.cfg.aux_weight(sae.d_in)
        use = bool(n_dead > 0) and weight > 0  # one host sync, only to skip work
        return cls(dead_mask if use else None, n_dead, sae.cfg.aux_latents(sae.d_in), weight)

    def add_to(self, loss: torch.Tensor, terms: dict, sae: Sae, target: torch.Tensor, x_hat: torch.Tensor,
               aux_values: torch.Tensor, aux_indices: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, dict]:  # fmt: skip
        """`loss` plus the weighted AuxK of the dead latents' codes [batch, k_aux], with its term."""
        if self.mask is None:
            return loss, terms
        e_hat = sparse_decode(aux_values, aux_indices, sae.W_dec)
        aux = auxk_loss(target, x_hat, e_hat, self.n_dead, self.k_aux, variance, sae.cfg.aux_rescale)
        return loss + self.weight * aux, {**terms, "auxk": aux.detach()}


def sparse_train_output(x_hat: torch.Tensor, loss: torch.Tensor, terms: dict, values: torch.Tensor,
                        latents: torch.Tensor, d_sae: int, batch: int) -> TrainOutput:  # fmt: skip
    """TrainOutput of codes given as selected entries: values and their latents (any shape alike)."""
    active = values > 0
    # counted by index_add, not latents[active]: a boolean-mask gather waits for the GPU every step
    fired = torch.zeros(d_sae, dtype=torch.int32, device=latents.device)
    fired.index_add_(0, latents.flatten(), active.flatten().to(torch.int32))
    return TrainOutput(x_hat, loss, terms, fired, active.sum().float() / batch)
