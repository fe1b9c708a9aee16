"""Train stage: fit one or several SAEs on harvested activations, all on the same activation stream.

    python -m pipeline train sae=topk sae.k=32 sae.expansion=16 run_dir=outputs/demo
    python -m pipeline train 'train.variants=[{k: 16}, {k: 64}]'     # a sweep, data read once

Reads `<run_dir>/activations/<hook>/`, keeps its last `holdout_tokens` tokens out of training (the
held-out split later stages evaluate on, splits.py), and writes `<run_dir>/sae/<hook>/<name>/` with
`sae.safetensors` + `cfg.json` (held-out FVU, L0, silent and dead fractions included).

Inputs are scaled so that E||x||^2 = d_in while training; the scale is folded into the saved
weights. Checkpoints every `checkpoint_every` steps make a killed run resume where it stopped, with
final weights equal to an uninterrupted run's. Under `torchrun`, each process takes a slice of
every batch (training.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.checkpoints import load_checkpoint, remove_checkpoint, save_checkpoint
from pipeline.cli import stage_main
from pipeline.config import to_dataclass
from pipeline.faults import kill_point
from pipeline.fileio import remove_stale_temporaries, stale_temporaries
from pipeline.locks import exclusive
from pipeline.models import resolve_device
from pipeline.optim import lr_multiplier
from pipeline.rundir import RunDir, config_hash
from pipeline.sae import SaeConfig, build_sae
from pipeline.sae.base import FORMAT_VERSION
from pipeline.shards import ShardSet
from pipeline.splits import heldout_start
from pipeline.tracking import Tracker, WandbConfig
from pipeline.training import (
    Dist,
    TrainConfig,
    TrainError,
    TrainingMember,
    global_variance,
    heldout_metrics,
    init_distributed,
    input_sample,
    make_step,
    prefetch,
    training_batches,
)

log = logging.getLogger(__name__)

_NOT_HASHED = {"log_every", "checkpoint_every", "progress", "device", "compile"}  # change no result


@dataclass
class _Plan:
    """Everything decided before the first step."""

    run: RunDir
    cfg: TrainConfig  # with dead_tokens resolved
    sae_cfgs: list[SaeConfig]
    shards: ShardSet
    n_train: int  # leading tokens trained on; the rest is held out
    per_epoch: int  # batches per pass over the training split
    total_steps: int
    config_hash: str
    dist: Dist
    device: torch.device

    def out_dir(self, name: str) -> Path:
        return self.run.sae(self.cfg.hook, name)

    @property
    def checkpoint(self) -> Path:
        return self.run.checkpoint(self.cfg.hook, self.config_hash)


def _variant_configs(base: SaeConfig, variants: list[dict], d_in: int) -> list[SaeConfig]:
    """The dictionaries to train: `base`, or each variant's overrides of it; checked against d_in."""
    configs = [base] if not variants else [
        to_dataclass(SaeConfig, {**asdict(base), "name": None, **dict(v)}) for v in variants
    ]  # fmt: skip
    names = [c.default_name() for c in configs]
    if len(set(names)) != len(names):
        raise TrainError(f"train.variants give duplicate SAE names {names}; set a distinct `name` in each")
    for c in configs:
        try:
            c.check_input_width(d_in)
        except ValueError as err:
            raise TrainError(str(err)) from err
    return configs


