"""Train stage: fit one or several SAEs on harvested activations, all on the same activation stream.

    python -m pipeline train sae=batchtopk sae.k=32 sae.expansion=16 run_dir=outputs/demo
    python -m pipeline train 'train.variants=[{k: 16}, {k: 64}]'     # a sweep, data read once
    python -m pipeline train train.source=model train.tokens=100000000   # no shards stored

Reads `<run_dir>/activations/<hook>/`, keeps its last `holdout_tokens` tokens out of training (the
held-out split later stages evaluate on, splits.py), and writes `<run_dir>/sae/<hook>/<name>/` with
`sae.safetensors` + `cfg.json` (held-out FVU, L0, silent and dead fractions included).
With `train.source=model` the training tokens are computed by the model as training goes
(streaming.py) from the corpus windows after the stored ones; only the held-out split is stored (it
is harvested first when missing), so evaluate and analyze work on such a dictionary as on any other.

Inputs are scaled so that E||x||^2 = d_in while training; the scale is folded into the saved
weights. Checkpoints (every `checkpoint_minutes`, or `checkpoint_every` steps) make a killed run resume where it stopped, with
final weights equal to an uninterrupted run's. Under `torchrun`, each process takes a slice of
every batch (training.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.checkpoints import load_checkpoint, remove_checkpoint, save_checkpoint
from pipeline.cli import stage_main
from pipeline.config import to_dataclass
from pipeline.corpus import CorpusConfig
from pipeline.faults import kill_point
from pipeline.fileio import remove_stale_temporaries, stale_temporaries
from pipeline.harvesting import HarvestConfig
from pipeline.locks import exclusive
from pipeline.models import ModelConfig
from pipeline.optim import lr_multiplier
from pipeline.prefetch import prefetch
from pipeline.rundir import RunDir
from pipeline.sae import Sae, SaeConfig, build_sae
from pipeline.sae.base import CONFIG_FILE
from pipeline.streaming import ModelSource, StreamTimes
from pipeline.tracking import Tracker, WandbConfig
from pipeline.training import (
    TrainConfig,
    TrainError,
    TrainingMember,
    global_variance,
    heldout_metrics,
    input_positions,
    make_step,
    training_positions,
)
from pipeline.training_plan import TrainingPlan, plan_training

log = logging.getLogger(__name__)

def _input_samples(plan: TrainingPlan, n: int = 16_384) -> dict[str, torch.Tensor]:
    """fp32 training tokens {hook: [n, d_in]} (the same tokens at every hook) for the input scales and
    the b_dec inits."""
    if plan.stream is None:
        idx = input_positions(plan.shards, plan.n_train, n, plan.cfg, plan.keep)
        return {hook: shards.gather(idx).float() for hook, shards in plan.stored.items()}
    return {hook: x.float().cpu() for hook, x in plan.stream.sample(n).items()}


def _batches(plan: TrainingPlan, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """This process' batches {hook: [batch_size / processes, d_in]} from `start_step` on (shards read
    ahead on a thread)."""
    cfg, dist = plan.cfg, plan.dist
    local = dist.local_slice(cfg.batch_size)
    if plan.stream is None:
        others = tuple(s for s in plan.stored.values() if s is not plan.shards)
        positions = training_positions(plan.shards, cfg, plan.n_train, plan.per_epoch, start_step, plan.keep, others)
        # on a GPU, pinned batches copy while the step runs (a copy from pageable memory waits for the stream)
        pin = plan.device.type == "cuda"
        return prefetch(
            {hook: _pinned(s.gather(idx[local]), pin) for hook, s in plan.stored.items()} for idx in positions
        )
    size = local.stop - local.start
    block = min(max(1, cfg.buffer_tokens // size), plan.total_steps) * size  # never more than training needs
    # on this thread: the forward competes with the SAE step for the same cores (CPU) or queues its
    # kernels on the same stream (GPU), so a reader thread gains nothing, and on CPU its forward ran 25% slower
    return plan.stream.batches(size, block, cfg.seed, start_step, dist.rank, dist.world)


def _pinned(x: torch.Tensor, pin: bool) -> torch.Tensor:
    return x.pin_memory() if pin else x


def _members(plan: TrainingPlan) -> tuple[list[TrainingMember], dict[str, float], dict[str, torch.Tensor]]:
    """Freshly initialized dictionaries with their optimizers, each hook's input scale, and the
    sample of training tokens {hook: [n, d_in]} (raw) both were set from."""
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    samples = _input_samples(plan)
    d_in = plan.shards.d_model
    scales = {
        hook: float((d_in / x.pow(2).sum(1).mean()).sqrt()) if cfg.normalize_activations else 1.0
        for hook, x in samples.items()
    }
    members = []
    for c, hook, target in zip(plan.sae_cfgs, plan.hooks, plan.targets, strict=True):
        meta = {"model_id": plan.shards.manifest.model_id, "hook": hook, "config_hash": plan.config_hash,
                **({"hook_out": target} if target else {})}  # fmt: skip
        sae = build_sae(c, d_in, meta)
        if plan.initial is not None:
            _start_from(sae, plan, scales[hook], scales[target or hook])
        else:
            sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
            # b_dec in the space of what it reconstructs (a transcoder's target), the inputs for what else needs them
            sae.init_from_data(samples[target or hook] * scales[target or hook], samples[hook] * scales[hook])
        members.append(TrainingMember(sae.to(plan.device), cfg))
    return members, scales, samples


@torch.no_grad()
def _start_from(sae: Sae, plan: TrainingPlan, scale: float, out_scale: float) -> None:
    """Give `sae` the weights of train.init_from's dictionary (which acts on raw activations) in the
    scaled space it trains in."""
    sae.load_file_tensors({name: t.detach().clone() for name, t in plan.initial.file_tensors().items()})
    sae.fold_input_scale(1 / scale, 1 / out_scale)  # the inverse of the fold at saving
    sae.meta["init_from"] = {"dir": str(plan.cfg.init_from), "digest": plan.initial_digest,
                             "config_hash": plan.initial.meta.get("config_hash")}  # fmt: skip


def _resume(plan: TrainingPlan, members: list[TrainingMember]) -> int:
    """Restore the members from the checkpoint, if there is one; return the step to start at."""
    resumed = load_checkpoint(plan.checkpoint, members, plan.config_hash)
    if not resumed:
        return 0
    log.info("resuming from %s at step %d of %d", plan.checkpoint, resumed["step"], plan.total_steps)
    return resumed["step"]


def _check_finite(first_bad: torch.Tensor, plan: TrainingPlan) -> None:
    if int(first_bad) < 0:
        return
    if plan.stream is None:
        fix = f"check the shards in {plan.shards.directory} (ShardSet(..., verify=True)) or re-harvest"
    else:
        fix = "the model computed them (train.source=model): check its dtype (float32 avoids overflow)"
    raise TrainError(f"activation batch {int(first_bad)} (training step {int(first_bad)}) contains NaN or Inf; {fix}")


def _log_window(members: list[TrainingMember], labels: list[str], tracker: Tracker, bar, step: int,
                tokens_per_s: float, lr_mult: float) -> None:  # fmt: skip
    """Log the means since the last log (W&B) and the first dictionary's FVU, L0 and dead (progress bar)."""
    metrics = {"tokens_per_s": tokens_per_s}
    for m, label in zip(members, labels, strict=True):
        metrics.update({f"{label}/{key}": value for key, value in m.drain().items()})
        metrics[f"{label}/lr"] = m.lr * lr_mult
    tracker.log(metrics, step=step)
    first = labels[0]
    bar.set_postfix({key: f"{metrics[f'{first}/{key}']:.3g}" for key in ("fvu", "l0", "dead")
                     if f"{first}/{key}" in metrics})  # fmt: skip


