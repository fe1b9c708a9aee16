"""Dictionaries spliced into the real model: the standard SAE quality metrics on held-out windows
(used by the evaluate stage, and by compare for its transfer table).

For a group of dictionaries at one hook, on windows that training never saw (splits.py):
(a group of transcoders reads one hook and is spliced in, measured and ablated at the one it predicts)
  - reconstruction and sparsity metrics (metrics.py) on the activations at the hook;
  - next-token CE of the clean model, of the model with x_hat spliced in at the hook, and with the
    activation zero- and mean-ablated; CE loss recovered and KL(clean || spliced), per token too.
BOS positions (when excluded) keep their clean activation under the splice and both ablations, and
are not counted, so a dictionary that outputs zeros recovers exactly 0 of the CE loss.

Cost: one clean forward per batch, then per dictionary one spliced forward that skips the layers
before the hook (their clean outputs are replayed). Ablating a residual-stream hook removes
everything the model knows about the input, so its logits are the same for every window and are
computed once; attn_out/mlp_out ablations need their own forwards, shared by all dictionaries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline import metrics as M
from pipeline.config import check_settings
from pipeline.dictionaries import (
    Dictionary,
    DictionaryError,
    output_config_hash,
    shards_for,
    stored_activations_match,
)
from pipeline.hooks import (
    HookError,
    HookPoint,
    clean_pass,
    prefix_layers,
    replay_prefix,
    splice_activations,
    validate_hooks,
    watch_activation,
)
from pipeline.models import LoadedModel
from pipeline.rundir import RunDir
from pipeline.sae import Sae
from pipeline.shards import ShardSet
from pipeline.splits import evaluation_start, evaluation_windows

FORMAT_VERSION = 2  # 2: sparsity.silent_fraction and density_histogram.silent (were dead_fraction, dead)


class EvaluationError(DictionaryError):
    """The evaluation cannot run as configured; the message says how to fix it."""


class NonFiniteActivations(EvaluationError):
    """The activations at the hook hold NaN or Inf at an evaluated position."""

    def __init__(self, hook: HookPoint, window: int, position: int, where: str = "", fix: str = ""):
        self.window, self.position = window, position
        where = where or f"evaluation window {window}, position {position}"
        super().__init__(f"NaN or Inf in the activations at {hook.name}, {where}{fix}")


def _check_finite(x: torch.Tensor, replaced: torch.Tensor, first_window: int, hook: HookPoint) -> None:
    """Stop at the first NaN / Inf of x [batch, seq, d_model] among the evaluated positions."""
    bad = replaced & ~torch.isfinite(x).all(-1)
    if bad.any():
        row, position = bad.nonzero()[0].tolist()
        raise NonFiniteActivations(hook, first_window + row, position)


@dataclass
class EvaluationSettings:
    """On which held-out tokens, and how, dictionaries are evaluated."""

    tokens: int | None = None
    """Evaluation tokens (whole windows from the start of the held-out split); null = all held-out."""
    holdout_tokens: int = 32768
    """Held-out size for dictionaries whose cfg.json does not record their training split."""
    batch_size: int = 4
    """Windows per forward pass (the logits of a batch take batch x context x vocab floats)."""
    exclude_bos: bool = True
    """As in training: BOS positions keep their clean activation and are left out of the metrics."""
    worst_tokens: int = 20
    """How many highest-KL tokens to list in metrics.json."""
    progress: bool = True

    def __post_init__(self) -> None:
        check_settings(
            self,
            "evaluate",
            EvaluationError,
            positive=("batch_size",),
            non_negative=("holdout_tokens", "worst_tokens"),
        )
        if self.tokens is not None and self.tokens < 2:
            raise EvaluationError(f"evaluate.tokens={self.tokens}: too few evaluation tokens (at least 2)")


# ---------------------------------------------------------------- ablations


def _ablation(value: torch.Tensor, replaced: torch.Tensor):
    """Activation -> `value` at the replaced positions [batch, seq], clean elsewhere."""
    return lambda a: torch.where(replaced[..., None], value.to(a.dtype), a)


def _input_independent_ablation(hook: HookPoint, replaced: torch.Tensor) -> bool:
    """Ablating the whole residual stream leaves nothing of the input when the positions kept clean
    (BOS) are the same in every window and only at position 0 (whose activation sees no context)."""
    kept = ~replaced
    return hook.on_residual_stream and not kept[:, 1:].any() and bool((kept[:, 0] == kept[0, 0]).all())


def _constant_ablations(
    loaded: LoadedModel, hook: HookPoint, window: torch.Tensor, replaced: torch.Tensor, mean: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Log-probs [seq, vocab] of the model with the residual stream zero- or mean-ablated at `hook`
    (where `replaced` [seq]): the same for every window when _input_independent_ablation holds."""
    out = {}
    for name, value in (("zero", torch.zeros_like(mean)), ("mean", mean)):
        with splice_activations(loaded.model, hook, _ablation(value, replaced[None])):
            out[name] = M.log_probs(loaded.model(input_ids=window[None], use_cache=False).logits[0])
    return out


