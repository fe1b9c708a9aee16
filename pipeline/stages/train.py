"""Train stage: fit one or several SAEs on harvested activations, all on the same activation stream.

    python -m pipeline train sae=topk sae.k=32 sae.expansion=16 run_dir=outputs/demo
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
from dataclasses import asdict, dataclass, replace
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
from pipeline.models import ModelConfig, resolve_device
from pipeline.optim import lr_multiplier
from pipeline.prefetch import prefetch
from pipeline.rundir import RunDir, config_hash
from pipeline.sae import SaeConfig, architectures, build_sae
from pipeline.sae.base import CONFIG_FILE, FORMAT_VERSION
from pipeline.shards import ShardSet, check_same_windows
from pipeline.splits import heldout_start
from pipeline.streaming import ModelSource, ModelStream, model_stream, stored_for
from pipeline.tracking import Tracker, WandbConfig
from pipeline.training import (
    Dist,
    TrainConfig,
    TrainError,
    TrainingMember,
    global_variance,
    heldout_metrics,
    init_distributed,
    input_positions,
    make_step,
    training_positions,
)

log = logging.getLogger(__name__)

_NOT_HASHED = {"log_every", "checkpoint_every", "checkpoint_minutes", "progress", "device", "compile"}  # change no result
# settings added later, hashed only away from the value that gives the earlier behaviour, so that
# earlier dictionaries stay current
_HASHED_WHEN_SET = {
    "shuffle_shards": None, "exclude_outliers": None, "hook_out": None, "average_power": 0.0, "dead_lr_scale": 1.0
}  # fmt: skip
_SAE_HASHED_WHEN_SET = {"matryoshka_widths": None}  # the same for the dictionaries' settings


def _hashed(settings, earlier: dict, not_hashed: set[str] = frozenset()) -> dict:
    """The settings of a dataclass that enter the config hash: all but `not_hashed` and those at the
    value `earlier` gives for them (settings added later)."""
    return {k: v for k, v in asdict(settings).items() if k not in not_hashed and not (k in earlier and v == earlier[k])}


def _dead_windows(cfg: TrainConfig, sae_cfgs: list[SaeConfig], d_in: int) -> int | list[int]:
    """The dictionaries' dead windows for the config hash: one number where they share it, as when
    the window was one setting for all, so that dictionaries it did not change stay current."""
    windows = [cfg.dead_window(c.width(d_in), c.active_per_token()) for c in sae_cfgs]
    return windows[0] if len(set(windows)) == 1 else windows


def _sae_hashed(c: SaeConfig, d_in: int) -> dict:
    """A dictionary's settings in the config hash, with AuxK's k_aux resolved where it is used: its
    default changed (d_in / 2 before 2 k), so a dictionary trained under the old one trains again."""
    settings = _hashed(c, _SAE_HASHED_WHEN_SET)
    if c.active_per_token() is not None:
        settings["k_aux"] = c.aux_latents(d_in)
    return settings


@dataclass
class _Plan:
    """Everything decided before the first step."""

    run: RunDir
    cfg: TrainConfig
    sae_cfgs: list[SaeConfig]
    hooks: list[str]  # each dictionary's hook (train.hook unless its variant names another)
    targets: list[str | None]  # what each dictionary predicts: train.hook_out for a transcoder, else None (its input)
    stored: dict[str, ShardSet]  # each hook's stored activations: the training split (source=shards), the held-out one
    stream: ModelStream | None  # source=model: where the training tokens come from
    n_train: int  # the first held-out token of the shards; source=shards trains on the tokens before it
    per_epoch: int  # source=shards: batches per pass over the training split
    total_steps: int
    config_hash: str
    dist: Dist
    device: torch.device
    outliers: _Outliers | None = None  # source=shards with train.exclude_outliers (source=model: the stream's norm_limits)

    @property
    def keep(self) -> torch.Tensor | None:
        return self.outliers.keep if self.outliers else None

    def norm_limit(self, hook: str) -> float | None:
        """train.exclude_outliers' activation norm limit at `hook` (None: outliers are kept)."""
        if self.stream is not None:
            return self.stream.norm_limits[hook] if self.stream.norm_limits else None
        return self.outliers.limit if self.outliers else None

    @property
    def shards(self) -> ShardSet:
        """train.hook's stored activations (the first variant's hook's when no variant is at train.hook)."""
        return stored_for(self.stored, self.cfg.hook)

    def out_dir(self, i: int) -> Path:
        return self.run.sae(self.hooks[i], self.sae_cfgs[i].default_name())

    def label(self, i: int) -> str:
        """Dictionary i's name, prefixed by its hook where that is not train.hook."""
        name = self.sae_cfgs[i].default_name()
        return name if self.hooks[i] == self.cfg.hook else f"{self.hooks[i]}/{name}"

    @property
    def checkpoint(self) -> Path:
        return self.run.checkpoint(self.cfg.hook, self.config_hash)


