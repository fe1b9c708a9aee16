"""Per-feature statistics gathered in one streaming pass over a dictionary's codes.

Memory is bounded by the number of latents, never by the number of tokens:
  FeatureStats   firing count, activation sum and max, a log2-binned activation histogram
  TopExamples    the m highest-keyed firing positions per latent with the latent's activation on
                 their context; key = activation gives the top-activating examples, key = a random
                 number gives a uniform sample of the latent's firings (Efraimidis-Spirakis)
  Coactivation   how often two latents fire on the same token, on a sample of tokens, and the lift
                 of each pair over independence
  DimensionCorrelation  the model dimensions each latent's activation correlates with
Batches are whole windows of `ctx` tokens, so a context never crosses the window it came from.
`feature_pass` runs a dictionary's encoder over stored activations and feeds all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from pipeline.shards import ShardSet


def firing_entries(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token row, latent, activation) of every non-zero code of codes [tokens, d_sae]."""
    rows, latents = (codes > 0).nonzero(as_tuple=True)
    return rows, latents, codes[rows, latents]


class FeatureStats:
    """Firing count, activation sum / max and an activation histogram per latent."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu", bins: int = 48):
        self.tokens = 0
        self.count = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, device=device)
        self.bins = bins
        self.histogram = torch.zeros(d_sae, bins, dtype=torch.long, device=device)
        self.log2_low: float | None = None  # bin edges: log2_low + 0.5 * i (set by the first batch)

    def update(self, n_tokens: int, latents: torch.Tensor, acts: torch.Tensor) -> None:
        self.tokens += n_tokens
        self.count += torch.bincount(latents, minlength=len(self.count))
        self.sum.index_add_(0, latents, acts.double())
        self.max.scatter_reduce_(0, latents, acts, reduce="amax")
        if self.log2_low is None and len(acts):
            self.log2_low = math.ceil(math.log2(float(acts.max()) * 4)) - self.bins / 2
        if self.log2_low is not None:
            bins = ((acts.log2() - self.log2_low) * 2).floor().long().clamp(0, self.bins - 1)
            flat = self.histogram.view(-1)
            flat += torch.bincount(latents * self.bins + bins, minlength=flat.numel())

    def edges(self) -> list[float]:
        low = self.log2_low if self.log2_low is not None else 0.0
        return [2 ** (low + 0.5 * i) for i in range(self.bins + 1)]


class TopExamples:
    """The `m` highest-keyed firings of each latent, kept exactly by merging each batch's candidates
    (only firings above the latent's current m-th key) with the current best."""

    def __init__(self, d_sae: int, m: int, before: int, after: int, device: torch.device | str = "cpu"):
        self.m, self.before, self.after = m, before, after
        self.key = torch.full((d_sae, m), -math.inf, device=device)
        self.token = torch.full((d_sae, m), -1, dtype=torch.long, device=device)  # global token index
        self.act = torch.zeros(d_sae, m, device=device)
        # the latent's activation on tokens [token - before, token + after]; float16 is exact enough to show
        self.context = torch.zeros(d_sae, m, before + 1 + after, dtype=torch.float16, device=device)

    def update(
        self,
        rows: torch.Tensor,
        latents: torch.Tensor,
        keys: torch.Tensor,
        acts: torch.Tensor,
        codes: torch.Tensor,
        first_token: int,
        ctx: int,
    ) -> None:
        """Merge this batch's firings (rows of codes [tokens, d_sae], starting at global `first_token`)."""
        take = keys > self.key[latents, -1]
        if not take.any():
            return
        rows, latents, keys, acts = rows[take], latents[take], keys[take], acts[take]
        touched = latents.unique()
        m = self.m
        # candidates: the touched latents' current entries (source >= 0: flat slot) + the new ones (< 0)
        old_lat = touched.repeat_interleave(m)
        old_slot = (touched[:, None] * m + torch.arange(m, device=touched.device)).view(-1)
        all_lat = torch.cat([old_lat, latents])
        all_key = torch.cat([self.key.view(-1)[old_slot], keys])
        source = torch.cat([old_slot, -1 - torch.arange(len(latents), device=latents.device)])
        order = torch.argsort(all_key, descending=True, stable=True)
        order = order[torch.argsort(all_lat[order], stable=True)]
        lat_sorted = all_lat[order]
        group_start = torch.searchsorted(lat_sorted, lat_sorted, side="left")
        rank = torch.arange(len(order), device=order.device) - group_start
        keep = order[rank < m]
        lat_keep, rank_keep, src = all_lat[keep], rank[rank < m], source[keep]

        new_key = all_key[keep]
        new_token = torch.empty_like(src)
        new_act = torch.empty_like(new_key)
        new_context = torch.empty(
            len(keep), self.context.shape[-1], dtype=self.context.dtype, device=src.device
        )
        old = src >= 0
        new_token[old] = self.token.view(-1)[src[old]]
        new_act[old] = self.act.view(-1)[src[old]]
        new_context[old] = self.context.view(-1, self.context.shape[-1])[src[old]]
        fresh = -1 - src[~old]
        new_token[~old] = rows[fresh] + first_token
        new_act[~old] = acts[fresh]
        new_context[~old] = self._context(codes, rows[fresh], latents[fresh], ctx).to(self.context.dtype)

        self.key[touched] = -math.inf
        self.token[touched] = -1
        self.act[touched] = 0
        self.context[touched] = 0
        self.key[lat_keep, rank_keep] = new_key
        self.token[lat_keep, rank_keep] = new_token
        self.act[lat_keep, rank_keep] = new_act
        self.context[lat_keep, rank_keep] = new_context

    def _context(
        self, codes: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor, ctx: int
    ) -> torch.Tensor:
        offsets = torch.arange(-self.before, self.after + 1, device=rows.device)
        positions = rows[:, None] + offsets  # [n, C]
        window = rows[:, None] // ctx
        inside = (positions >= 0) & (positions < len(codes)) & (positions // ctx == window)
        values = codes[positions.clamp(0, len(codes) - 1), latents[:, None]]
        return values * inside


class Coactivation:
    """Counts of latent pairs firing on the same token, over the first `max_tokens` tokens seen."""

    def __init__(self, d_sae: int, max_tokens: int, per_token: int = 64):
        self.d_sae, self.max_tokens, self.per_token = d_sae, max_tokens, per_token
        self.tokens = 0
        self.single = torch.zeros(d_sae, dtype=torch.long)
        self.pairs: list[torch.Tensor] = []

    def update(self, codes: torch.Tensor) -> None:
        room = self.max_tokens - self.tokens
        if room <= 0:
            return
        codes = codes[:room]
        self.tokens += len(codes)
        values, idx = codes.topk(min(self.per_token, codes.shape[1]), dim=-1)  # [tokens, kk]
        active = values > 0
        self.single += torch.bincount(idx[active], minlength=self.d_sae).cpu()
        both = active[:, :, None] & active[:, None, :]
        both &= ~torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device)
        keys = idx[:, :, None] * self.d_sae + idx[:, None, :]
        self.pairs.append(keys[both].cpu())

    def top_partners(self, n: int, min_count: int = 3) -> Partners:
        """For each latent, the n latents that fire with it on at least `min_count` tokens, ranked by
        lift: a partner that fires everywhere has lift ~1 and drops below the specific ones."""
        empty = torch.full((self.d_sae, n), -1, dtype=torch.long)
        partners = Partners(empty, torch.zeros(self.d_sae, n), torch.zeros(self.d_sae, n, dtype=torch.long),
                            torch.zeros(self.d_sae, n))  # fmt: skip
        if not self.pairs:
            return partners
        keys, counts = torch.cat(self.pairs).unique(return_counts=True)
        keys, counts = keys[counts >= min_count], counts[counts >= min_count]
        first, second = keys // self.d_sae, keys % self.d_sae
        single = self.single.double()
        lift = counts.double() * self.tokens / (single[first] * single[second])
        order = torch.argsort(lift, descending=True, stable=True)
        order = order[torch.argsort(first[order], stable=True)]
        first_sorted = first[order]
        rank = torch.arange(len(order)) - torch.searchsorted(first_sorted, first_sorted, side="left")
        keep = order[rank < n]
        rows, cols = first[keep], rank[rank < n]
        partners.ids[rows, cols] = second[keep]
        partners.lift[rows, cols] = lift[keep].float()
        partners.count[rows, cols] = counts[keep]
        partners.given[rows, cols] = counts[keep].float() / self.single[rows].clamp_min(1).float()
        return partners


class Partners(NamedTuple):
    """Each latent's co-firing partners (-1 where none), [d_sae, n] each."""

    ids: torch.Tensor
    lift: torch.Tensor  # P(both fire) / (P(this) P(that)): 1 when independent
    count: torch.Tensor  # tokens on which both fired
    given: torch.Tensor  # P(that fires | this fires)


def decoder_neighbours(w_dec: torch.Tensor, n: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's n nearest other latents by the cosine of their decoder directions
    (w_dec [d_sae, d_in]): ([d_sae, n] ids, [d_sae, n] cosines), on the CPU."""
    unit = torch.nn.functional.normalize(w_dec.detach().float(), dim=-1)
    n = min(n, len(unit) - 1)
    ids, cosines = [], []
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.T  # [chunk, d_sae]
        rows = torch.arange(len(sims), device=sims.device)
        sims[rows, start + rows] = -math.inf  # not itself
        top = sims.topk(n, dim=-1)
        ids.append(top.indices.cpu())
        cosines.append(top.values.cpu())
    return torch.cat(ids), torch.cat(cosines)


class DimensionCorrelation:
    """Pearson correlation of every latent's activation with every model dimension of its input,
    over all tokens passed (a latent is 0 where it does not fire). Streamed as sums; the products
    f * x come from the firings alone (a sparse product), so a batch costs (firings x d_in), not
    (tokens x d_sae x d_in). Memory: d_sae x d_in floats."""

    def __init__(self, d_sae: int, d_in: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.center: torch.Tensor | None = None  # x is shifted by its first batch's mean: r is unchanged, fp32 sums stay exact enough
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_xx = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_f = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.sum_ff = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.sum_fx = torch.zeros(d_sae, d_in, device=device)

    def update(
        self, x: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor, acts: torch.Tensor, counted: torch.Tensor
    ) -> None:
        """x [tokens, d_in], its firings (firing_entries of its codes) and the tokens to count
        (counted [tokens] bool: BOS positions are left out, as their codes are)."""
        if self.center is None:
            self.center = x[counted].mean(0) if counted.any() else x.mean(0)
        x = x - self.center
        self.n += int(counted.sum())
        self.sum_x += x[counted].sum(0, dtype=torch.float64)
        self.sum_xx += x[counted].double().pow(2).sum(0)
        self.sum_f.index_add_(0, latents, acts.double())
        self.sum_ff.index_add_(0, latents, acts.double().pow(2))
        codes_t = torch.sparse_coo_tensor(
            torch.stack([latents, rows]), acts, (len(self.sum_f), len(x)), check_invariants=False
        )
        self.sum_fx += torch.sparse.mm(codes_t.coalesce(), x)  # [d_sae, d_in]: 6x faster than index_add

    def top(self, n: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent, the n dimensions of largest |r| and r: ([d_sae, n] ids, [d_sae, n] r), on the CPU."""
        var_x = (self.n * self.sum_xx - self.sum_x.pow(2)).clamp_min(1e-12)
        ids, rs = [], []
        for start in range(0, len(self.sum_f), chunk):
            f, ff = self.sum_f[start : start + chunk], self.sum_ff[start : start + chunk]
            cov = self.n * self.sum_fx[start : start + chunk].double() - f[:, None] * self.sum_x
            r = cov / ((self.n * ff - f.pow(2)).clamp_min(1e-12)[:, None] * var_x).sqrt()
            top = r.abs().topk(min(n, r.shape[1]), dim=-1).indices
            ids.append(top.cpu())
            rs.append(r.gather(1, top).float().cpu())
        return torch.cat(ids), torch.cat(rs)


# ---------------------------------------------------------------- one pass over stored activations


@dataclass
class FeaturePassSettings:
    """What one streaming pass keeps per feature."""

    top_k: int = 20
    """Top-activating examples shown per feature, each a distinct context (the pass keeps twice as
    many firings and identical contexts are shown once)."""
    samples: int = 16
    """Random firings kept per feature (a uniform sample of its firings)."""
    context_before: int = 20
    """Tokens kept before an example's token (within its window)."""
    context_after: int = 4
    exclude_bos: bool = True
    """BOS positions are not examples (as in training)."""
    coactivation_tokens: int = 32768
    """Tokens on which pairs of co-firing features are counted."""
    coactivation_min_count: int = 3
    """Tokens two features must fire on together to be listed as partners (lift is noisy below)."""
    seed: int = 0
    progress: bool = True


@dataclass
class FeaturePass:
    stats: FeatureStats
    top: TopExamples
    samples: TopExamples
    coactivation: Coactivation
    correlation: DimensionCorrelation
    n_windows: int
    norms: torch.Tensor  # [n_windows * ctx] each position's activation norm (NaN at BOS), on the CPU

    def norm_ratio(self) -> torch.Tensor:
        """Each position's activation norm / the median over the positions passed (BOS left out)."""
        return self.norms / self.norms.nanmedian().clamp_min(1e-12)

    def frequency(self) -> torch.Tensor:
        """Firing frequency of every feature on the tokens passed: [d_sae] float64, on the CPU."""
        return self.stats.count.cpu().double() / max(self.stats.tokens, 1)


@torch.inference_mode()
def feature_pass(
    sae, shards: ShardSet, n_windows: int, cfg: FeaturePassSettings, device, norm_limit: float | None = None
) -> FeaturePass:
    """One pass over the first n_windows stored windows: statistics, top examples, samples and
    co-activation of every feature of `sae`. Positions whose activation norm exceeds `norm_limit`
    are left out as BOS is: no feature fires there."""
    ctx = shards.manifest.context_length
    d_sae = sae.d_sae
    windows_per_batch = max(1, (1 << 25) // (d_sae * ctx))  # dense codes of a batch stay ~128 MB
    stats = FeatureStats(d_sae, device)
    top = TopExamples(d_sae, 2 * cfg.top_k, cfg.context_before, cfg.context_after, device)
    samples = TopExamples(d_sae, cfg.samples, cfg.context_before, cfg.context_after, device)
    coactivation = Coactivation(d_sae, cfg.coactivation_tokens)
    correlation = DimensionCorrelation(d_sae, sae.d_in, device)
    norms = torch.empty(n_windows * ctx)
    bos = shards.manifest.bos_token_id if cfg.exclude_bos else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bar = tqdm(total=n_windows * ctx, unit="tok", unit_scale=True, desc="features", disable=not cfg.progress)
    for first in range(0, n_windows, windows_per_batch):
        count = min(windows_per_batch, n_windows - first)
        idx = torch.arange(first * ctx, (first + count) * ctx)
        x = shards.gather(idx).to(device, torch.float32)  # [tokens, d_in]
        shards.check_finite(x, idx)
        codes = sae.encode(x)  # [tokens, d_sae]
        ordinary = torch.ones(len(codes), dtype=torch.bool, device=device)
        if bos is not None:
            ordinary = (shards.tokens_at(idx) != bos).to(device)
        norm = x.norm(dim=-1)  # [tokens]
        counted = ordinary & (norm <= norm_limit) if norm_limit is not None else ordinary
        codes[~counted] = 0
        rows, latents, acts = firing_entries(codes)
        stats.update(len(codes), latents, acts)
        top.update(rows, latents, acts, acts, codes, first * ctx, ctx)
        keys = torch.rand(len(rows), generator=gen, device=device)
        samples.update(rows, latents, keys, acts, codes, first * ctx, ctx)
        coactivation.update(codes)
        correlation.update(x, rows, latents, acts, counted)
        norms[first * ctx : (first + count) * ctx] = norm.masked_fill(~ordinary, math.nan).cpu()
        bar.update(len(codes))
    bar.close()
    return FeaturePass(stats, top, samples, coactivation, correlation, n_windows, norms)