def _mean_activation(shards: ShardSet, first: int, count: int, exclude_bos: bool) -> torch.Tensor:
    """Mean activation over the evaluation tokens (the mean-ablation value): [d_model]."""
    ctx = shards.manifest.context_length
    total, n = torch.zeros(shards.d_model, dtype=torch.float64), 0
    for idx in shards.position_chunks(first * ctx, (first + count) * ctx, 8192, exclude_bos):
        x = shards.gather(idx)
        shards.check_finite(x, idx)
        total += x.double().sum(0)
        n += len(idx)
    return (total / max(n, 1)).float()


# ---------------------------------------------------------------- the evaluation pass


class _PerToken:
    """Per-prediction losses [n_windows, ctx - 1]: those every dictionary shares (clean, ablated) and
    each dictionary's own, with the mask of predictions that count."""

    SHARED = ("ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean")

    def __init__(self, n_windows: int, ctx: int, names: list[str]):
        def zeros():
            return torch.zeros(n_windows, ctx - 1)

        self.shared = {key: zeros() for key in self.SHARED}
        self.own = {name: {"ce_with_sae": zeros(), "kl": zeros()} for name in names}
        self.counted = torch.zeros(n_windows, ctx - 1, dtype=torch.bool)

    def store(self, rows: slice, counted: torch.Tensor, nll_clean: torch.Tensor, compared: dict) -> None:
        """One batch: next_token_losses' output for the windows `rows`."""
        self.counted[rows] = counted.cpu()
        self.shared["ce_clean"][rows] = nll_clean.cpu()
        for kind in ("zero", "mean"):
            self.shared[f"ce_{kind}"][rows] = compared[kind][0].cpu()
            self.shared[f"kl_{kind}"][rows] = compared[kind][1].cpu()
        for name, own in self.own.items():
            own["ce_with_sae"][rows] = compared[name][0].cpu()
            own["kl"][rows] = compared[name][1].cpu()

    def of(self, name: str) -> dict[str, torch.Tensor]:
        return {**self.shared, **self.own[name], "counted": self.counted}

    def means(self, name: str) -> dict[str, float]:
        """Every loss of `name`'s evaluation averaged over the counted predictions."""
        return {k: float(v[self.counted].double().mean()) for k, v in self.of(name).items() if k != "counted"}


def _spliced_logits(loaded, hook, saes, stats, x, read, replaced, kept, ids) -> dict[str, torch.Tensor]:
    """Each dictionary's x_hat of the activations `read` (transcoders; else x) spliced in for x at the
    replaced positions: {name: logits [b, seq, vocab]}; the reconstruction statistics are updated on the way."""
    out = {}
    for name, sae in saes.items():
        x_in = read[replaced].float()  # [tokens, d_model]
        x_hat, codes = sae(x_in)
        stats[name].update(x[replaced].float(), x_hat, codes)
        spliced = x.clone()
        spliced[replaced] = x_hat.to(x.dtype)
        out[name] = _forward_with(loaded.model, hook, lambda _a, s=spliced: s, kept, ids)
    return out


def _clean_pass(model, hook: HookPoint, reads: HookPoint | None, ids, stored, template) -> tuple:
    """hooks.clean_pass, also keeping what transcoders read at `reads`: (logits, the activation at
    `hook`, the one the dictionaries read, the prefix record)."""
    with watch_activation(model, reads) as read:
        logits, x, kept = clean_pass(model, hook, ids, stored, template)
    return logits, x, read[0] if reads else x, kept


def _forward_with(model, hook: HookPoint, activation_fn, kept: list, ids: torch.Tensor) -> torch.Tensor:
    """Logits with the activation at `hook` replaced, the layers before it replayed from `kept`."""
    with splice_activations(model, hook, activation_fn), replay_prefix(model, prefix_layers(hook), kept):
        return model(input_ids=ids, use_cache=False).logits