def _scaled(batch: dict[str, torch.Tensor], scales: dict[str, float], plan: TrainingPlan) -> tuple[dict, dict, torch.Tensor]:
    """(each hook's fp32 batch on the device times its input scale, its variance over all processes,
    whether every value was finite)."""
    xs = {hook: x.to(plan.device, torch.float32, non_blocking=True) for hook, x in batch.items()}
    finite = torch.stack([torch.isfinite(x).all() for x in xs.values()]).all()
    xs = {hook: x * scales[hook] for hook, x in xs.items()}
    return xs, {hook: global_variance(x, plan.dist) for hook, x in xs.items()}, finite


def _train_loop(
    plan: TrainingPlan, members: list[TrainingMember], scales: dict[str, float], start_step: int, tracker: Tracker
) -> None:
    cfg, dist, device, total = plan.cfg, plan.dist, plan.device, plan.total_steps
    steps = [make_step(m, cfg, dist, device) for m in members]
    bar = tqdm(
        total=total, initial=start_step, unit="step", desc="train", disable=not cfg.progress or dist.rank != 0
    )
    # the first step whose batch held NaN / Inf, kept on the device and checked when logging (no sync per step)
    first_bad = torch.tensor(-1, device=device)
    window_start, window_tokens = time.perf_counter(), 0
    loop_start = last_checkpoint = window_start
    batches = _batches(plan, start_step)
    labels = [plan.label(i) for i in range(len(members))]
    if plan.stream is not None:
        plan.stream.times = StreamTimes()  # the loop's own (not the input-scaling sample's)
    try:
        for step in range(start_step, total):
            kill_point("train.step", step)
            xs, variances, finite = _scaled(next(batches), scales, plan)
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            warm = min(1.0, (step + 1) / max(1, cfg.sparsity_warmup * total))
            lr_mult = lr_multiplier(step, total, cfg.lr_warmup_steps, cfg.schedule(), cfg.lr_decay_start)
            for m, hook, target, train_step in zip(members, plan.hooks, plan.targets, steps, strict=True):
                m.set_lr_multiplier(lr_mult)
                train_step(xs[hook], variances[target or hook], warm, xs[target] if target else None)
            window_tokens += cfg.batch_size
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                _check_finite(first_bad, plan)
                elapsed = time.perf_counter() - window_start
                _log_window(members, labels, tracker, bar, done, window_tokens / elapsed, lr_mult)
                window_start, window_tokens = time.perf_counter(), 0
            if done < total and dist.rank == 0 and _checkpoint_due(cfg, done, last_checkpoint):
                save_checkpoint(
                    plan.checkpoint, members, done, {"config_hash": plan.config_hash, "scales": scales}
                )
                plan.run.upload(plan.checkpoint)
                last_checkpoint = time.perf_counter()
    finally:
        bar.close()
    if plan.stream is not None:
        log.info("train.source=model: %s", plan.stream.times.summary(time.perf_counter() - loop_start))


