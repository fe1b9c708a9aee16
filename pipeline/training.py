"""SAE training machinery: the settings, each dictionary's optimizer state, one optimization step,
the data order, the reductions across processes and the held-out metrics. The train stage
(stages/train.py) puts these together; anything else that trains dictionaries can too.

Under `torchrun`, every process takes a slice of each global batch; gradients are averaged and the
FVU denominator and the latents' firing counts are reduced over all processes, so N processes compute
what one process would (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from pipeline.config import check_settings
from pipeline.errors import PipelineError
from pipeline.metrics import StreamingReconstructionStats
from pipeline.optim import Signum
from pipeline.sae import Sae
from pipeline.sae.base import normalize_rows_
from pipeline.shards import ShardSet


class TrainError(PipelineError, ValueError):
    """Training cannot start or go on as configured; the message says how to fix it."""


OPTIMIZER_DEFAULTS = {
    "signum": {"lr_base": 5e-3, "lr_decay": "constant", "dead_lr_scale": 3.0},  # SAEs; transcoders: 1
    "adam": {"lr_base": 2e-3, "lr_decay": "linear", "dead_lr_scale": 1.0},
}
"""What `lr_base`, `lr_decay` and `dead_lr_scale: null` mean for each optimizer (measured in the
README's sweep)."""
DEAD_WINDOW_TOKENS, DEAD_WINDOW_FIRINGS = 10_000, 8
"""The default dead window (`TrainConfig.dead_window`): at least 10k tokens and 8 expected firings."""


@dataclass
class TrainConfig:
    """How to train (the dictionaries themselves are described by `sae` and `variants`)."""

    hook: str = "blocks.9.resid_post"
    """Activations to train on: <run_dir>/activations/<hook>/, or the model's at that hook."""
    hook_out: str | None = None
    """Transcoders (sae=transcoder): the activations they predict from train.hook's, e.g.
    blocks.L.mlp_out with train.hook=blocks.L.mlp_in (harvested in the same run). Other dictionaries
    ignore it."""
    source: str = "shards"
    """shards (the harvested activations) | model (computed while training, none stored; streaming.py)."""
    buffer_tokens: int = 262_144
    """source=model: tokens computed and shuffled together; every batch mixes tokens of
    buffer_tokens / context_length windows (memory: buffer_tokens x d_model in the storage dtype)."""
    tokens: int | None = None
    """Training tokens; null = `epochs` passes over the training split (source=shards only)."""
    shuffle_shards: int | None = None
    """source=shards: mix this many whole shards at a time (batches come from their tokens, shuffled).
    null: on local disk, every batch is spread over the whole split; on object storage, half the
    shards the local cache holds ($SAE_PIPELINE_CACHE_GB), the other half being read ahead."""
    epochs: float = 2.0
    holdout_tokens: int = 32768
    """Tokens at the end of the shard set kept out of training (whole windows), for evaluation."""
    batch_size: int = 4096
    """Tokens per step (over all processes)."""
    optimizer: str = "signum"
    """signum (schedule-free sign-SGD, see optim.py) | adam."""
    lr: float | None = None
    """Learning rate; null = lr_base * (d_sae / 2**14) ** -0.5 (scaled with the dictionary size)."""
    lr_base: float | None = None
    """null = the optimizer's own: 5e-3 for signum (sparsify's), 2e-3 for adam."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    average_power: float = 0.0
    """signum: the saved weights are the average of the iterates, step t weighted by t^average_power
    (0: uniform, sparsify's). Above 0 the first, poor iterates of a short run count less: lower FVU,
    but more dead latents at k 32 (the README's rule table)."""
    dead_lr_scale: float | None = None
    """signum: the weights of dead latents (see dead_tokens) step this many times as far, so that AuxK
    brings them back within a short budget; null = 3 for an SAE under signum, 1 (none) for a
    transcoder (3 left 4x as many dead there) and with adam, which has no other value."""
    lr_warmup_steps: int = 10
    lr_decay: str | None = None
    """linear | cosine | constant, from lr_decay_start (fraction of training) to 0 at the end;
    null = the optimizer's own: constant for signum (its weight averaging does the annealing),
    linear for adam."""
    lr_decay_start: float = 0.5
    sparsity_warmup: float = 0.05
    """Fraction of training over which L1 / L0 penalties ramp up from 0 (relu, jumprelu)."""
    normalize_activations: bool = True
    """Scale inputs to E||x||^2 = d_in while training (folded into the saved weights)."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm of each SAE (null: no clipping)."""
    autocast: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32: matmul precision; weights stay fp32."""
    compile: bool = False
    """torch.compile the training step."""
    device: str = "auto"
    seed: int = 0
    init_from: str | None = None
    """A saved dictionary's directory (this project's, SAELens' or sparsify's) to start from instead of
    a fresh initialization: its weights, with a fresh optimizer. E.g. the base model's dictionary
    continued on a fine-tuned model's activations, so that feature i stays feature i and `compare`
    measures the fine-tuning rather than two trainings' randomness. Every dictionary trained must
    match it in architecture, input width and number of latents."""
    exclude_bos: bool = True
    """Leave BOS positions out (their activations are huge outliers)."""
    exclude_outliers: float | None = None
    """Leave out positions whose activation norm exceeds this multiple of the median (massive
    activations); the held-out metrics leave them out too. null: keep them. source=shards: the median
    over the training split, at the cost of one pass over its activations before training;
    source=model: over the stored windows, and a position is left out where it exceeds the limit at
    any of the hooks trained on."""
    dead_tokens: int | None = None
    """A latent not active over this many training tokens counts as dead (and gets AuxK gradient);
    null = each dictionary's own `dead_window`: 10k tokens, longer only for a dictionary so wide for
    its k that an average latent would fire fewer than 8 times in them."""
    log_every: int = 10
    checkpoint_every: int = 0
    """Steps between checkpoints (0: by time only)."""
    checkpoint_minutes: float = 10.0
    """Minutes between checkpoints (0: by steps only): a killed run loses at most this much training,
    and a fast GPU run does not spend its time writing optimizer state."""
    variants: list[dict] = field(default_factory=list)
    """Several SAEs in one pass: each dict overrides fields of `sae` (e.g. [{k: 16}, {k: 64}])."""
    progress: bool = True

    def __post_init__(self) -> None:
        check_settings(
            self, "train", TrainError,
            positive=("tokens", "shuffle_shards", "exclude_outliers", "buffer_tokens", "epochs", "batch_size", "lr", "lr_base", "grad_clip", "dead_tokens", "dead_lr_scale", "log_every"),
            non_negative=("holdout_tokens", "average_power", "lr_warmup_steps", "checkpoint_every", "checkpoint_minutes"),
            fractions=("lr_decay_start", "sparsity_warmup"),
            choices={"source": ("shards", "model"), "optimizer": tuple(OPTIMIZER_DEFAULTS), "autocast": ("auto", "bfloat16", "float32"),
                     "lr_decay": ("linear", "cosine", "constant", None)},
        )  # fmt: skip
        if self.source == "model" and self.tokens is None:
            raise TrainError(
                "train.source=model needs train.tokens (the corpus is streamed, so passes are not counted); "
                "set e.g. train.tokens=10000000"
            )
        if self.optimizer == "adam" and self.dead_lr_scale not in (None, 1.0):
            raise TrainError(
                f"train.dead_lr_scale={self.dead_lr_scale} applies to train.optimizer=signum only; "
                "leave it null with adam (or set train.optimizer=signum)"
            )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise TrainError(f"train.adam_betas={self.adam_betas} must be two numbers in [0, 1)")

    def learning_rate(self, d_sae: int) -> float:
        """`lr`, or lr_base (the optimizer's own when null) scaled by the dictionary size."""
        if self.lr is not None:
            return self.lr
        base = self.lr_base if self.lr_base is not None else OPTIMIZER_DEFAULTS[self.optimizer]["lr_base"]
        return base * (d_sae / 2**14) ** -0.5

    def dead_step_scale(self, transcoder: bool = False) -> float:
        """`dead_lr_scale`, or when null the optimizer's own for an SAE, 1 for a transcoder."""
        if self.dead_lr_scale is not None:
            return self.dead_lr_scale
        return 1.0 if transcoder else OPTIMIZER_DEFAULTS[self.optimizer]["dead_lr_scale"]

    def schedule(self) -> str:
        """`lr_decay`, or the optimizer's own when null."""
        return self.lr_decay if self.lr_decay is not None else OPTIMIZER_DEFAULTS[self.optimizer]["lr_decay"]

    def dead_window(self, d_sae: int, k: int | None) -> int:
        """`dead_tokens`, or the default window of a dictionary of d_sae latents, k active per token
        (None: its sparsity has no fixed k): max(10k, 8 d_sae / k) tokens, over which an average latent
        fires 8 times (idle by chance 0.03 % of the time). Not a share of the budget: a window that
        grows with training gives AuxK to the latents that drop out later, and more end silent (the
        README's rule table)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(DEAD_WINDOW_TOKENS, DEAD_WINDOW_FIRINGS * d_sae // k) if k else DEAD_WINDOW_TOKENS

    def autocast_context(self, device: torch.device):
        """bf16 autocast where asked for (`auto`: on GPU), else nothing."""
        use_bf16 = self.autocast == "bfloat16" or (self.autocast == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


# ---------------------------------------------------------------- processes


@dataclass
class Dist:
    """This process' place among the `torchrun` processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def local_slice(self, batch_size: int) -> slice:
        """This process' part of a global batch."""
        return slice(self.rank * batch_size // self.world, (self.rank + 1) * batch_size // self.world)


def init_distributed(device: torch.device) -> Dist:
    """Join the process group `torchrun` describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch_dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on this process' GPU
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch_dist.get_rank(), world)


def global_variance(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean over all processes' tokens of ||x - mean(x)||^2, exactly as one process would see it
    (the count made on x's device: a tensor built on the host would be a blocking copy to the GPU)."""
    stats = torch.cat(
        [x.sum(0), x.pow(2).sum().reshape(1), x.new_full((1,), len(x))]
    )
    if dist.enabled:
        torch_dist.all_reduce(stats)
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    return sq / n - (total / n).pow(2).sum()


def _average_gradients(sae: Sae, dist: Dist) -> None:
    if not dist.enabled:
        return
    for p in sae.parameters():
        if p.grad is not None:
            torch_dist.all_reduce(p.grad)
            p.grad.div_(dist.world)


def _fired_in_batch(fired: torch.Tensor, dist: Dist) -> torch.Tensor:
    """On how many tokens of the whole batch, all processes' slices, each latent fired [d_sae]."""
    if not dist.enabled:
        return fired
    fired = fired.to(torch.int32)
    torch_dist.all_reduce(fired, op=torch_dist.ReduceOp.SUM)
    return fired


# ---------------------------------------------------------------- data


def training_positions(
    shards: ShardSet, cfg: TrainConfig, n_train: int, per_epoch: int, start_step: int,
    keep: torch.Tensor | None = None, companions: tuple[ShardSet, ...] = (),
) -> Iterator[torch.Tensor]:  # fmt: skip
    """The token indices [batch_size] of the global batches of the first n_train tokens (where `keep`,
    when given) from `start_step` on, epoch after epoch (each epoch reshuffled by its seed).
    `companions`: other hooks' shard sets of the same windows, read at the same indices."""
    epoch, offset = divmod(start_step, per_epoch)
    block_tokens, mix_blocks = shards.shuffle_blocks(cfg.shuffle_shards)
    while True:
        yield from shards.batch_positions(
            cfg.batch_size,
            seed=cfg.seed + epoch,
            exclude_bos=cfg.exclude_bos,
            start_batch=offset,
            block_tokens=block_tokens,
            mix_blocks=mix_blocks,
            stop=n_train,
            keep=keep,
            companions=companions,
        )
        epoch, offset = epoch + 1, 0


def training_batches(
    shards: ShardSet, cfg: TrainConfig, n_train: int, per_epoch: int, start_step: int, keep: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """Global batches [batch_size, d_in] at training_positions."""
    return map(shards.gather, training_positions(shards, cfg, n_train, per_epoch, start_step, keep))


def input_positions(shards: ShardSet, n_train: int, n: int, cfg: TrainConfig, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The token indices of a random sample of up to n training tokens (for input scaling and b_dec init)."""
    block_tokens, mix_blocks = shards.shuffle_blocks(cfg.shuffle_shards)
    return next(
        shards.batch_positions(
            min(n, n_train // 2), seed=cfg.seed + 10_000, exclude_bos=cfg.exclude_bos,
            block_tokens=block_tokens, mix_blocks=mix_blocks, stop=n_train, keep=keep,
        )  # fmt: skip
    )


# ---------------------------------------------------------------- one dictionary's training state


class TrainingMember:
    """One SAE with its optimizer, learning rate, dead-latent counter and logged-term sums."""

    def __init__(self, sae: Sae, cfg: TrainConfig):
        self.sae = sae
        self.lr = cfg.learning_rate(sae.d_sae)
        params = list(sae.parameters())
        if cfg.optimizer == "adam":
            fused = params[0].device.type in ("cpu", "cuda")  # one kernel per step: ~7x faster than the loop
            self.opt = torch.optim.Adam(params, lr=self.lr, betas=tuple(cfg.adam_betas), fused=fused)
        else:
            self.opt = Signum(params, lr=self.lr, power=cfg.average_power)
        self.dead_step_scale = cfg.dead_step_scale(transcoder=sae.transcodes)
        self.dead_tokens = cfg.dead_window(sae.d_sae, sae.cfg.active_per_token())
        """Latents idle over this many training tokens are dead."""
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_enc.device)
        """Training tokens since each latent last fired."""
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    @property
    def name(self) -> str:
        return self.sae.cfg.default_name()

    def set_lr_multiplier(self, multiplier: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr * multiplier

    def scale_dead_steps(self, dead: torch.Tensor) -> None:
        """Make the coming Signum step move the weights of the `dead` latents [d_sae] bool
        `dead_step_scale` times as far (a no-op at scale 1)."""
        if self.dead_step_scale == 1.0:
            return
        per_latent = 1.0 + (self.dead_step_scale - 1.0) * dead.float()  # [d_sae]
        self.opt.lr_scales = {
            p: per_latent.view([-1 if axis == dim else 1 for axis in range(p.dim())])
            for p, dim in self.sae.latent_parameters()
        }

    def accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.count += 1

    def drain(self) -> dict[str, float]:
        """Means of the accumulated terms since the last drain (one host sync for all of them)."""
        means = {key: float(value) / self.count for key, value in self.sums.items()}
        self.sums, self.count = {}, 0
        return means

    @torch.no_grad()
    def constrain(self) -> None:
        """Unit-norm decoder rows, also on Signum's iterate and average where the SAE has them."""
        self.sae.normalize_decoder()
        if isinstance(self.opt, Signum) and self.sae.unit_norm_decoder:
            for w in self.opt.copies(self.sae.W_dec):
                normalize_rows_(w)

    def final_weights(self) -> Sae:
        """The weights to save: Signum's average where it keeps one."""
        if isinstance(self.opt, Signum):
            self.opt.eval_params()
        return self.sae


def make_step(m: TrainingMember, cfg: TrainConfig, dist: Dist, device: torch.device):
    """The optimization step of one member: step(x [local batch, d_in], variance, sparsity warm-up,
    target): `target` [local batch, d_in] is what a transcoder predicts (`variance` is then its own)."""
    sae = m.sae

    def forward(x, dead, variance, warm, *target):
        with cfg.autocast_context(device):
            return sae.training_forward(x, dead, variance, warm, *target)

    if cfg.compile:
        forward = torch.compile(forward)

    def step(x: torch.Tensor, variance: torch.Tensor, warm: float, target: torch.Tensor | None = None) -> None:
        dead = m.since_fired >= m.dead_tokens
        out = forward(x, dead, variance, warm, *(() if target is None else (target,)))
        out.loss.backward()
        _average_gradients(sae, dist)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        sae.remove_parallel_decoder_grad()
        m.scale_dead_steps(dead)
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)
        m.constrain()
        fired = _fired_in_batch(out.fired, dist)
        m.since_fired.add_(cfg.batch_size).masked_fill_(fired > 0, 0)
        sae.observe_firing(fired, cfg.batch_size)
        m.accumulate(
            {**out.terms, "loss": out.loss.detach(), "l0": out.l0.detach(), "dead": dead.float().mean()}
        )

    return step


# ---------------------------------------------------------------- held-out metrics


@torch.no_grad()
def heldout_metrics(
    sae: Sae, shards: ShardSet, start: int, exclude_bos: bool, batch_size: int = 4096, norm_limit: float | None = None,
    target: ShardSet | None = None,
) -> dict:  # fmt: skip
    """FVU, L0 and the fraction of latents never active (`silent_fraction`) on the held-out tokens
    [start, end) (those with an activation norm up to `norm_limit`, when given); silent is stricter
    than dead (idle over the training window) for rare latents. A nested (matryoshka) dictionary adds
    `prefix_fvu`: {prefix size: the FVU of its first latents alone}. `target`: what a transcoder
    predicts (the output hook's shards of the same windows); the FVU is of its prediction."""
    stats = StreamingReconstructionStats(sae.d_in, sae.d_sae, sae.W_enc.device)
    # matryoshka: the squared error of each prefix of the dictionary on its own (the last is `fvu`)
    prefix_errors = {w: torch.zeros((), dtype=torch.float64, device=sae.W_enc.device) for w in sae.nested_widths()[:-1]}
    for idx in shards.position_chunks(start, shards.n_tokens, batch_size, exclude_bos):
        x = shards.gather(idx).to(sae.W_enc.device, torch.float32)
        y = x if target is None else target.gather(idx).to(sae.W_enc.device, torch.float32)
        if norm_limit is not None:
            ordinary = x.norm(dim=-1) <= norm_limit
            x, y = x[ordinary], y[ordinary]
        if len(x):
            y_hat, codes = sae(x)
            stats.update(y, y_hat, codes)
            for w in prefix_errors:
                prefix_errors[w] += (y - sae.decode(codes[:, :w], stop=w)).pow(2).sum().double()
    if stats.n == 0:
        return {}
    return {
        "heldout_tokens": stats.n,
        "fvu": stats.fvu(),
        "l0": stats.l0(),
        "silent_fraction": stats.silent_fraction(),
        **({"prefix_fvu": {str(w): float(e / stats.total_variance()) for w, e in prefix_errors.items()}} if prefix_errors else {}),
    }
