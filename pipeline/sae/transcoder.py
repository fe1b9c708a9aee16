"""Transcoders (Dunefsky et al. 2024, "Transcoders Find Interpretable LLM Feature Circuits") and skip
transcoders (Paulo et al. 2025, "Transcoders Beat Sparse Autoencoders for Interpretability").

A transcoder stands in for an MLP: it reads the MLP's input x (`blocks.L.mlp_in`, after the pre-MLP
norm) and predicts its output y (`blocks.L.mlp_out`) through TopK codes, as sparsify trains them:

    pre   = x @ W_enc + b_enc                       (no b_dec subtracted: b_dec lives in y's space)
    z     = TopK_k(ReLU(pre))
    y_hat = z @ W_dec + b_dec  (+ x @ W_skip)       W_skip [d_in, d_in], zero at init, with sae.skip
    loss  = FVU(y, y_hat) + aux_coefficient * AuxK

Its latents are read like an SAE's (encode(x)); its decoder rows are what each latent writes into the
residual stream. The skip term carries the MLP's linear part, so the latents are left the nonlinear
rest. y's width must be x's (both d_model for an MLP).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.sae.base import ForwardOutput, SaeConfig, TrainOutput
from pipeline.sae.topk import TopKSae


class Transcoder(TopKSae, architecture="transcoder"):
    transcodes = True

    def __init__(self, cfg: SaeConfig, d_in: int, meta: dict | None = None):
        super().__init__(cfg, d_in, meta)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_in))  # [d_in, d_out]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def direct(self, x: torch.Tensor) -> torch.Tensor | None:
        """The skip term x @ W_skip [..., d_in] (None without one)."""
        return x @ self.W_skip if self.cfg.skip else None

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        z = self.encode(x)
        y_hat = self.decode(z)
        direct = self.direct(x)
        return ForwardOutput(y_hat if direct is None else y_hat + direct, z)

    def training_forward(
        self,
        x: torch.Tensor,
        dead_mask: torch.Tensor,
        variance: torch.Tensor,
        sparsity_scale: float = 1.0,
        target: torch.Tensor | None = None,
    ) -> TrainOutput:
        """As TopK's, predicting `target` [batch, d_in] (the output hook's activations; `variance` is theirs)."""
        if target is None:
            raise ValueError("a transcoder trains on (input, target) pairs: pass the output hook's activations")
        no_offset = torch.zeros_like(self.b_dec)
        return self.topk_training(x, target, dead_mask, variance, no_offset, self.direct(x))

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        """b_dec at the geometric median of the targets `sample` [n, d_in]; with the `inputs` of the same
        tokens, each latent's encoder column is its decoder row pulled back through the least-squares
        linear map M of inputs onto targets (y ~ x M), at unit norm, and b_enc centres the
        pre-activations on the mean input. An SAE's W_enc = W_dec^T is the case M = identity; a random
        encoder instead leaves ~40 % of the latents dead (README, Transcoders)."""
        super().init_from_data(sample)
        if inputs is None:
            return
        x, y = inputs.float(), sample.float()
        linear = torch.linalg.lstsq((x - x.mean(0)).double(), (y - y.mean(0)).double()).solution.float()
        pulled = linear @ self.W_dec.t()  # [d_in, d_sae]: x . column = (x M) . decoder row
        self.W_enc.copy_(pulled / pulled.norm(dim=0, keepdim=True).clamp_min(1e-8))
        self.b_enc.copy_(-(x.mean(0) @ self.W_enc))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if getattr(self, "W_skip", None) is not None:
            self.W_skip.zero_()

    @torch.no_grad()
    def fold_input_scale(self, scale: float, out_scale: float | None = None) -> None:
        super().fold_input_scale(scale, out_scale)
        if self.cfg.skip:
            self.W_skip.mul_(scale / (scale if out_scale is None else out_scale))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().file_tensors(), **({"W_skip": self.W_skip} if self.cfg.skip else {})}