@torch.inference_mode()
def evaluate_hook(
    loaded: LoadedModel,
    hook: HookPoint,
    saes: dict[str, Sae],
    windows: torch.Tensor,
    mean: torch.Tensor,
    bos: int | None,
    cfg: EvaluationSettings,
    stored: Callable[[slice], torch.Tensor] | None = None,
    reads: HookPoint | None = None,
) -> dict[str, dict]:
    """Evaluate dictionaries at one hook on token windows [n_windows, ctx]; transcoders read the
    activations at `reads` and are spliced in (and ablations done) at `hook`.

    `mean` is the mean-ablation value [d_model]; positions holding `bos` keep their clean activation
    and no prediction of `bos` is counted. `stored(rows)`, when given, returns the activations at a
    resid_pre / resid_post hook [rows, ctx, d_model] as this model computes them (harvested shards):
    then even the clean pass skips the layers before the hook.
    Returns {name: {"metrics", "density", "per_token"}}."""
    device = loaded.device
    saes = {name: sae.to(device).eval() for name, sae in saes.items()}
    stats = {name: M.StreamingReconstructionStats(s.d_in, s.d_sae, device) for name, s in saes.items()}
    per_token = _PerToken(*windows.shape, list(saes))
    mean = mean.to(device)
    replaced_all = windows != bos if bos is not None else torch.ones_like(windows, dtype=torch.bool)
    constant = None
    if _input_independent_ablation(hook, replaced_all):
        constant = _constant_ablations(
            loaded, hook, windows[0].to(device, torch.long), replaced_all[0].to(device), mean
        )
    bar = tqdm(
        total=windows.numel(),
        unit="tok",
        unit_scale=True,
        desc=f"evaluate {hook.name}",
        disable=not cfg.progress,
    )
    template = None  # the prefix record of a pass from stored activations stands for any input: made once
    for lo in range(0, len(windows), cfg.batch_size):
        ids = windows[lo : lo + cfg.batch_size].to(device, torch.long)
        rows = slice(lo, lo + len(ids))
        replaced = replaced_all[rows].to(device)  # positions the dictionary (or an ablation) replaces
        x_stored = None if stored is None else stored(rows).to(loaded.dtype)
        clean_logits, x, read, kept = _clean_pass(loaded.model, hook, reads, ids, x_stored, template)
        template = kept if stored is not None else None
        _check_finite(x, replaced, lo, hook)
        others = dict(constant) if constant is not None else {
            kind: _forward_with(loaded.model, hook, _ablation(value, replaced), kept, ids)
            for kind, value in (("zero", torch.zeros_like(mean)), ("mean", mean))
        }  # fmt: skip
        others.update(_spliced_logits(loaded, hook, saes, stats, x, read, replaced, kept, ids))
        nll_clean, compared = M.next_token_losses(clean_logits, others, ids)
        per_token.store(rows, replaced[:, 1:], nll_clean, compared)
        bar.update(ids.numel())
    bar.close()
    return {
        name: {"metrics": _metrics(stats[name], per_token.means(name), int(per_token.counted.sum())),
               "density": stats[name].density(), "per_token": per_token.of(name)}
        for name in saes
    }  # fmt: skip


def _metrics(st: M.StreamingReconstructionStats, loss: dict[str, float], n_predictions: int) -> dict:
    """metrics.json's `metrics`, in SAEBench's core-evaluation groups and names."""
    fvu = st.fvu()
    return {
        "model_behavior_preservation": {
            "kl_div_score": M.kl_div_score(loss["kl"], loss["kl_zero"]),
            "kl_div_with_ablation": loss["kl_zero"],
            "kl_div_with_sae": loss["kl"],
            "kl_div_with_mean_ablation": loss["kl_mean"],
        },
        "model_performance_preservation": {
            "ce_loss_score": M.ce_loss_recovered(loss["ce_clean"], loss["ce_with_sae"], loss["ce_zero"]),
            "ce_loss_with_ablation": loss["ce_zero"],
            "ce_loss_with_sae": loss["ce_with_sae"],
            "ce_loss_without_sae": loss["ce_clean"],
            "ce_loss_with_mean_ablation": loss["ce_mean"],
            "ce_loss_score_mean_ablation": M.ce_loss_recovered(
                loss["ce_clean"], loss["ce_with_sae"], loss["ce_mean"]
            ),
        },
        "reconstruction_quality": {
            "explained_variance": 1 - fvu,
            "fvu": fvu,
            "fvu_per_dimension": st.fvu_per_dimension(),
            "explained_variance_per_dimension": 1 - st.fvu_per_dimension(),
            "mse": st.mse(),
            "cossim": st.cossim(),
        },
        "shrinkage": {
            "l2_norm_in": float(st.sum_norm_in / st.n),
            "l2_norm_out": float(st.sum_norm_out / st.n),
            "l2_ratio": st.l2_ratio(),
        },
        "sparsity": {
            "l0": st.l0(),
            "l1": st.l1(),
            "silent_fraction": st.silent_fraction(),
            "dense_fraction": st.frequent_fraction(0.1),
            "freq_over_1_percent": st.frequent_fraction(0.01),
        },
        "token_stats": {"total_tokens_eval_reconstruction": st.n, "total_tokens_eval_ce": n_predictions},
    }