def _steps(shards: ShardSet, cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """(batches per epoch of the training split, total steps)."""
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
    return per_epoch, total_steps


def plan_training(cfg: TrainConfig, sae_cfg: SaeConfig, run: RunDir) -> _Plan:
    """Check the settings against the activations and fix the split, the steps and the config hash."""
    shards = ShardSet(run.activations(cfg.hook))
    sae_cfgs = _variant_configs(sae_cfg, list(cfg.variants), shards.d_model)
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    if cfg.batch_size % dist.world:
        raise TrainError(f"train.batch_size={cfg.batch_size} must be divisible by the {dist.world} processes")
    n_train = heldout_start(shards.n_tokens, shards.manifest.context_length, cfg.holdout_tokens)
    if n_train == 0:
        raise TrainError(
            f"train.holdout_tokens={cfg.holdout_tokens} leaves nothing to train on: the shards hold only "
            f"{shards.n_tokens} tokens. Harvest more or lower train.holdout_tokens."
        )
    per_epoch, total_steps = _steps(shards, cfg, n_train)
    cfg = replace(cfg, dead_tokens=cfg.dead_window(total_steps * cfg.batch_size))
    hash_ = config_hash(
        {
            "format_version": FORMAT_VERSION,
            "train": {k: v for k, v in asdict(cfg).items() if k not in _NOT_HASHED},
            "saes": [asdict(c) for c in sae_cfgs],
            "data": [shards.manifest.weights_hash, [s.sha256 for s in shards.manifest.shards]],
        }
    )
    return _Plan(run, cfg, sae_cfgs, shards, n_train, per_epoch, total_steps, hash_, dist, device)


def _members(plan: _Plan) -> tuple[list[TrainingMember], float]:
    """Freshly initialized dictionaries with their optimizers, and the input scale."""
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    sample = input_sample(plan.shards, plan.n_train, 16_384, cfg.seed, cfg.exclude_bos)
    d_in = plan.shards.d_model
    scale = float((d_in / sample.pow(2).sum(1).mean()).sqrt()) if cfg.normalize_activations else 1.0
    meta = {"model_id": plan.shards.manifest.model_id, "hook": cfg.hook, "config_hash": plan.config_hash}
    members = []
    for c in plan.sae_cfgs:
        sae = build_sae(c, d_in, meta)
        sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        sae.init_from_data(sample * scale)
        members.append(TrainingMember(sae.to(plan.device), cfg))
    return members, scale


def _resume(plan: _Plan, members: list[TrainingMember]) -> int:
    """Restore the members from the checkpoint, if there is one; return the step to start at."""
    resumed = load_checkpoint(plan.checkpoint, members, plan.config_hash)
    if not resumed:
        return 0
    log.info("resuming from %s at step %d of %d", plan.checkpoint, resumed["step"], plan.total_steps)
    return resumed["step"]


def _check_finite(first_bad: torch.Tensor, shards: ShardSet) -> None:
    if int(first_bad) >= 0:
        raise TrainError(
            f"activation batch {int(first_bad)} (training step {int(first_bad)}) contains NaN or Inf; "
            f"check the shards in {shards.directory} (ShardSet(..., verify=True)) or re-harvest"
        )


def _log_window(members: list[TrainingMember], tracker: Tracker, bar, step: int, tokens_per_s: float,
                lr_mult: float) -> None:  # fmt: skip
    """Log the means since the last log (W&B) and the first dictionary's FVU, L0 and dead (progress bar)."""
    metrics = {"tokens_per_s": tokens_per_s}
    for m in members:
        metrics.update({f"{m.name}/{key}": value for key, value in m.drain().items()})
        metrics[f"{m.name}/lr"] = m.lr * lr_mult
    tracker.log(metrics, step=step)
    first = members[0].name
    bar.set_postfix({key: f"{metrics[f'{first}/{key}']:.3g}" for key in ("fvu", "l0", "dead")
                     if f"{first}/{key}" in metrics})  # fmt: skip


def _train_loop(
    plan: _Plan, members: list[TrainingMember], scale: float, start_step: int, tracker: Tracker
) -> None:
    cfg, dist, device, total = plan.cfg, plan.dist, plan.device, plan.total_steps
    steps = [make_step(m, cfg, dist, device) for m in members]
    local = dist.local_slice(cfg.batch_size)
    bar = tqdm(
        total=total, initial=start_step, unit="step", desc="train", disable=not cfg.progress or dist.rank != 0
    )
    # the first step whose batch held NaN / Inf, kept on the device and checked when logging (no sync per step)
    first_bad = torch.tensor(-1, device=device)
    window_start, window_tokens = time.perf_counter(), 0
    batches = prefetch(training_batches(plan.shards, cfg, plan.n_train, plan.per_epoch, start_step))
    try:
        for step in range(start_step, total):
            kill_point("train.step", step)
            x = next(batches)[local].to(device, torch.float32, non_blocking=True)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(x).all(), step, first_bad)
            x = x * scale
            variance = global_variance(x, dist)
            warm = min(1.0, (step + 1) / max(1, cfg.sparsity_warmup * total))
            lr_mult = lr_multiplier(step, total, cfg.lr_warmup_steps, cfg.schedule(), cfg.lr_decay_start)
            for m, train_step in zip(members, steps, strict=True):
                m.set_lr_multiplier(lr_mult)
                train_step(x, variance, warm)
            window_tokens += cfg.batch_size
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                _check_finite(first_bad, plan.shards)
                elapsed = time.perf_counter() - window_start
                _log_window(members, tracker, bar, done, window_tokens / elapsed, lr_mult)
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total and dist.rank == 0:
                save_checkpoint(
                    plan.checkpoint, members, done, {"config_hash": plan.config_hash, "scale": scale}
                )
    finally:
        bar.close()


