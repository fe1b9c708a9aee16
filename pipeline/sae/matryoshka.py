"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders"; Nabeshima 2024).

The codes are BatchTopK's, chosen over the whole dictionary. The loss asks every prefix of the
dictionary to reconstruct on its own: with prefix sizes m_1 < ... < m_n = d_sae,

    x_hat_j = b_dec + z[:, :m_j] @ W_dec[:m_j]
    loss    = mean_j FVU(x, x_hat_j) + aux_coefficient * AuxK(x, x_hat_n)

so the first latents must carry the general directions on their own, and later ones refine them
instead of absorbing them (a "starts with s" latent that stops firing on "short" because a "short"
latent took over). The mean over the prefixes, not their sum (SAELens sums them), keeps AuxK's
weight what it is in BatchTopK. Inference is BatchTopK's: one threshold, saved as `threshold`.
"""

from __future__ import annotations

import torch

from pipeline import metrics as M
from pipeline.sae.base import TrainOutput
from pipeline.sae.batchtopk import BatchTopKSae
from pipeline.sae.sparse import bag_decode
from pipeline.sae.topk import AuxRequest, sparse_train_output

DEFAULT_LEVELS = 5
"""Default prefixes: d_sae / 16, / 8, / 4, / 2 and d_sae (each twice the one before)."""


def nested_widths(widths: list[int] | None, d_sae: int) -> list[int]:
    """The prefix sizes: `widths` (checked by SaeConfig) or the default doubling ones."""
    if widths is None:  # (a tiny dictionary has fewer levels: no empty prefix)
        return sorted({d_sae >> shift for shift in range(DEFAULT_LEVELS)} - {0})
    return [int(w) for w in widths]


class MatryoshkaBatchTopKSae(BatchTopKSae, architecture="matryoshka_batchtopk"):
    @staticmethod
    def default_balance(k: int, d_sae: int) -> float:
        """0: the nested loss asks the first latents to carry the frequent directions, and balancing
        the rates weakened the short prefixes (k 16 16x, 0.25: the first 576 latents' FVU 0.253
        against 0.241) while it lowered the whole dictionary's FVU by 6-8 % (the README's rule table)."""
        return 0.0

    @staticmethod
    def default_aux_weight(k: int, d_sae: int) -> float:
        """2 where a latent is expected to fire at least once in 200 tokens (d_sae / k <= 200: k 32 at
        8x and k 64 at 8x and 16x of a 576-wide model), 0.25 where it fires more rarely. Where it fires
        often the larger weight leaves fewer dead and silent latents at about equal FVU (k 64 16x: 0.79
        against 2.34 % dead); where rarely it costs 3-7 % FVU and neither weight reaches 1 % dead (k 32
        32x: 1.80 against 2.16 %, k 64 32x: 1.16 against 2.40 %; the README's rule table)."""
        return 2.0 if d_sae <= 200 * k else 0.25

    def __init__(self, cfg, d_in, meta=None):
        super().__init__(cfg, d_in, meta)
        # the prefix sizes on the weights' device (built per step, a blocking copy to the GPU each time)
        self.register_buffer("width_bounds", torch.tensor(self.nested_widths()), persistent=False)

    def nested_widths(self) -> list[int]:
        return nested_widths(self.cfg.matryoshka_widths, self.d_sae)

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor, variance: torch.Tensor, sparsity_scale: float = 1.0
    ) -> TrainOutput:
        aux = AuxRequest.of(self, dead_mask)
        codes = self.batch_codes(x, aux)
        widths = self.nested_widths()
        # each group's part of each token's reconstruction [groups, batch, d_in]: one bag per (group, token)
        group = torch.bucketize(codes.latents, self.width_bounds, right=True)
        bags, order = (group * len(x) + codes.tokens).sort()
        parts = bag_decode(codes.values[order], bags, codes.latents[order], self.W_dec, len(widths) * len(x))
        prefixes = self.b_dec + parts.view(len(widths), len(x), -1).cumsum(0)  # prefix j: groups 0..j
        fvus = [M.fvu(x, x_hat, variance) for x_hat in prefixes]
        terms = {"fvu": fvus[-1].detach(), **{f"fvu_{w}": f.detach() for w, f in zip(widths[:-1], fvus, strict=False)}}
        x_hat = prefixes[-1]
        loss, terms = aux.add_to(torch.stack(fvus).mean(), terms, self, x, x_hat, codes.aux_values, codes.aux_latents,
                                 variance)  # fmt: skip
        return sparse_train_output(x_hat, loss, terms, codes.values, codes.latents, self.d_sae, len(x))
