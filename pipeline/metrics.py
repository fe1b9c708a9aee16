"""Every metric of the pipeline, defined once (see DESIGN.md).

L0   = mean over tokens of the number of non-zero latents
FVU  = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2     (whole-vector; explained variance = 1 - FVU)
FVU per dimension = mean over dimensions d of  sum_t (x_td - x_hat_td)^2 / sum_t (x_td - mean_d)^2
MSE  = mean over tokens and dimensions of (x - x_hat)^2
cossim = mean over tokens of cos(x, x_hat);  l2_ratio = mean over tokens of ||x_hat|| / ||x||
L1   = mean over tokens of sum_i |z_i|
density_i = fraction of tokens on which latent i is non-zero; silent = density 0 on the tokens measured,
     dense = density > 0.1 (dead is the training-time notion: idle over the last train.dead_tokens)
CE   = mean over predicted tokens of -log p(t_{n+1} | t_<=n)
CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)        (SAEBench: ce_loss_score)
KL score = (KL_zero - KL_spliced) / KL_zero, KL = KL(clean || other)      (SAEBench: kl_div_score)
"""

from __future__ import annotations

import torch


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """sum ||x - mean(x)||^2 over the batch: [batch, d] -> scalar."""
    return (x - x.mean(0)).pow(2).sum()