def _save(plan: _Plan, m: TrainingMember, scale: float) -> tuple[Path, dict]:
    """Save one trained dictionary, acting on raw activations, with its held-out metrics."""
    cfg = plan.cfg
    sae = copy.deepcopy(m.final_weights())
    sae.fold_input_scale(scale)
    metrics = heldout_metrics(sae, plan.shards, plan.n_train, cfg.exclude_bos)
    # dead (DESIGN.md): never active over the last `dead_tokens` training tokens
    metrics["dead_fraction"] = float((m.since_fired >= cfg.dead_tokens).float().mean())
    sae.meta.update(
        {
            "training_tokens": plan.total_steps * cfg.batch_size,
            "training_split_tokens": plan.n_train,
            "input_scale": scale,
            "metrics": metrics,
        }
    )
    out = sae.save(plan.out_dir(m.name))
    log.info(
        "saved %s: held-out FVU %.4f, L0 %.1f, dead %.2f%% (%.2f%% silent on the held-out tokens) -> %s",
        m.name, metrics.get("fvu", float("nan")), metrics.get("l0", float("nan")),
        100 * metrics["dead_fraction"], 100 * metrics.get("silent_fraction", float("nan")), out,
    )  # fmt: skip
    return out, metrics


@contextlib.contextmanager
def _outputs_locked(plan: _Plan, names: list[str]) -> Iterator[None]:
    """Rank 0 holds the locks of the dictionaries it writes, and clears what a killed writer of
    them left behind (temporary files of the dictionaries and of this configuration's checkpoint)."""
    with contextlib.ExitStack() as locks:
        if plan.dist.rank == 0:
            for name in names:
                locks.enter_context(exclusive(plan.out_dir(name), f"the dictionary {plan.out_dir(name)}"))
                remove_stale_temporaries(plan.out_dir(name))
            for tmp, target in stale_temporaries(plan.checkpoint.parent):
                if target == plan.checkpoint.name:
                    tmp.unlink(missing_ok=True)
        yield


def _train(plan: _Plan, wandb_cfg: WandbConfig | None) -> dict[str, Path]:
    members, scale = _members(plan)
    start_step = _resume(plan, members)
    config = {
        "train": asdict(plan.cfg),
        "saes": [asdict(c) for c in plan.sae_cfgs],
        "d_in": plan.shards.d_model,
    }
    name = f"train-{plan.cfg.hook}"
    tracker = Tracker(wandb_cfg or WandbConfig(), plan.run.root, name, config, plan.dist.rank)
    _train_loop(plan, members, scale, start_step, tracker)
    saved = {}
    if plan.dist.rank == 0:
        for m in members:
            saved[m.name], metrics = _save(plan, m, scale)
            tracker.summary({f"{m.name}/heldout_{k}": v for k, v in metrics.items()})
        remove_checkpoint(plan.checkpoint)
    tracker.finish()
    if plan.dist.enabled:
        torch_dist.barrier()
    return saved


def train_saes(
    cfg: TrainConfig, sae_cfg: SaeConfig, run_dir: str | Path, wandb_cfg: WandbConfig | None = None
) -> dict[str, Path]:
    """Train every configured SAE on `<run_dir>/activations/<hook>/`; return {name: saved directory}."""
    plan = plan_training(cfg, sae_cfg, RunDir(run_dir))
    names = [c.default_name() for c in plan.sae_cfgs]
    with _outputs_locked(plan, names):
        if all(plan.run.trained(plan.cfg.hook, name, plan.config_hash) for name in names):
            log.info("SAEs %s are already trained with this configuration; nothing to do", names)
            if plan.dist.rank == 0:
                remove_checkpoint(plan.checkpoint)  # left by a kill between the final save and its removal
            return {name: plan.out_dir(name) for name in names}
        return _train(plan, wandb_cfg)


def run(cfg: DictConfig) -> dict[str, Path]:
    """The train stage on a composed Hydra config."""
    return train_saes(
        to_dataclass(TrainConfig, cfg.train),
        to_dataclass(SaeConfig, cfg.sae),
        cfg.run_dir,
        to_dataclass(WandbConfig, cfg.wandb),
    )


main = stage_main("train", run)
