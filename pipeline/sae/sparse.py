"""Sparse kernels for TopK and BatchTopK training: never a dense [batch, d_sae] code matrix in the
backward pass.

`topk_encode` computes the dense pre-activations (the one unavoidable matmul), keeps the k largest
per token (plus, for the AuxK loss, the k_aux largest among dead latents) and, in the backward pass,
builds gradients only from those selected entries:
    dW_enc = x_c^T G,  db_enc = colsum(G),  db_dec = -W_enc colsum(G)    (x_c = x - b_dec)
with G sparse, k (+ k_aux) entries per row, multiplied as a CSR matrix. With `per_batch` (BatchTopK)
it keeps the batch * k largest entries of the whole batch instead: a token gets any number.
`sparse_decode` is an embedding bag over decoder rows: x_hat = sum_j z_j W_dec[i_j] (+ b_dec);
`bag_decode` sums entries into any bags (tokens, or a token's latents of one nested group).
All are checked against dense reference implementations in tests/test_sae.py.
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


CANDIDATES_PER_K = 2
"""`batch_topk` sets its floor from each token's CANDIDATES_PER_K * k largest entries."""


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, flat indices row * d_sae + col, ascending) of the batch * k largest entries of pre
    [batch, d_sae] over the whole batch.

    One search over the whole matrix is a single long selection (10x a per-row top-k on a CPU).
    Instead: the n-th largest of each row's m largest is a floor at or below the batch's n-th largest
    (it is the n-th largest of a subset), so the entries at or above it hold the n largest. They lie
    among the rows' candidates, except in rows whose m candidates all reach the floor (a few tokens
    take far more than k latents); only those rows are searched whole. The n largest are then picked
    among the entries found."""
    batch, d_sae = pre.shape
    n, m = k * batch, min(d_sae, CANDIDATES_PER_K * k)
    candidates, columns = pre.topk(m, dim=1, sorted=False)  # [batch, m]
    floor = candidates.flatten().topk(n, sorted=False).values.min()
    whole = (candidates.min(1).values >= floor).nonzero().squeeze(1)  # rows that may hold more
    found = candidates >= floor
    found[whole] = False
    token = torch.arange(batch, device=pre.device).unsqueeze(1)
    whole_rows, whole_cols = (pre[whole] >= floor).nonzero().unbind(1)
    flat = torch.cat([(token * d_sae + columns)[found], whole[whole_rows] * d_sae + whole_cols])
    values = torch.cat([candidates[found], pre[whole[whole_rows], whole_cols]])
    if len(flat) > n:
        values, kept = values.topk(n, sorted=False)
        flat = flat[kept]
    flat, order = flat.sort()
    return values[order], flat


def split_flat(flat: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, latents) of `batch_topk`'s flat indices token * d_sae + latent."""
    return flat.div(d_sae, rounding_mode="floor"), flat.remainder(d_sae)


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, per_batch: bool, dead_mask, k_aux: int, select_weights):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc)  # [batch, d_sae]
        # per token: [batch, k]; per batch: [batch * k] flat indices (row * d_sae + col), ascending
        if not per_batch:
            values, indices = pre.topk(k, dim=1, sorted=False)
        elif select_weights is None:
            values, indices = batch_topk(pre, k)
        else:  # chosen by weighted score (one more [batch, d_sae] matrix for the search), coded by pre itself
            indices = batch_topk(pre * select_weights, k)[1]
            values = pre.flatten()[indices]
        if dead_mask is not None and k_aux > 0:
            aux_values, aux_indices = dead_topk(pre, dead_mask, k_aux, overwrite=True)  # pre is not needed after
            aux_values = aux_values.clamp_min(0)  # ReLU
        else:
            aux_values = values.new_zeros(len(x), 0)
            aux_indices = indices.new_zeros(len(x), 0)
        values = values.clamp_min(0)
        ctx.per_batch = per_batch
        ctx.save_for_backward(x_c, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):
        x_c, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        batch, d_sae = len(x_c), W_enc.shape[1]
        token = torch.arange(batch, device=x_c.device)
        if ctx.per_batch:
            rows, cols = split_flat(indices, d_sae)
        else:
            rows, cols = token.repeat_interleave(indices.shape[1]), indices.flatten()
        rows = torch.cat([rows, token.repeat_interleave(aux_indices.shape[1])])
        cols = torch.cat([cols, aux_indices.flatten()])
        grads = torch.cat([(grad_values * (values > 0)).flatten(), (grad_aux * (aux_values > 0)).flatten()])
        grads = grads.to(x_c.dtype)
        grad_b_enc = torch.zeros(d_sae, dtype=grads.dtype, device=grads.device).index_add_(0, cols, grads)
        grad_W_enc = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = (_transposed_csr(rows, cols, grads, (batch, d_sae)) @ x_c).t()  # [d_in, d_sae]
        # x - b_dec feeds every token: d loss / d b_dec = -sum_t G[t] W_enc^T = -W_enc @ colsum(G)
        grad_b_dec = -(W_enc.to(grads.dtype) @ grad_b_enc) if ctx.needs_input_grad[1] else None
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None, None, None


def topk_encode(
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dead_mask: torch.Tensor | None = None,
    k_aux: int = 0,
    per_batch: bool = False,
    select_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest ReLU(pre) per token, and of the k_aux largest dead ones.

    x: [batch, d_in] data (no gradient is returned for it); returns [batch, k] and [batch, k_aux].
    per_batch (BatchTopK): the batch * k largest over the whole batch instead, as values and flat
    indices (token * d_sae + latent, ascending) [batch * k]; with select_weights [d_sae], the entries
    of the largest pre * select_weights (balanced selection), their values still pre.
    """
    return _SparseEncode.apply(x, b_dec, W_enc, b_enc, k, per_batch, dead_mask, k_aux, select_weights)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]]: [batch, m] codes -> [batch, d_in] (no bias)."""
    if indices.shape[1] == 0:
        return values.new_zeros(len(values), W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def bag_decode(
    values: torch.Tensor, bags: torch.Tensor, latents: torch.Tensor, W_dec: torch.Tensor, n_bags: int
) -> torch.Tensor:
    """[n_bags, d_in]: bag b sums values[j] * W_dec[latents[j]] over the entries j with bags[j] = b
    (values, bags, latents [n]; bags ascending; a bag without entries is 0)."""
    counts = torch.zeros(n_bags, dtype=torch.long, device=bags.device)
    counts.index_add_(0, bags, torch.ones_like(bags))
    offsets = counts.cumsum(0) - counts  # where each bag's entries start
    return F.embedding_bag(latents, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")
