"""What a training run is, decided before its first step: the dictionaries and their hooks, the
split, the schedule, the outliers left out and the config hash (the train stage's plan).

`plan_training` checks the settings against the activations (stored, or computed by the model with
`train.source=model`) and returns a TrainingPlan; nothing is trained or written here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipeline.config import to_dataclass
from pipeline.models import resolve_device
from pipeline.rundir import RunDir, config_hash
from pipeline.sae import Sae, SaeConfig, architectures
from pipeline.sae.base import FORMAT_VERSION
from pipeline.shards import ShardSet, check_same_windows
from pipeline.splits import heldout_start
from pipeline.streaming import ModelSource, ModelStream, model_stream, stored_for
from pipeline.training import Dist, TrainConfig, TrainError, init_distributed

log = logging.getLogger(__name__)

_NOT_HASHED = {"log_every", "checkpoint_every", "checkpoint_minutes", "progress", "device", "compile",  # change no result
               "init_from"}  # its path: the start's weights enter the hash by their digest, wherever they lie
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
    """A dictionary's settings in the config hash, with AuxK's weight and k_aux resolved: their
    defaults changed (a fixed 0.25 before the rule in k; d_in / 2 before 2 k), so a dictionary
    trained under an old one trains again, and one whose setting only moved to the rule does not.
    The balanced selection's exponent enters where it is not 0 (added later: 0 is the earlier
    selection)."""
    settings = {**_hashed(c, _SAE_HASHED_WHEN_SET, {"balance"}), "aux_coefficient": c.aux_weight(d_in)}
    if balance := c.balance_exponent(d_in):
        settings["balance"] = balance
    if c.active_per_token() is not None:
        settings["k_aux"] = c.aux_latents(d_in)
    return settings


@dataclass
class TrainingPlan:
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
    initial: Sae | None = None  # train.init_from's dictionary, on raw activations
    initial_digest: str | None = None  # its weights' digest (hashed once: in the config hash and each cfg.json)

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


def initial_dictionary(cfg: TrainConfig, sae_cfgs: list[SaeConfig], d_in: int) -> Sae | None:
    """train.init_from's dictionary (acting on raw activations), checked against every dictionary to
    train; None when training starts from a fresh initialization."""
    if cfg.init_from is None:
        return None
    try:
        start = Sae.load(cfg.init_from)
    except (OSError, ValueError, KeyError) as err:
        raise TrainError(f"train.init_from={cfg.init_from} is not a loadable dictionary ({err}); "
                         "point it at a directory holding a saved SAE (cfg.json and its weights)") from err  # fmt: skip
    found = (start.cfg.architecture, start.d_in, start.d_sae)
    for c in sae_cfgs:
        wanted = (c.architecture, d_in, c.width(d_in))
        if found != wanted:
            raise TrainError(
                f"train.init_from={cfg.init_from} is a {found[0]} dictionary of {found[1]} -> {found[2]} latents, "
                f"but {c.default_name()} is {wanted[0]} of {wanted[1]} -> {wanted[2]}: train the same "
                "architecture and width (sae.expansion / sae.d_sae) as the dictionary it starts from"
            )
    return start


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
        return 0, _total_steps(cfg, cfg.tokens), None
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
            f"the training split holds {eligible} tokens, fewer than one batch of {cfg.batch_size}; "
            f"harvest more tokens, or lower train.batch_size or holdout_tokens ({cfg.holdout_tokens})"
        )
    return per_epoch, _total_steps(cfg, cfg.tokens or int(cfg.epochs * eligible))


def _total_steps(cfg: TrainConfig, tokens: int) -> int:
    """Whole batches in `tokens` training tokens (at least one)."""
    if tokens < cfg.batch_size:
        setting = f"train.tokens={cfg.tokens}" if cfg.tokens else f"train.epochs={cfg.epochs} ({tokens} tokens)"
        raise TrainError(f"{setting} is less than one batch of {cfg.batch_size}; raise it or lower train.batch_size")
    return tokens // cfg.batch_size


def data_identity(stored: dict[str, ShardSet], stream: ModelStream | None) -> list:
    """What the training data depends on, for the config hash (and the benchmarks' peer keys)."""
    data = [[s.manifest.weights_hash, [r.sha256 for r in s.manifest.shards]] for s in stored.values()]
    return data if stream is None else [*data, "model", stream.first_window, stream.forward_batch]


def plan_training(cfg: TrainConfig, sae_cfg: SaeConfig, run: RunDir, source: ModelSource | None = None) -> TrainingPlan:
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
    initial = initial_dictionary(cfg, sae_cfgs, shards.d_model)
    initial_digest = None if initial is None else initial.digest()
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
            "data": data_identity(stored, stream),
            **({"init": initial_digest} if initial is not None else {}),
        }
    )
    return TrainingPlan(run, cfg, sae_cfgs, hooks, targets, stored, stream, n_train, per_epoch, total_steps, hash_, dist,
                 device, outliers, initial, initial_digest)  # fmt: skip