def _checkpoint_due(cfg: TrainConfig, done: int, last_checkpoint: float) -> bool:
    by_steps = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
    by_time = cfg.checkpoint_minutes and time.perf_counter() - last_checkpoint >= 60 * cfg.checkpoint_minutes
    return bool(by_steps or by_time)


def _save(
    plan: TrainingPlan, i: int, m: TrainingMember, scales: dict[str, float], sample: torch.Tensor
) -> tuple[Path, dict]:
    """Save dictionary i, acting on raw activations, with its held-out metrics; `sample`: raw training
    tokens of its input hook [n, d_in], for what inference needs set from data (BatchTopK's threshold)."""
    cfg, hook, target = plan.cfg, plan.hooks[i], plan.targets[i]
    sae = copy.deepcopy(m.final_weights())
    sae.calibrate(sample * scales[hook], cfg.batch_size)
    sae.fold_input_scale(scales[hook], scales[target or hook])
    limit = plan.norm_limit(hook)
    metrics = heldout_metrics(sae, plan.stored[hook], plan.n_train, cfg.exclude_bos, norm_limit=limit,
                              target=plan.stored[target] if target else None)  # fmt: skip
    # dead (DESIGN.md): never active over the last `dead_tokens` training tokens
    metrics["dead_fraction"] = float((m.since_fired >= m.dead_tokens).float().mean())
    sae.meta.update(
        {
            "training_tokens": plan.total_steps * cfg.batch_size,
            "training_split_tokens": plan.n_train,
            "training_source": cfg.source,
            "input_scale": scales[hook],
            **({"output_scale": scales[target]} if target else {}),
            "metrics": metrics,
            **({"outlier_norm_limit": limit} if limit is not None else {}),
        }
    )
    out = sae.save(plan.out_dir(i))
    plan.run.publish(out, CONFIG_FILE)
    log.info(
        "saved %s: held-out FVU %.4f, L0 %.1f, dead %.2f%% (idle over the last %d training tokens; %.2f%% "
        "silent on the held-out tokens) -> %s",
        plan.label(i), metrics.get("fvu", float("nan")), metrics.get("l0", float("nan")),
        100 * metrics["dead_fraction"], m.dead_tokens, 100 * metrics.get("silent_fraction", float("nan")),
        plan.run.where(out),
    )  # fmt: skip
    return out, metrics