def _variant_configs(base: SaeConfig, cfg: TrainConfig) -> tuple[list[SaeConfig], list[str], list[str | None]]:
    """The dictionaries to train, their hooks and their targets: `base` at train.hook, or each
    variant's overrides of it (a variant's `hook` key puts it at another hook)."""
    specs = [dict(v) for v in cfg.variants]
    hooks = [spec.pop("hook", cfg.hook) for spec in specs] or [cfg.hook]
    configs = [to_dataclass(SaeConfig, {**asdict(base), "name": None, **spec}) for spec in specs] or [base]
    keys = [f"{h}/{c.default_name()}" for h, c in zip(hooks, configs, strict=True)]
    if len(set(keys)) != len(keys):
        raise TrainError(f"train.variants give duplicate SAEs {keys}; set a distinct `name` in each")
    if cfg.source == "shards" and set(hooks) != {cfg.hook}:
        raise TrainError(
            f"train.variants at other hooks than train.hook ({sorted(set(hooks))}) need train.source=model, "
            "where one forward feeds them all; harvested activations are read one hook at a time, so run "
            "the train stage once per hook"
        )
    return configs, hooks, _targets(configs, cfg)


def _targets(configs: list[SaeConfig], cfg: TrainConfig) -> list[str | None]:
    """train.hook_out for each transcoder, None for the others; checked to be set exactly when used."""
    transcodes = [architectures()[c.architecture].transcodes for c in configs]
    if any(transcodes) and cfg.hook_out is None:
        raise TrainError(
            "a transcoder predicts another hook's activations from train.hook's: set train.hook_out, e.g. "
            "train.hook=blocks.3.mlp_in train.hook_out=blocks.3.mlp_out (harvest both in one run)"
        )
    if cfg.hook_out is not None and not any(transcodes):
        raise TrainError(
            f"train.hook_out={cfg.hook_out} is set, but no dictionary is a transcoder (sae=transcoder); drop it"
        )
    return [cfg.hook_out if t else None for t in transcodes]


def _check_widths(configs: list[SaeConfig], d_in: int) -> None:
    for c in configs:
        try:
            c.check_input_width(d_in)
        except ValueError as err:
            raise TrainError(str(err)) from err


@dataclass
class _Outliers:
    """Training positions left out by train.exclude_outliers."""

    keep: torch.Tensor  # [n_train] bool: False at positions whose norm exceeds `limit`
    limit: float  # exclude_outliers x the median norm of the training split (BOS left out)
    eligible: int  # training positions left: neither outliers nor (exclude_bos) BOS


def _outliers(cfg: TrainConfig, shards: ShardSet, n_train: int) -> _Outliers:
    norms, ordinary = shards.position_norms(n_train, cfg.exclude_bos)  # [n_train] each
    limit = cfg.exclude_outliers * float(norms[ordinary].median())
    keep = norms <= limit
    left_out = int((ordinary & ~keep).sum())
    log.info("train.exclude_outliers=%g: %d of %d training positions (%.2f%%) have a norm above %.1f and are left out",
             cfg.exclude_outliers, left_out, int(ordinary.sum()), 100 * left_out / max(1, int(ordinary.sum())), limit)  # fmt: skip
    return _Outliers(keep, limit, int((ordinary & keep).sum()))


def _schedule(
    cfg: TrainConfig, shards: ShardSet, stream: ModelStream | None, n_train: int
) -> tuple[int, int, _Outliers | None]:
    """(batches per epoch of the training split, total steps, the outliers left out)."""
    if stream is not None:
        if cfg.tokens // cfg.batch_size < 1:
            raise TrainError(f"train.tokens={cfg.tokens} is less than one batch of {cfg.batch_size}")
        return 0, cfg.tokens // cfg.batch_size, None
    if n_train == 0:
        raise TrainError(
            f"train.holdout_tokens={cfg.holdout_tokens} leaves nothing to train on: the shards hold only "
            f"{shards.n_tokens} tokens. Harvest more, lower train.holdout_tokens, or train from the model "
            "(train.source=model)."
        )
    outliers = _outliers(cfg, shards, n_train) if cfg.exclude_outliers is not None else None
    return (*_steps(shards, cfg, n_train, outliers), outliers)