def token_variance(x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x - mean(x)||^2 (the FVU denominator per token)."""
    return total_variance(x) / len(x)


def fvu(x: torch.Tensor, x_hat: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of variance unexplained, whole-vector definition: x, x_hat [batch, d] -> scalar.
    `variance` is the denominator per token (token_variance) where it is known beyond this batch,
    e.g. over every process' tokens in distributed training; by default this batch's."""
    if variance is None:
        variance = token_variance(x)
    return (x - x_hat).pow(2).sum(-1).mean() / variance


def fvu_per_dimension(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """FVU computed per dimension, then averaged over dimensions."""
    return ((x - x_hat).pow(2).sum(0) / (x - x.mean(0)).pow(2).sum(0).clamp_min(1e-12)).mean()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x - x_hat||^2 / d (mean squared error per element)."""
    return (x - x_hat).pow(2).mean()


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero latents per token: [batch, d_sae] -> scalar."""
    return (codes != 0).sum(-1).float().mean()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities in float32: [..., vocab]."""
    return logits.float().log_softmax(-1)


def next_token_nll(log_p: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(tokens[:, t+1]) under the distribution predicted at t: [batch, seq] -> [batch, seq-1]."""
    return -log_p[:, :-1].gather(-1, tokens[:, 1:, None].long()).squeeze(-1)


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting tokens[:, t+1] from logits[:, t]: [batch, seq-1]."""
    return next_token_nll(log_probs(logits), tokens)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities: [..., vocab] -> [...]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def next_token_losses(
    clean_logits: torch.Tensor,
    others: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    rows_per_chunk: int | None = None,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """CE of the clean logits [batch, seq, vocab], and (CE, KL(clean || other)) for each of `others`,
    all [batch, seq-1]. An other is logits [batch, seq, vocab], or float log-probabilities
    [seq, vocab] (see log_probs) when it is the same for every sequence. These are next_token_nll
    and kl_divergence, computed a few positions at a time so that each vocabulary-wide pass stays in
    cache (4x faster on a CPU than whole-batch ops, which are memory-bound and dominate an
    evaluation's non-model time). On a GPU, chunks of ~256 MB of fp32 logits: few, large kernels.
    `rows_per_chunk` overrides the choice."""
    batch, seq, vocab = clean_logits.shape
    if rows_per_chunk is None:
        rows_per_chunk = 32 if clean_logits.device.type == "cpu" else max(32, 2**26 // vocab)
    clean = clean_logits.reshape(batch * seq, vocab)
    targets = torch.cat([tokens[:, 1:], tokens[:, :1]], 1).reshape(-1, 1).long()  # last one unused
    positions = torch.arange(seq, device=clean.device).repeat(batch)
    shared = {name: log_q for name, log_q in others.items() if log_q.dim() == 2}
    nll_clean = torch.empty(batch * seq, device=clean.device)
    out = {name: (torch.empty_like(nll_clean), torch.empty_like(nll_clean)) for name in others}
    for lo in range(0, batch * seq, rows_per_chunk):
        rows = slice(lo, min(lo + rows_per_chunk, batch * seq))
        log_p = torch.log_softmax(clean[rows], -1, dtype=torch.float32)
        p = torch.softmax(clean[rows], -1, dtype=torch.float32)  # faster than log_p.exp() on CPUs
        neg_entropy = torch.linalg.vecdot(p, log_p)
        nll_clean[rows] = -log_p.gather(1, targets[rows])[:, 0]
        first, n = lo % seq, rows.stop - lo
        for name, logits in others.items():
            if name not in shared:
                log_q = torch.log_softmax(logits.reshape(-1, vocab)[rows], -1, dtype=torch.float32)
            elif first + n <= seq:  # the chunk lies within one sequence: a view of the shared rows
                log_q = shared[name][first : first + n]
            else:
                log_q = shared[name][positions[rows]]
            nll, kl = out[name]
            nll[rows] = -log_q.gather(1, targets[rows])[:, 0]
            kl[rows] = neg_entropy - torch.linalg.vecdot(p, log_q)

    def per_prediction(values: torch.Tensor) -> torch.Tensor:
        return values.view(batch, seq)[:, :-1]

    return per_prediction(nll_clean), {
        name: (per_prediction(nll), per_prediction(kl)) for name, (nll, kl) in out.items()
    }


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean): 1 for a perfect reconstruction, 0 for zeros."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def kl_div_score(kl_spliced: float, kl_zero: float) -> float:
    """(KL_zero - KL_spliced) / KL_zero: 1 when splicing changes nothing, 0 when as bad as zeros."""
    return (kl_zero - kl_spliced) / kl_zero


def density_histogram(density: torch.Tensor, bins: int = 40, low: float = -7.0) -> dict:
    """log10 feature-density histogram over [low, 0] plus the count of silent (never firing) latents."""
    alive = density[density > 0].double().log10().clamp(min=low)
    counts = torch.histc(alive, bins=bins, min=low, max=0.0) if len(alive) else torch.zeros(bins)
    edges = torch.linspace(low, 0.0, bins + 1)
    return {
        "log10_density_edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "silent": int((density == 0).sum()),
    }


class StreamingReconstructionStats:
    """The reconstruction and sparsity metrics above accumulated over many batches (float64 sums)."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.n = 0
        self.d_in = d_in
        self.sq_err = zeros(d_in)  # per dimension, summed over tokens
        self.sum_x = zeros(d_in)
        self.sum_sq = zeros(d_in)
        self.sum_cos = zeros()
        self.sum_norm_ratio = zeros()
        self.sum_norm_in = zeros()
        self.sum_norm_out = zeros()
        self.sum_l1 = zeros()
        self.fire_count = zeros(d_sae)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        """x, x_hat: [tokens, d_in]; codes: [tokens, d_sae]."""
        self.n += len(x)
        self.sq_err += (x - x_hat).pow(2).sum(0).double()
        self.sum_x += x.sum(0).double()
        self.sum_sq += x.pow(2).sum(0).double()
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.sum_cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum().double()
        self.sum_norm_ratio += (norm_out / norm_in.clamp_min(1e-12)).sum().double()
        self.sum_norm_in += norm_in.sum().double()
        self.sum_norm_out += norm_out.sum().double()
        self.sum_l1 += codes.abs().sum().double()
        self.fire_count += (codes != 0).sum(0).double()

    def _variance_per_dimension(self) -> torch.Tensor:
        return self.sum_sq - self.sum_x.pow(2) / self.n

    def total_variance(self) -> float:
        """sum ||x - mean(x)||^2 over everything seen (the FVU denominator)."""
        return float(self._variance_per_dimension().sum())

    def fvu(self) -> float:
        """Whole-vector FVU over everything seen: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
        return float(self.sq_err.sum()) / self.total_variance()

    def fvu_per_dimension(self) -> float:
        return float((self.sq_err / self._variance_per_dimension().clamp_min(1e-12)).mean())

    def mse(self) -> float:
        return float(self.sq_err.sum() / (self.n * self.d_in))

    def l0(self) -> float:
        return float(self.fire_count.sum() / self.n)

    def l1(self) -> float:
        return float(self.sum_l1 / self.n)

    def cossim(self) -> float:
        return float(self.sum_cos / self.n)

    def l2_ratio(self) -> float:
        return float(self.sum_norm_ratio / self.n)

    def density(self) -> torch.Tensor:
        """Firing frequency of every latent: [d_sae]."""
        return (self.fire_count / max(self.n, 1)).float().cpu()

    def silent_fraction(self) -> float:
        """Fraction of latents that never fired on the tokens seen (silent; `dead` is the training-time
        notion: idle over the last `train.dead_tokens` training tokens)."""
        return float((self.fire_count == 0).double().mean())

    def frequent_fraction(self, threshold: float) -> float:
        """Fraction of latents firing on more than `threshold` of the tokens (0.1: dense latents)."""
        return float((self.density() > threshold).double().mean())
