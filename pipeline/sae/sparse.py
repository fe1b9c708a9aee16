"""Sparse kernels for TopK training: never a dense [batch, d_sae] code matrix in the backward pass.

`topk_encode` computes the dense pre-activations (the one unavoidable matmul), keeps the k largest
per token (plus, for the AuxK loss, the k_aux largest among dead latents) and, in the backward pass,
builds gradients only from those selected entries:
    dW_enc = x_c^T G,  db_enc = colsum(G),  db_dec = -W_enc colsum(G)    (x_c = x - b_dec)
with G sparse, k (+ k_aux) entries per row, multiplied as a CSR matrix.
`sparse_decode` is an embedding bag over decoder rows: x_hat = sum_j z_j W_dec[i_j] (+ b_dec).
Both are checked against dense reference implementations in tests/test_sae.py.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _transposed_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
    """The transpose of the sparse [batch, d_sae] matrix with entries (rows, cols, values), as CSR."""
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(shape[1] + 1, dtype=torch.long, device=cols.device)
    # counts by scatter-add, not bincount: bincount reads its input's max back to the host (a GPU sync per step)
    crow[1:] = torch.zeros_like(crow[1:]).index_add_(0, cols, torch.ones_like(cols)).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": the matmul used here is well supported
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, rows[order], values[order], (shape[1], shape[0]), check_invariants=False
        )


GATHER_DEAD_SHARE = 0.25
"""`dead_topk` gathers the dead latents' columns up to this share of the dictionary, else masks the rest."""


def dead_topk(
    pre: torch.Tensor, dead_mask: torch.Tensor, k_aux: int, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [batch, min(k_aux, n_dead)] of the largest pre-activations [batch, d_sae]
    among the dead latents (dead_mask [d_sae]), for AuxK.

    Few dead latents (training's usual state) are gathered first: a topk over their columns alone
    costs a tenth of masking and searching the whole matrix on a CPU (60 of 600 ms of a 16x step).
    Many (early training) are masked, in place when `overwrite` allows it (no copy of `pre`)."""
    dead = dead_mask.nonzero().squeeze(1)  # one host sync: topk's size needs the count anyway
    n = min(k_aux, len(dead))
    if len(dead) <= GATHER_DEAD_SHARE * len(dead_mask):
        values, columns = pre.index_select(1, dead).topk(n, dim=1, sorted=False)
        return values, dead[columns]
    masked = pre.masked_fill_ if overwrite else pre.masked_fill
    return masked(~dead_mask, float("-inf")).topk(n, dim=1, sorted=False)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, dead_mask, k_aux: int):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc)  # [batch, d_sae]
        values, indices = pre.topk(k, dim=1, sorted=False)
        if dead_mask is not None and k_aux > 0:
            aux_values, aux_indices = dead_topk(pre, dead_mask, k_aux, overwrite=True)  # pre is not needed after
            aux_values = aux_values.clamp_min(0)  # ReLU
        else:
            aux_values = values.new_zeros(len(values), 0)
            aux_indices = indices.new_zeros(len(values), 0)
        values = values.clamp_min(0)
        ctx.save_for_backward(x_c, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):
        x_c, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        batch, d_sae = len(x_c), W_enc.shape[1]
        cols = torch.cat([indices, aux_indices], 1).flatten()
        grads = (
            torch.cat([grad_values * (values > 0), grad_aux * (aux_values > 0)], 1).flatten().to(x_c.dtype)
        )
        grad_b_enc = torch.zeros(d_sae, dtype=grads.dtype, device=grads.device).index_add_(0, cols, grads)
        grad_W_enc = None
        if ctx.needs_input_grad[2]:
            rows = torch.arange(batch, device=x_c.device).repeat_interleave(
                indices.shape[1] + aux_indices.shape[1]
            )
            grad_W_enc = (_transposed_csr(rows, cols, grads, (batch, d_sae)) @ x_c).t()  # [d_in, d_sae]
        # x - b_dec feeds every token: d loss / d b_dec = -sum_t G[t] W_enc^T = -W_enc @ colsum(G)
        grad_b_dec = -(W_enc.to(grads.dtype) @ grad_b_enc) if ctx.needs_input_grad[1] else None
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None


def topk_encode(
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dead_mask: torch.Tensor | None = None,
    k_aux: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest ReLU(pre) per token, and of the k_aux largest dead ones.

    x: [batch, d_in] data (no gradient is returned for it); returns [batch, k] and [batch, k_aux].
    """
    return _TopKEncode.apply(x, b_dec, W_enc, b_enc, k, dead_mask, k_aux)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]]: [batch, m] codes -> [batch, d_in] (no bias)."""
    if indices.shape[1] == 0:
        return values.new_zeros(len(values), W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