def _steps(shards: ShardSet, cfg: TrainConfig, n_train: int, outliers: _Outliers | None) -> tuple[int, int]:
    """(batches per epoch of the training split, total steps)."""
    bos = shards.manifest.bos_token_id if cfg.exclude_bos else None
    eligible = n_train - (shards.count_token(bos, stop=n_train) if bos is not None else 0)
    eligible = outliers.eligible if outliers is not None else eligible
    per_epoch = eligible // cfg.batch_size
    if per_epoch == 0:
        raise TrainError(
            f"the training split holds {eligible} tokens, fewer than one batch of {cfg.batch_size}"
        )
    total_steps = (cfg.tokens or int(cfg.epochs * eligible)) // cfg.batch_size
    if total_steps < 1:
        raise TrainError(f"train.tokens={cfg.tokens} is less than one batch of {cfg.batch_size}")
    return per_epoch, total_steps


def _data_identity(stored: dict[str, ShardSet], stream: ModelStream | None) -> list:
    """What the training data depends on, for the config hash."""
    data = [[s.manifest.weights_hash, [r.sha256 for r in s.manifest.shards]] for s in stored.values()]
    return data if stream is None else [*data, "model", stream.first_window, stream.forward_batch]


def plan_training(cfg: TrainConfig, sae_cfg: SaeConfig, run: RunDir, source: ModelSource | None = None) -> _Plan:
    """Check the settings against the activations and fix the split, the steps and the config hash."""
    sae_cfgs, hooks, targets = _variant_configs(sae_cfg, cfg)
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    read = hooks + [t for t in targets if t is not None]
    if cfg.source == "model":
        stream, stored = model_stream(cfg, source, run, read, dist)
    else:
        stream, stored = None, {hook: run.shards(hook) for hook in dict.fromkeys(read)}
    shards = stored_for(stored, cfg.hook)
    for other in stored.values():
        check_same_windows(shards, other)
    _check_widths(sae_cfgs, shards.d_model)
    if cfg.batch_size % dist.world:
        raise TrainError(f"train.batch_size={cfg.batch_size} must be divisible by the {dist.world} processes")
    n_train = heldout_start(shards.n_tokens, shards.manifest.context_length, cfg.holdout_tokens)
    per_epoch, total_steps, outliers = _schedule(cfg, shards, stream, n_train)
    if stream is None and cfg.shuffle_shards is None and (remote_mix := shards.default_shuffle_shards(len(stored))) is not None:
        cfg = replace(cfg, shuffle_shards=remote_mix)
        log.info("shards on object storage: batches mix up to %d shards at a time (train.shuffle_shards)", cfg.shuffle_shards)
    hash_ = config_hash(
        {
            "format_version": FORMAT_VERSION,
            "train": {
                **_hashed(cfg, _HASHED_WHEN_SET, _NOT_HASHED),
                "dead_tokens": _dead_windows(cfg, sae_cfgs, shards.d_model),
            },
            "saes": [_sae_hashed(c, shards.d_model) for c in sae_cfgs],
            "data": _data_identity(stored, stream),
        }
    )
    return _Plan(run, cfg, sae_cfgs, hooks, targets, stored, stream, n_train, per_epoch, total_steps, hash_, dist,
                 device, outliers)  # fmt: skip


def _input_samples(plan: _Plan, n: int = 16_384) -> dict[str, torch.Tensor]:
    """fp32 training tokens {hook: [n, d_in]} (the same tokens at every hook) for the input scales and
    the b_dec inits."""
    if plan.stream is None:
        idx = input_positions(plan.shards, plan.n_train, n, plan.cfg, plan.keep)
        return {hook: shards.gather(idx).float() for hook, shards in plan.stored.items()}
    return {hook: x.float().cpu() for hook, x in plan.stream.sample(n).items()}


