"""Train stage: fit one or several SAEs on harvested activations, all on the same activation stream.

    python -m pipeline train sae=topk sae.k=32 sae.expansion=16 run_dir=outputs/demo
    python -m pipeline train 'train.variants=[{k: 16}, {k: 64}]'     # a sweep, data read once

Reads `<run_dir>/activations/<hook>/`, keeps its last `holdout_tokens` tokens out of training (the
held-out split later stages evaluate on), and writes `<run_dir>/sae/<hook>/<name>/` with
`sae.safetensors` + `cfg.json` (held-out FVU, L0 and dead fraction included).

Inputs are scaled so that E||x||^2 = d_in while training; the scale is folded into the saved
weights. Checkpoints every `checkpoint_every` steps make a killed run resume where it stopped, with
final weights equal to an uninterrupted run's. Under `torchrun`, each process takes a slice of
every batch and gradients are averaged (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import hydra
import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.checkpoints import CheckpointError, load_checkpoint, remove_checkpoint, save_checkpoint
from pipeline.config import CONF_DIR, to_dataclass
from pipeline.metrics import StreamingReconstructionStats
from pipeline.models import resolve_device
from pipeline.optim import Signum, lr_multiplier
from pipeline.sae import Sae, SaeConfig, build_sae
from pipeline.sae.base import normalize_rows_
from pipeline.shards import ShardSet
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "train-checkpoint"


class TrainError(ValueError):
    """Training cannot start or go on as configured; the message says how to fix it."""


@dataclass
class TrainConfig:
    """How to train (the dictionaries themselves are described by `sae` and `variants`)."""

    hook: str = "blocks.9.resid_post"
    """Activations to train on: <run_dir>/activations/<hook>/."""
    tokens: int | None = None
    """Training tokens; null = `epochs` passes over the training split."""
    epochs: float = 2.0
    holdout_tokens: int = 32768
    """Tokens at the end of the shard set kept out of training (whole sequences), for evaluation."""
    batch_size: int = 4096
    """Tokens per step (over all processes)."""
    optimizer: str = "adam"
    """adam | signum (schedule-free sign-SGD, see optim.py)."""
    lr: float | None = None
    """Learning rate; null = lr_base * (d_sae / 2**14) ** -0.5 (scaled with the dictionary size)."""
    lr_base: float = 2e-3
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_warmup_steps: int = 10
    lr_decay: str = "linear"
    """linear | cosine | constant, from lr_decay_start (fraction of training) to 0 at the end."""
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
    exclude_bos: bool = True
    """Leave BOS positions out (their activations are huge outliers)."""
    dead_tokens: int | None = None
    """A latent not active over this many training tokens counts as dead (and gets AuxK gradient);
    null = max(10,000, 1% of the training tokens): 10k for the default run, 10M for a 1B-token run."""
    log_every: int = 10
    checkpoint_every: int = 100
    """Steps between checkpoints (0: never)."""
    variants: list[dict] = field(default_factory=list)
    """Several SAEs in one pass: each dict overrides fields of `sae` (e.g. [{k: 16}, {k: 64}])."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "signum"):
            raise TrainError(f"train.optimizer={self.optimizer!r}; expected adam or signum")
        if self.autocast not in ("auto", "bfloat16", "float32"):
            raise TrainError(f"train.autocast={self.autocast!r}; expected auto, bfloat16 or float32")
        if self.batch_size < 1 or self.log_every < 1:
            raise TrainError("train.batch_size and train.log_every must be positive")


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _init_distributed(device: torch.device) -> _Dist:
    """Join the process group `torchrun` describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(torch_dist.get_rank(), world)


# ---------------------------------------------------------------- data


def training_split(shards: ShardSet, holdout_tokens: int) -> int:
    """Number of leading tokens used for training; the rest (whole sequences) is held out."""
    ctx = shards.manifest.context_length
    held = -(-holdout_tokens // ctx) * ctx if holdout_tokens > 0 else 0
    if held >= shards.n_tokens:
        raise TrainError(
            f"train.holdout_tokens={holdout_tokens} leaves nothing to train on: the shards hold only "
            f"{shards.n_tokens} tokens. Harvest more or lower train.holdout_tokens."
        )
    return shards.n_tokens - held


def _batches(
    shards: ShardSet, cfg: TrainConfig, n_train: int, per_epoch: int, start_step: int
) -> Iterator[torch.Tensor]:
    """Global batches from `start_step` on, epoch after epoch (each epoch reshuffled by its seed)."""
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        yield from shards.iter_batches(
            cfg.batch_size,
            seed=cfg.seed + epoch,
            exclude_bos=cfg.exclude_bos,
            start_batch=offset,
            stop=n_train,
        )
        epoch, offset = epoch + 1, 0


def _prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Run `iterator` on a background thread, `size` items ahead (reads overlap compute)."""
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def fill():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as err:
            items.put(err)
        items.put(done)

    threading.Thread(target=fill, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _sample(shards: ShardSet, n_train: int, n: int, seed: int, exclude_bos: bool) -> torch.Tensor:
    """A random fp32 sample [n, d_in] of training tokens (for input scaling and b_dec init)."""
    batch = next(
        shards.iter_batches(min(n, n_train // 2), seed=seed + 10_000, exclude_bos=exclude_bos, stop=n_train)
    )
    return batch.float()


# ---------------------------------------------------------------- one SAE's training state


class _Member:
    """One SAE with its optimizer and dead-latent counter."""

    def __init__(self, sae: Sae, cfg: TrainConfig, lr: float):
        self.sae = sae
        self.lr = lr
        params = list(sae.parameters())
        if cfg.optimizer == "adam":
            fused = params[0].device.type in ("cpu", "cuda")  # one kernel per step: ~7x faster than the loop
            self.opt = torch.optim.Adam(params, lr=lr, betas=tuple(cfg.adam_betas), fused=fused)
        else:
            self.opt = Signum(params, lr=lr)
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_enc.device)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.final_metrics: dict = {}

    def accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.count += 1

    def drain(self) -> dict[str, float]:
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


def _global_variance(x: torch.Tensor, dist: _Dist) -> torch.Tensor:
    """Mean over all processes' tokens of ||x - mean(x)||^2, exactly as one process would see it."""
    stats = torch.cat(
        [x.sum(0), x.pow(2).sum().reshape(1), torch.tensor([len(x)], dtype=x.dtype, device=x.device)]
    )
    if dist.enabled:
        torch_dist.all_reduce(stats)
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    return sq / n - (total / n).pow(2).sum()


def _average_gradients(sae: Sae, dist: _Dist) -> None:
    if not dist.enabled:
        return
    for p in sae.parameters():
        if p.grad is not None:
            torch_dist.all_reduce(p.grad)
            p.grad.div_(dist.world)


def _config_hash(cfg: TrainConfig, sae_cfgs: list[SaeConfig], shards: ShardSet) -> str:
    ignored = {"log_every", "checkpoint_every", "progress", "device", "compile"}
    payload = {
        "train": {k: v for k, v in asdict(cfg).items() if k not in ignored},
        "saes": [asdict(c) for c in sae_cfgs],
        "data": [shards.manifest.weights_hash, [s.sha256 for s in shards.manifest.shards]],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- held-out metrics


@torch.no_grad()
def heldout_metrics(
    sae: Sae, shards: ShardSet, start: int, exclude_bos: bool, batch_size: int = 4096
) -> dict:
    """FVU, L0 and the fraction of latents never active on the held-out tokens [start, end)
    (`dead_fraction_heldout`: stricter than the training-window definition for rare latents)."""
    stats = StreamingReconstructionStats(sae.d_in, sae.d_sae, sae.W_enc.device)
    bos = shards.manifest.bos_token_id
    for lo in range(start, shards.n_tokens, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, shards.n_tokens))
        if exclude_bos and bos is not None:
            idx = idx[shards.tokens_at(idx) != bos]
        if len(idx):
            x = shards.gather(idx).to(sae.W_enc.device, torch.float32)
            stats.update(x, *sae(x))
    if stats.n == 0:
        return {}
    return {
        "heldout_tokens": stats.n,
        "fvu": stats.fvu(),
        "l0": stats.l0(),
        "dead_fraction_heldout": stats.never_fired_fraction(),
    }


# ---------------------------------------------------------------- the stage


def _variant_configs(base: SaeConfig, variants: list[dict]) -> list[SaeConfig]:
    if not variants:
        return [base]
    configs = [to_dataclass(SaeConfig, {**asdict(base), "name": None, **dict(v)}) for v in variants]
    names = [c.default_name() for c in configs]
    if len(set(names)) != len(names):
        raise TrainError(f"train.variants give duplicate SAE names {names}; set a distinct `name` in each")
    return configs


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.autocast == "bfloat16" or (cfg.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def train_saes(
    cfg: TrainConfig, sae_cfg: SaeConfig, run_dir: str | Path, wandb_cfg: WandbConfig | None = None
) -> dict[str, Path]:
    """Train every configured SAE on `<run_dir>/activations/<hook>/`; return {name: saved directory}."""
    run_dir = Path(run_dir)
    shards = ShardSet(run_dir / "activations" / cfg.hook)
    d_in = shards.d_model
    sae_cfgs = _variant_configs(sae_cfg, list(cfg.variants))
    for c in sae_cfgs:
        if c.d_in is not None and c.d_in != d_in:
            raise TrainError(
                f"the SAE config expects inputs of width {c.d_in}, but the shards in {shards.directory} hold "
                f"d_model {d_in}; fix sae.d_in (or drop it) or train on other activations"
            )
        if c.architecture in ("topk", "batchtopk") and c.k >= c.width(d_in):
            raise TrainError(
                f"sae.k={c.k} must be smaller than d_sae={c.width(d_in)} (expansion {c.expansion} x d_in {d_in})"
            )
    device = resolve_device(cfg.device)
    dist = _init_distributed(device)
    if cfg.batch_size % dist.world:
        raise TrainError(f"train.batch_size={cfg.batch_size} must be divisible by the {dist.world} processes")

    n_train = training_split(shards, cfg.holdout_tokens)
    bos = shards.manifest.bos_token_id if cfg.exclude_bos else None
    eligible = n_train - (shards.count_token(bos, stop=n_train) if bos is not None else 0)
    per_epoch = eligible // cfg.batch_size
    if per_epoch == 0:
        raise TrainError(
            f"the training split holds {eligible} tokens, fewer than one batch of {cfg.batch_size}"
        )
    total_steps = (cfg.tokens or int(cfg.epochs * eligible)) // cfg.batch_size
    if total_steps < 1:
        raise TrainError(f"train.tokens={cfg.tokens} is less than one batch of {cfg.batch_size}")

    if cfg.dead_tokens is None:
        cfg = replace(cfg, dead_tokens=max(10_000, total_steps * cfg.batch_size // 100))
    config_hash = _config_hash(cfg, sae_cfgs, shards)
    out_dirs = {c.default_name(): run_dir / "sae" / cfg.hook / c.default_name() for c in sae_cfgs}
    if all(_already_trained(d, config_hash) for d in out_dirs.values()):
        log.info("SAEs %s are already trained with this configuration; nothing to do", list(out_dirs))
        return out_dirs

    torch.manual_seed(cfg.seed)
    sample = _sample(shards, n_train, 16_384, cfg.seed, cfg.exclude_bos)
    scale = float((d_in / sample.pow(2).sum(1).mean()).sqrt()) if cfg.normalize_activations else 1.0
    meta = {
        "model_id": shards.manifest.model_id,
        "hook": cfg.hook,
        "config_hash": config_hash,
    }
    members = []
    for c in sae_cfgs:
        sae = build_sae(c, d_in, meta)
        sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        sae.init_from_data(sample * scale)
        sae.to(device)
        lr = cfg.lr or cfg.lr_base * (sae.d_sae / 2**14) ** -0.5
        members.append(_Member(sae, cfg, lr))

    ckpt_dir = run_dir / "sae" / cfg.hook / CHECKPOINT_DIR
    try:
        resumed = load_checkpoint(ckpt_dir, members, config_hash)
    except CheckpointError as err:
        raise TrainError(str(err)) from err
    start_step = resumed["step"] if resumed else 0
    if resumed:
        log.info("resuming from %s at step %d of %d", ckpt_dir, start_step, total_steps)

    tracker = Tracker(
        wandb_cfg or WandbConfig(),
        run_dir,
        f"train-{cfg.hook}",
        {"train": asdict(cfg), "saes": [asdict(c) for c in sae_cfgs], "d_in": d_in},
        dist.rank,
    )
    step_fn = {id(m): _make_step(m, cfg, dist, device) for m in members}
    local = slice(dist.rank * cfg.batch_size // dist.world, (dist.rank + 1) * cfg.batch_size // dist.world)
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        desc="train",
        disable=not cfg.progress or dist.rank != 0,
    )
    first_bad = torch.tensor(-1, device=device)
    window_start, window_tokens = time.perf_counter(), 0
    batches = _prefetch(_batches(shards, cfg, n_train, per_epoch, start_step))
    try:
        for step in range(start_step, total_steps):
            x = next(batches)[local].to(device, torch.float32, non_blocking=True)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(x).all(), step, first_bad)
            x = x * scale
            variance = _global_variance(x, dist)
            warm = min(1.0, (step + 1) / max(1, cfg.sparsity_warmup * total_steps))
            lr_mult = lr_multiplier(step, total_steps, cfg.lr_warmup_steps, cfg.lr_decay, cfg.lr_decay_start)
            for m in members:
                for group in m.opt.param_groups:
                    group["lr"] = m.lr * lr_mult
                step_fn[id(m)](x, variance, warm)
            window_tokens += cfg.batch_size
            bar.update(1)
            last = step + 1 == total_steps
            if (step + 1) % cfg.log_every == 0 or last:
                if int(first_bad) >= 0:
                    raise TrainError(
                        f"activation batch {int(first_bad)} (training step {int(first_bad)}) contains NaN or Inf; "
                        f"check the shards in {shards.directory} (ShardSet(..., verify=True)) or re-harvest"
                    )
                elapsed = time.perf_counter() - window_start
                metrics = _log_metrics(members, cfg, tokens_per_s=window_tokens / elapsed, lr_mult=lr_mult)
                tracker.log(metrics, step=step + 1)
                bar.set_postfix(
                    {
                        k.split("/", 1)[1]: f"{v:.3g}"
                        for k, v in metrics.items()
                        if k.startswith(members[0].sae.cfg.default_name() + "/")
                        and k.rsplit("/", 1)[1] in ("fvu", "l0", "dead")
                    }
                )
                window_start, window_tokens = time.perf_counter(), 0
            if (
                cfg.checkpoint_every
                and (step + 1) % cfg.checkpoint_every == 0
                and not last
                and dist.rank == 0
            ):
                save_checkpoint(ckpt_dir, members, step + 1, {"config_hash": config_hash, "scale": scale})
    finally:
        bar.close()

    saved = {}
    if dist.rank == 0:
        for m in members:
            name = m.sae.cfg.default_name()
            saved[name] = _save_final(m, shards, cfg, n_train, scale, total_steps, out_dirs[name], device)
            tracker.summary({f"{name}/heldout_{k}": v for k, v in m.final_metrics.items()})
        remove_checkpoint(ckpt_dir)
    tracker.finish()
    if dist.enabled:
        torch_dist.barrier()
    return saved


def _make_step(m: _Member, cfg: TrainConfig, dist: _Dist, device: torch.device):
    sae = m.sae

    def forward(x, dead, variance, warm):
        with _autocast(cfg, device):
            return sae.training_forward(x, dead, variance, warm)

    if cfg.compile:
        forward = torch.compile(forward)

    def step(x: torch.Tensor, variance: torch.Tensor, warm: float) -> None:
        dead = m.since_fired >= cfg.dead_tokens
        out = forward(x, dead, variance, warm)
        out.loss.backward()
        _average_gradients(sae, dist)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        sae.remove_parallel_decoder_grad()
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)
        m.constrain()
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
        fired[out.fired] = True
        if dist.enabled:
            fired_int = fired.to(torch.int32)
            torch_dist.all_reduce(fired_int, op=torch_dist.ReduceOp.MAX)
            fired = fired_int.bool()
        m.since_fired.add_(cfg.batch_size).masked_fill_(fired, 0)
        m.accumulate(
            {**out.terms, "loss": out.loss.detach(), "l0": out.l0.detach(), "dead": dead.float().mean()}
        )

    return step


def _log_metrics(
    members: list[_Member], cfg: TrainConfig, tokens_per_s: float, lr_mult: float
) -> dict[str, float]:
    metrics = {"tokens_per_s": tokens_per_s}
    for m in members:
        name = m.sae.cfg.default_name()
        for key, value in m.drain().items():
            metrics[f"{name}/{key}"] = value
        metrics[f"{name}/lr"] = m.lr * lr_mult
    return metrics


def _save_final(
    m: _Member, shards: ShardSet, cfg: TrainConfig, n_train: int, scale: float, steps: int, out: Path, device
) -> Path:
    if isinstance(m.opt, Signum):
        m.opt.eval_params()
    sae = copy.deepcopy(m.sae)
    sae.fold_input_scale(scale)
    metrics = heldout_metrics(sae, shards, n_train, cfg.exclude_bos)
    # DESIGN.md's definition: never active over the last `dead_tokens` training tokens
    metrics["dead_fraction"] = float((m.since_fired >= cfg.dead_tokens).float().mean())
    m.final_metrics = metrics
    sae.meta.update(
        {
            "training_tokens": steps * cfg.batch_size,
            "training_split_tokens": n_train,
            "input_scale": scale,
            "metrics": metrics,
        }
    )
    sae.save(out)
    log.info(
        "saved %s: held-out FVU %.4f, L0 %.1f, dead %.2f%% (%.2f%% silent on the held-out tokens) -> %s",
        sae.cfg.default_name(),
        metrics.get("fvu", float("nan")),
        metrics.get("l0", float("nan")),
        100 * metrics["dead_fraction"],
        100 * metrics.get("dead_fraction_heldout", float("nan")),
        out,
    )
    return out


def _already_trained(directory: Path, config_hash: str) -> bool:
    try:
        return (
            json.loads((directory / "cfg.json").read_text()).get("config_hash") == config_hash
            and (directory / "sae.safetensors").exists()
        )
    except (OSError, ValueError):
        return False


def run(cfg: DictConfig) -> dict[str, Path]:
    """The train stage on a composed Hydra config."""
    return train_saes(
        to_dataclass(TrainConfig, cfg.train),
        to_dataclass(SaeConfig, cfg.sae),
        cfg.run_dir,
        to_dataclass(WandbConfig, cfg.wandb),
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    run(cfg)