# ---------------------------------------------------------------- a run's dictionaries at one hook


@dataclass
class HeldOut:
    """The held-out windows a group of dictionaries at one hook is evaluated on."""

    hook: HookPoint  # where they are spliced in (a transcoder's output hook)
    shards: ShardSet
    first: int  # first window
    windows: torch.Tensor  # tokens [count, ctx]
    bos: int | None  # the token kept clean and not counted (None: every position counts)
    settings: dict  # what the output depends on besides weights, model and shards
    reads: HookPoint | None = None  # transcoders: the hook they read (None: `hook`)

    @property
    def read_hook(self) -> HookPoint:
        """Where the dictionaries read their input (their codes come from the activations there)."""
        return self.reads or self.hook

    def output_hash(self, d: Dictionary, loaded: LoadedModel) -> str:
        return output_config_hash(d.sae, loaded, self.shards, self.settings)


def held_out(
    loaded: LoadedModel, run: RunDir, hook_name: str, group: list[Dictionary], cfg: EvaluationSettings
) -> HeldOut:
    """The run's held-out windows after every dictionary's training split, at `hook_name` (where the
    group reads; transcoders, all predicting one hook_out, are spliced in there)."""
    outputs = {d.sae.meta.get("hook_out") for d in group}
    if len(outputs) > 1:
        raise EvaluationError(f"evaluate dictionaries that predict different hooks ({sorted(map(str, outputs))}) apart")
    hook_out = outputs.pop()
    try:
        reads, *writes = validate_hooks(loaded.model, [hook_name] + ([hook_out] if hook_out else []))
    except HookError as err:
        raise EvaluationError(f"cannot evaluate {[str(d.directory) for d in group]}: {err}") from err
    shards = shards_for(run, writes[0].name if writes else hook_name, loaded)
    ctx = shards.manifest.context_length
    splits = [d.sae.meta.get("training_split_tokens") for d in group]
    start = evaluation_start(shards.n_tokens, ctx, splits, cfg.holdout_tokens)
    first, count = evaluation_windows(
        shards.manifest.n_sequences, ctx, start, cfg.tokens, str(shards.directory)
    )
    windows = shards.tokens_at(torch.arange(first * ctx, (first + count) * ctx)).view(count, ctx)
    bos = shards.manifest.bos_token_id if cfg.exclude_bos else None
    settings = {"windows": [first, count], "exclude_bos": cfg.exclude_bos, "format_version": FORMAT_VERSION}
    if writes:
        return HeldOut(writes[0], shards, first, windows, bos, settings, reads=reads)
    return HeldOut(reads, shards, first, windows, bos, settings)


def _stored_activations(held: HeldOut, loaded: LoadedModel) -> Callable[[slice], torch.Tensor] | None:
    """Harvested activations of the evaluation windows, where they are exactly what this model
    computes at the hook (same weights, stored in its compute dtype, at a layer boundary)."""
    if not stored_activations_match(held.shards, loaded, held.hook):
        return None
    first, shards = held.first, held.shards
    return lambda rows: torch.stack([shards.sequence(first + i)[1] for i in range(rows.start, rows.stop)])