def _batches(plan: _Plan, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """This process' batches {hook: [batch_size / processes, d_in]} from `start_step` on (shards read
    ahead on a thread)."""
    cfg, dist = plan.cfg, plan.dist
    local = dist.local_slice(cfg.batch_size)
    if plan.stream is None:
        others = tuple(s for s in plan.stored.values() if s is not plan.shards)
        positions = training_positions(plan.shards, cfg, plan.n_train, plan.per_epoch, start_step, plan.keep, others)
        return prefetch({hook: s.gather(idx[local]) for hook, s in plan.stored.items()} for idx in positions)
    size = local.stop - local.start
    block = min(max(1, cfg.buffer_tokens // size), plan.total_steps) * size  # never more than training needs
    # on this thread: the forward competes with the SAE step for the same cores (CPU) or queues its
    # kernels on the same stream (GPU), so a reader thread gains nothing, and on CPU its forward ran 25% slower
    return plan.stream.batches(size, block, cfg.seed, start_step, dist.rank, dist.world)


def _members(plan: _Plan) -> tuple[list[TrainingMember], dict[str, float]]:
    """Freshly initialized dictionaries with their optimizers, and each hook's input scale."""
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
        sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        # b_dec in the space of what it reconstructs (a transcoder's target), the inputs for what else needs them
        sae.init_from_data(samples[target or hook] * scales[target or hook], samples[hook] * scales[hook])
        members.append(TrainingMember(sae.to(plan.device), cfg))
    return members, scales


def _resume(plan: _Plan, members: list[TrainingMember]) -> int:
    """Restore the members from the checkpoint, if there is one; return the step to start at."""
    resumed = load_checkpoint(plan.checkpoint, members, plan.config_hash)
    if not resumed:
        return 0
    log.info("resuming from %s at step %d of %d", plan.checkpoint, resumed["step"], plan.total_steps)
    return resumed["step"]


def _check_finite(first_bad: torch.Tensor, plan: _Plan) -> None:
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


def _scaled(batch: dict[str, torch.Tensor], scales: dict[str, float], plan: _Plan) -> tuple[dict, dict, torch.Tensor]:
    """(each hook's fp32 batch on the device times its input scale, its variance over all processes,
    whether every value was finite)."""
    xs = {hook: x.to(plan.device, torch.float32, non_blocking=True) for hook, x in batch.items()}
    finite = torch.stack([torch.isfinite(x).all() for x in xs.values()]).all()
    xs = {hook: x * scales[hook] for hook, x in xs.items()}
    return xs, {hook: global_variance(x, plan.dist) for hook, x in xs.items()}, finite


def _train_loop(
    plan: _Plan, members: list[TrainingMember], scales: dict[str, float], start_step: int, tracker: Tracker
) -> None:
    cfg, dist, device, total = plan.cfg, plan.dist, plan.device, plan.total_steps
    steps = [make_step(m, cfg, dist, device) for m in members]
    bar = tqdm(
        total=total, initial=start_step, unit="step", desc="train", disable=not cfg.progress or dist.rank != 0
    )
    # the first step whose batch held NaN / Inf, kept on the device and checked when logging (no sync per step)
    first_bad = torch.tensor(-1, device=device)
    window_start, window_tokens = time.perf_counter(), 0
    last_checkpoint = window_start
    batches = _batches(plan, start_step)
    labels = [plan.label(i) for i in range(len(members))]
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


def _checkpoint_due(cfg: TrainConfig, done: int, last_checkpoint: float) -> bool:
    by_steps = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
    by_time = cfg.checkpoint_minutes and time.perf_counter() - last_checkpoint >= 60 * cfg.checkpoint_minutes
    return bool(by_steps or by_time)


def _save(plan: _Plan, i: int, m: TrainingMember, scales: dict[str, float]) -> tuple[Path, dict]:
    """Save dictionary i, acting on raw activations, with its held-out metrics."""
    cfg, hook, target = plan.cfg, plan.hooks[i], plan.targets[i]
    sae = copy.deepcopy(m.final_weights())
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
        100 * metrics["dead_fraction"], m.dead_tokens, 100 * metrics.get("silent_fraction", float("nan")), out,
    )  # fmt: skip
    return out, metrics


def _remove_checkpoint(plan: _Plan) -> None:
    remove_checkpoint(plan.checkpoint)
    plan.run.remove(plan.checkpoint)


@contextlib.contextmanager
def _outputs_locked(plan: _Plan) -> Iterator[None]:
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


def _train(plan: _Plan, wandb_cfg: WandbConfig | None) -> dict[str, Path]:
    members, scales = _members(plan)
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
            saved[plan.label(i)], metrics = _save(plan, i, m, scales)
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