def _remove_checkpoint(plan: TrainingPlan) -> None:
    remove_checkpoint(plan.checkpoint)
    plan.run.remove(plan.checkpoint)


@contextlib.contextmanager
def _outputs_locked(plan: TrainingPlan) -> Iterator[None]:
    """Rank 0 holds the locks of the dictionaries it writes, and clears what a killed writer of
    them left behind (temporary files of the dictionaries and of this configuration's checkpoint)."""
    with contextlib.ExitStack() as locks:
        if plan.dist.rank == 0:
            for out in map(plan.out_dir, range(len(plan.sae_cfgs))):
                locks.enter_context(exclusive(out, f"the dictionary {out}"))
                remove_stale_temporaries(out)
            for tmp, target in stale_temporaries(plan.checkpoint.parent):
                if target == plan.checkpoint.name:
                    tmp.unlink(missing_ok=True)
        yield


def _train(plan: TrainingPlan, wandb_cfg: WandbConfig | None) -> dict[str, Path]:
    members, scales, samples = _members(plan)
    start_step = _resume(plan, members)
    config = {
        "train": asdict(plan.cfg),
        "saes": [asdict(c) for c in plan.sae_cfgs],
        "d_in": plan.shards.d_model,
    }
    tracker = Tracker(wandb_cfg or WandbConfig(), plan.run.root, "train", config, plan.dist.rank,
                      group=plan.run.location, detail=plan.cfg.hook)  # fmt: skip
    _train_loop(plan, members, scales, start_step, tracker)
    saved = {}
    if plan.dist.rank == 0:
        for i, m in enumerate(members):
            saved[plan.label(i)], metrics = _save(plan, i, m, scales, samples[plan.hooks[i]])
            tracker.summary({f"{plan.label(i)}/heldout_{k}": v for k, v in metrics.items()})
        _remove_checkpoint(plan)
    tracker.finish()
    if plan.dist.enabled:
        torch_dist.barrier()
    return saved


def train_saes(
    cfg: TrainConfig,
    sae_cfg: SaeConfig,
    run_dir: str | Path,
    wandb_cfg: WandbConfig | None = None,
    source: ModelSource | None = None,
) -> dict[str, Path]:
    """Train every configured SAE on `<run_dir>/activations/<hook>/`, or on the model's activations
    (cfg.source=model, computed with `source`); return {name: saved directory}, the name prefixed by
    its hook for a variant at another hook than train.hook."""
    plan = plan_training(cfg, sae_cfg, RunDir.open(run_dir), source)
    indices = range(len(plan.sae_cfgs))
    with _outputs_locked(plan):
        trained = [plan.run.trained(plan.hooks[i], plan.sae_cfgs[i].default_name(), plan.config_hash) for i in indices]
        if all(trained):
            log.info("SAEs %s are already trained with this configuration; nothing to do", list(map(plan.label, indices)))
            if plan.dist.rank == 0:
                _remove_checkpoint(plan)  # left by a kill between the final save and its removal
            return {plan.label(i): plan.out_dir(i) for i in indices}
        for i in indices:
            if not trained[i] and plan.run.holds_dictionary(plan.hooks[i], plan.sae_cfgs[i].default_name()):
                log.warning("%s holds a dictionary trained with other settings; this training replaces it when "
                            "it ends (set sae.name to keep both)", plan.out_dir(i))  # fmt: skip
        return _train(plan, wandb_cfg)


def run(cfg: DictConfig) -> dict[str, Path]:
    """The train stage on a composed Hydra config."""
    train_cfg = to_dataclass(TrainConfig, cfg.train)
    source = None
    if train_cfg.source == "model":
        source = ModelSource(
            to_dataclass(ModelConfig, cfg.model),
            to_dataclass(CorpusConfig, cfg.corpus),
            to_dataclass(HarvestConfig, cfg.harvest),
        )
    return train_saes(train_cfg, to_dataclass(SaeConfig, cfg.sae), cfg.run_dir, to_dataclass(WandbConfig, cfg.wandb), source)


main = stage_main("train", run)