def _worst_tokens(per_token: dict, tokens: torch.Tensor, tokenizer, n: int) -> list[dict]:
    """The `n` predictions with the highest KL(clean || spliced), with their context."""
    kl = per_token["kl"].clone()
    kl[~per_token["counted"]] = -1
    worst = []
    for flat in kl.flatten().topk(min(n, kl.numel())).indices.tolist():
        seq, pos = divmod(flat, kl.shape[1])
        worst.append(
            {
                "window": seq,
                "position": pos,
                "context": tokenizer.decode(tokens[seq, max(0, pos - 12) : pos + 1].tolist()),
                "token": tokenizer.decode([int(tokens[seq, pos])]),
                "next_token": tokenizer.decode([int(tokens[seq, pos + 1])]),
                "kl": float(kl[seq, pos]),
                "ce_clean": float(per_token["ce_clean"][seq, pos]),
                "ce_with_sae": float(per_token["ce_with_sae"][seq, pos]),
            }
        )
    return worst


def _located(err: NonFiniteActivations, held: HeldOut, stored: bool) -> NonFiniteActivations:
    """The error again, naming the shard and position of the bad activation and what to do."""
    token = (held.first + err.window) * held.windows.shape[1] + err.position
    if stored:
        where, fix = (
            f"as stored in {held.shards.locate(token)}",
            "; delete that shard and re-run the harvest command",
        )
    else:
        where = f"as the model computes them for the tokens of {held.shards.locate(token)}"
        fix = "; the model overflows there: evaluate in float32 (model.dtype=float32)"
    return NonFiniteActivations(held.hook, err.window, err.position, where, fix)


def evaluate_dictionaries(
    loaded: LoadedModel, held: HeldOut, group: list[Dictionary], cfg: EvaluationSettings
) -> dict[str, tuple[dict, dict]]:
    """Evaluate `group` on the held-out windows: {name: (metrics.json content, full result with the
    per-token losses and the density)}."""
    started = time.perf_counter()
    mean = _mean_activation(held.shards, held.first, len(held.windows), held.bos is not None)
    saes = {d.name: d.sae for d in group}
    stored = _stored_activations(held, loaded)
    try:
        results = evaluate_hook(loaded, held.hook, saes, held.windows, mean, held.bos, cfg, stored, held.reads)
    except NonFiniteActivations as err:
        raise _located(err, held, stored is not None) from None
    tokens_per_s = held.windows.numel() / (time.perf_counter() - started)
    out = {}
    for d in group:
        result = results[d.name]
        report = {
            "format_version": FORMAT_VERSION,
            "sae": d.name,
            "sae_dir": str(d.directory),
            "architecture": d.sae.cfg.architecture,
            "d_sae": d.sae.d_sae,
            "hook": held.read_hook.name,
            **({"hook_out": held.hook.name} if held.reads else {}),
            "model_id": loaded.model_id,
            "weights_hash": loaded.weights_hash,
            "corpus_id": held.shards.manifest.corpus_id,
            "eval_windows": {
                "first": held.first,
                "count": len(held.windows),
                "context_length": held.windows.shape[1],
            },
            "eval_tokens": int(held.windows.numel()),
            "exclude_bos": held.settings["exclude_bos"],
            "tokens_per_s": tokens_per_s,
            "config_hash": held.output_hash(d, loaded),
            "metrics": result["metrics"],
            "density_histogram": M.density_histogram(
                result["density"], low=-math.ceil(math.log10(held.windows.numel()))
            ),
            "worst_tokens": _worst_tokens(
                result["per_token"], held.windows, loaded.tokenizer, cfg.worst_tokens
            ),
        }
        out[d.name] = (report, result)
    return out


def summary_row(report: dict) -> dict:
    """The headline numbers of one metrics.json (for the summary table and the Pareto plot)."""
    m = report["metrics"]
    perf = m["model_performance_preservation"]
    return {
        "label": report["sae"],
        "hook": report["hook"] + (f" -> {report['hook_out']}" if report.get("hook_out") else ""),
        "l0": m["sparsity"]["l0"],
        "fvu": m["reconstruction_quality"]["fvu"],
        "cossim": m["reconstruction_quality"]["cossim"],
        "ce_loss_without_sae": perf["ce_loss_without_sae"],
        "ce_loss_with_sae": perf["ce_loss_with_sae"],
        "ce_loss_with_ablation": perf["ce_loss_with_ablation"],
        "ce_loss_score": perf["ce_loss_score"],
        "kl_div_with_sae": m["model_behavior_preservation"]["kl_div_with_sae"],
        # metrics.json of format 1 (other runs' on the Pareto plot) named it dead_fraction
        "silent_fraction": m["sparsity"].get("silent_fraction", m["sparsity"].get("dead_fraction")),
        "dense_fraction": m["sparsity"]["dense_fraction"],
    }
