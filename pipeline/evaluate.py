"""Evaluate stage: the standard SAE quality metrics, with each dictionary spliced into the real model.

    python -m pipeline evaluate run_dir=outputs/default evaluate.tokens=16384

For every dictionary under `<run_dir>/sae/<hook>/` (or those named in `evaluate.saes`), on held-out
windows that training never saw (the windows after the dictionary's training split):
  - reconstruction and sparsity metrics (metrics.py) on the activations at the hook;
  - next-token CE of the clean model, of the model with x_hat spliced in at the hook, and with the
    activation zero- and mean-ablated; CE loss recovered and KL(clean || spliced), per token too.
Writes `<run_dir>/eval/<hook>/<sae>/metrics.json` (SAEBench core-eval key names), `per_token.safetensors`,
`density.png`, and `<run_dir>/eval/pareto.png`; prints a summary table; logs to W&B.

Cost: one clean forward per batch, then per dictionary one spliced forward that skips the layers
before the hook (their clean outputs are replayed). Ablating a residual-stream hook removes
everything the model knows about the input, so its logits are the same for every window and are
computed once; attn_out/mlp_out ablations need their own forwards, shared by all dictionaries.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from safetensors.torch import save
from tqdm.auto import tqdm

from pipeline import metrics as M
from pipeline.config import CONF_DIR, to_dataclass
from pipeline.dictionaries import (
    Dictionary,
    DictionaryError,
    DictionarySelection,
    check_model,
    find_dictionaries,
    output_config_hash,
    shards_for,
    stored_activations_match,
)
from pipeline.fileio import atomic_write
from pipeline.models import (
    HookError,
    HookPoint,
    LoadedModel,
    ModelConfig,
    clean_pass,
    load_model,
    prefix_layers,
    replay_prefix,
    splice_activations,
    validate_hooks,
)
from pipeline.plots import density_plot, pareto_plot
from pipeline.sae import Sae
from pipeline.shards import ShardSet
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class EvaluateError(DictionaryError):
    """The evaluation cannot run as configured; the message says how to fix it."""


@dataclass
class EvaluateConfig(DictionarySelection):
    """Which dictionaries to evaluate, and on how many held-out tokens."""

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
    compare_with: list[str] = field(default_factory=list)
    """Other run directories whose evaluated dictionaries join the Pareto plot (e.g. a sweep)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EvaluateError(f"evaluate.batch_size must be positive, got {self.batch_size}")
        if self.tokens is not None and self.tokens < 2:
            raise EvaluateError(f"evaluate.tokens={self.tokens}: too few evaluation tokens")


def _held_out_start(shards: ShardSet, dictionaries: list[Dictionary], holdout_tokens: int) -> int:
    """First token no dictionary trained on, on a window boundary."""
    ctx = shards.manifest.context_length
    default = max(0, shards.n_tokens - -(-holdout_tokens // ctx) * ctx)
    start = max(int(d.sae.meta.get("training_split_tokens", default)) for d in dictionaries)
    return -(-start // ctx) * ctx


def evaluation_windows(shards: ShardSet, start: int, tokens: int | None) -> tuple[int, int]:
    """(first sequence, number of sequences) of the evaluation windows, from token `start` on."""
    ctx = shards.manifest.context_length
    available = shards.manifest.n_sequences - start // ctx
    wanted = available if tokens is None else -(-tokens // ctx)
    if available < 1:
        raise EvaluateError(
            f"too few evaluation tokens: {shards.directory} holds {shards.n_tokens} tokens and all of them were "
            "used in training; harvest more (raise harvest.tokens) or train with a larger train.holdout_tokens"
        )
    if wanted > available:
        raise EvaluateError(
            f"evaluate.tokens={tokens} asks for more than the {available * ctx} held-out tokens in "
            f"{shards.directory} (the rest was trained on); lower evaluate.tokens or harvest more"
        )
    return start // ctx, wanted


# ---------------------------------------------------------------- the evaluation pass


def _ablation_log_probs(
    loaded: LoadedModel, hook: HookPoint, window: torch.Tensor, replaced: torch.Tensor, mean: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Log-probs [seq, vocab] of the model with the residual stream zero- or
    mean-ablated at `hook` (where `replaced` [seq]): the same for every window whose only clean
    position is a BOS at 0, since nothing about the input survives the ablation."""
    out = {}
    for name, value in (("zero", torch.zeros_like(mean)), ("mean", mean)):
        ablate = _ablation(value, replaced[None])
        with splice_activations(loaded.model, hook, ablate):
            out[name] = M.log_probs(loaded.model(input_ids=window[None], use_cache=False).logits[0])
    return out


def _ablation(value: torch.Tensor, replaced: torch.Tensor):
    """Activation -> `value` at the replaced positions [batch, seq], clean elsewhere."""
    return lambda a: torch.where(replaced[..., None], value.to(a.dtype), a)


def _input_independent_ablation(hook: HookPoint, replaced: torch.Tensor) -> bool:
    """Ablating the whole residual stream leaves nothing of the input when the positions kept clean
    (BOS) are the same in every window and only at position 0 (whose activation sees no context)."""
    kept = ~replaced
    return hook.point.startswith("resid") and not kept[:, 1:].any() and bool((kept[:, 0] == kept[0, 0]).all())


def _mean_activation(shards: ShardSet, first: int, count: int, bos: int | None) -> torch.Tensor:
    """Mean activation over the evaluation tokens (the mean-ablation value): [d_model]."""
    ctx = shards.manifest.context_length
    total, n = torch.zeros(shards.d_model, dtype=torch.float64), 0
    for lo in range(first * ctx, (first + count) * ctx, 8192):
        idx = torch.arange(lo, min(lo + 8192, (first + count) * ctx))
        if bos is not None:
            idx = idx[shards.tokens_at(idx) != bos]
        total += shards.gather(idx).double().sum(0)
        n += len(idx)
    return (total / max(n, 1)).float()


def _worst_tokens(per_token: dict, tokens: torch.Tensor, tokenizer, n: int) -> list[dict]:
    kl = per_token["kl"].clone()
    kl[~per_token["counted"]] = -1
    worst = []
    for flat in kl.flatten().topk(min(n, kl.numel())).indices.tolist():
        seq, pos = divmod(flat, kl.shape[1])
        context = tokens[seq, max(0, pos - 12) : pos + 1].tolist()
        worst.append(
            {
                "window": seq,
                "position": pos,
                "context": tokenizer.decode(context),
                "token": tokenizer.decode([int(tokens[seq, pos])]),
                "next_token": tokenizer.decode([int(tokens[seq, pos + 1])]),
                "kl": float(kl[seq, pos]),
                "ce_clean": float(per_token["ce_clean"][seq, pos]),
                "ce_with_sae": float(per_token["ce_with_sae"][seq, pos]),
            }
        )
    return worst


@torch.inference_mode()
def evaluate_hook(
    loaded: LoadedModel,
    hook: HookPoint,
    saes: dict[str, Sae],
    windows: torch.Tensor,
    mean: torch.Tensor,
    bos: int | None,
    cfg: EvaluateConfig,
    stored: Callable[[slice], torch.Tensor] | None = None,
) -> dict[str, dict]:
    """Evaluate dictionaries at one hook on token windows [n_windows, ctx].

    `mean` is the mean-ablation value [d_model]; positions holding `bos` keep their clean activation
    and no prediction of `bos` is counted. `stored(rows)`, when given, returns the activations at a
    resid_pre / resid_post hook [rows, ctx, d_model] as this model computes them (harvested shards):
    then even the clean pass skips the layers before the hook.
    Returns {name: {"metrics", "density", "per_token"}}."""
    model, device = loaded.model, loaded.device
    n_prefix = prefix_layers(hook)
    saes = {name: sae.to(device).eval() for name, sae in saes.items()}
    stats = {name: M.StreamingReconstructionStats(s.d_in, s.d_sae, device) for name, s in saes.items()}
    n_windows, ctx = windows.shape

    def zeros():
        return torch.zeros(n_windows, ctx - 1)

    shared = {k: zeros() for k in ("ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean")}
    own = {name: {"ce_with_sae": zeros(), "kl": zeros()} for name in saes}
    counted = torch.zeros(n_windows, ctx - 1, dtype=torch.bool)
    mean = mean.to(device)
    replaced_all = windows != bos if bos is not None else torch.ones_like(windows, dtype=torch.bool)
    constant = None
    if _input_independent_ablation(hook, replaced_all):
        constant = _ablation_log_probs(
            loaded, hook, windows[0].to(device, torch.long), replaced_all[0].to(device), mean
        )

    def forward_with(activation_fn, kept, ids) -> torch.Tensor:
        with splice_activations(model, hook, activation_fn), replay_prefix(model, n_prefix, kept):
            return model(input_ids=ids, use_cache=False).logits

    bar = tqdm(total=windows.numel(), unit="tok", unit_scale=True, desc=f"evaluate {hook.name}",
               disable=not cfg.progress)  # fmt: skip
    template = None
    for lo in range(0, n_windows, cfg.batch_size):
        ids = windows[lo : lo + cfg.batch_size].to(device, torch.long)
        rows = slice(lo, lo + len(ids))
        replaced = replaced_all[rows].to(device)  # positions the dictionary (or an ablation) replaces
        counted[rows] = replaced[:, 1:].cpu()
        if stored is None:
            clean_logits, x, kept = clean_pass(model, hook, ids)  # [b, seq, vocab], [b, seq, d_model]
        else:  # the prefix record of a stored pass stands for any input: made once
            clean_logits, x, kept = clean_pass(model, hook, ids, stored(rows).to(loaded.dtype), template)
            template = kept
        others = {}
        for kind, value in (("zero", torch.zeros_like(mean)), ("mean", mean)):
            others[kind] = (
                constant[kind]
                if constant is not None
                else forward_with(_ablation(value, replaced), kept, ids)
            )
        for name, sae in saes.items():
            x_in = x[replaced].float()  # [tokens, d_model]
            codes = sae.encode(x_in)
            x_hat = sae.decode(codes)
            stats[name].update(x_in, x_hat, codes)
            spliced = x.clone()
            spliced[replaced] = x_hat.to(x.dtype)
            others[name] = forward_with(lambda _a, s=spliced: s, kept, ids)
        nll_clean, compared = M.next_token_losses(clean_logits, others, ids)
        shared["ce_clean"][rows] = nll_clean.cpu()
        for kind in ("zero", "mean"):
            shared[f"ce_{kind}"][rows] = compared[kind][0].cpu()
            shared[f"kl_{kind}"][rows] = compared[kind][1].cpu()
        for name in saes:
            own[name]["ce_with_sae"][rows] = compared[name][0].cpu()
            own[name]["kl"][rows] = compared[name][1].cpu()
        bar.update(ids.numel())
    bar.close()

    def avg(values: torch.Tensor) -> float:
        return float(values[counted].double().mean())

    results = {}
    for name in saes:
        st, ce, kl = stats[name], own[name]["ce_with_sae"], own[name]["kl"]
        ce_clean, ce_zero, ce_mean = avg(shared["ce_clean"]), avg(shared["ce_zero"]), avg(shared["ce_mean"])
        kl_zero, kl_sae = avg(shared["kl_zero"]), avg(kl)
        fvu = st.fvu()
        results[name] = {
            "metrics": {
                "model_behavior_preservation": {
                    "kl_div_score": M.kl_div_score(kl_sae, kl_zero),
                    "kl_div_with_ablation": kl_zero,
                    "kl_div_with_sae": kl_sae,
                    "kl_div_with_mean_ablation": avg(shared["kl_mean"]),
                },
                "model_performance_preservation": {
                    "ce_loss_score": M.ce_loss_recovered(ce_clean, avg(ce), ce_zero),
                    "ce_loss_with_ablation": ce_zero,
                    "ce_loss_with_sae": avg(ce),
                    "ce_loss_without_sae": ce_clean,
                    "ce_loss_with_mean_ablation": ce_mean,
                    "ce_loss_score_mean_ablation": M.ce_loss_recovered(ce_clean, avg(ce), ce_mean),
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
                    "dead_fraction": st.never_fired_fraction(),
                    "dense_fraction": st.frequent_fraction(0.1),
                    "freq_over_1_percent": st.frequent_fraction(0.01),
                },
                "token_stats": {
                    "total_tokens_eval_reconstruction": st.n,
                    "total_tokens_eval_ce": int(counted.sum()),
                },
            },
            "density": st.density(),
            "per_token": {**shared, **own[name], "counted": counted},
        }
    return results


# ---------------------------------------------------------------- the stage


def _stored_activations(
    shards: ShardSet, loaded: LoadedModel, hook: HookPoint, first: int
) -> Callable[[slice], torch.Tensor] | None:
    """Harvested activations of the evaluation windows, where they are exactly what this model
    computes at the hook (same weights, stored in its compute dtype, a residual-stream hook)."""
    if not stored_activations_match(shards, loaded, hook.name):
        return None
    return lambda rows: torch.stack([shards.sequence(first + i)[1] for i in range(rows.start, rows.stop)])


def _previous(out: Path, config_hash: str) -> dict | None:
    try:
        report = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("config_hash") == config_hash else None


def _write_outputs(out: Path, report: dict, result: dict, windows: torch.Tensor) -> None:
    out.mkdir(parents=True, exist_ok=True)
    per_token = {k: v.contiguous() for k, v in result["per_token"].items()}
    per_token["counted"] = per_token["counted"].to(torch.uint8)
    per_token["tokens"] = windows.to(torch.int32).contiguous()
    per_token["density"] = result["density"].contiguous()
    atomic_write(out / "per_token.safetensors", save(per_token))
    density_plot(report["density_histogram"], out / "density.png", f"{report['hook']} / {report['sae']}")
    atomic_write(out / "metrics.json", json.dumps(report, indent=2).encode())


def summary_row(report: dict) -> dict:
    """The headline numbers of one metrics.json (for the summary table and the Pareto plot)."""
    m = report["metrics"]
    return {
        "label": report["sae"],
        "hook": report["hook"],
        "l0": m["sparsity"]["l0"],
        "fvu": m["reconstruction_quality"]["fvu"],
        "cossim": m["reconstruction_quality"]["cossim"],
        "ce_loss_without_sae": m["model_performance_preservation"]["ce_loss_without_sae"],
        "ce_loss_with_sae": m["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_loss_with_ablation": m["model_performance_preservation"]["ce_loss_with_ablation"],
        "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
        "kl_div_with_sae": m["model_behavior_preservation"]["kl_div_with_sae"],
        "dead_fraction": m["sparsity"]["dead_fraction"],
        "dense_fraction": m["sparsity"]["dense_fraction"],
    }


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of summary rows."""
    columns = [
        ("hook", "hook", "{}"),
        ("dictionary", "label", "{}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.4f}"),
        ("cos", "cossim", "{:.3f}"),
        ("CE clean", "ce_loss_without_sae", "{:.3f}"),
        ("CE sae", "ce_loss_with_sae", "{:.3f}"),
        ("CE zero", "ce_loss_with_ablation", "{:.3f}"),
        ("CE rec.", "ce_loss_score", "{:.4f}"),
        ("KL", "kl_div_with_sae", "{:.4f}"),
        ("dead %", "dead_fraction", "{:.2%}"),
        ("dense %", "dense_fraction", "{:.2%}"),
    ]
    cells = [[title for title, _, _ in columns]]
    cells += [[fmt.format(row[key]).rstrip("%") for _, key, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]  # fmt: skip
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]) + "\n"


def collect_reports(run_dirs: list[Path]) -> list[dict]:
    """Every eval/<hook>/<sae>/metrics.json under the given run directories."""
    reports = []
    for run_dir in run_dirs:
        for path in sorted(Path(run_dir).glob("eval/*/*/metrics.json")):
            reports.append(json.loads(path.read_text()))
    return reports


def evaluate_group(
    loaded: LoadedModel,
    run_dir: Path,
    hook_name: str,
    group: list[Dictionary],
    cfg: EvaluateConfig,
    reuse: bool = True,
) -> tuple[dict[str, dict], dict[str, tuple[dict, torch.Tensor]]]:
    """Evaluate dictionaries at one hook on `run_dir`'s held-out windows: ({name: metrics.json content},
    {name: (full result, windows)} for those computed now). With `reuse`, a metrics.json of the same
    configuration is taken instead of computing."""
    reports: dict[str, dict] = {}
    try:
        hook = validate_hooks(loaded.model, [hook_name])[0]
    except HookError as err:
        raise EvaluateError(f"cannot evaluate {[str(d.directory) for d in group]}: {err}") from err
    shards = shards_for(run_dir, hook_name, loaded)
    first, count = evaluation_windows(shards, _held_out_start(shards, group, cfg.holdout_tokens), cfg.tokens)
    ctx = shards.manifest.context_length
    windows = shards.tokens_at(torch.arange(first * ctx, (first + count) * ctx)).view(count, ctx)
    bos = shards.manifest.bos_token_id if cfg.exclude_bos else None
    settings = {"windows": [first, count], "exclude_bos": cfg.exclude_bos, "format_version": FORMAT_VERSION}
    hashes = {d.name: output_config_hash(d.sae, loaded, shards, settings) for d in group}
    todo = []
    for d in group:
        previous = _previous(run_dir / "eval" / hook_name / d.name, hashes[d.name]) if reuse else None
        if previous is None:
            todo.append(d)
        else:
            log.info("%s/%s: already evaluated with this configuration", hook_name, d.name)
            reports[d.name] = previous
    if not todo:
        return reports, {}
    started = time.perf_counter()
    results = evaluate_hook(
        loaded,
        hook,
        {d.name: d.sae for d in todo},
        windows,
        _mean_activation(shards, first, count, bos),
        bos,
        cfg,
        _stored_activations(shards, loaded, hook, first),
    )
    tokens_per_s = windows.numel() / (time.perf_counter() - started)
    fresh = {}
    for d in todo:
        result = results[d.name]
        report = {
            "format_version": FORMAT_VERSION,
            "sae": d.name,
            "sae_dir": str(d.directory),
            "architecture": d.sae.cfg.architecture,
            "d_sae": d.sae.d_sae,
            "hook": hook_name,
            "model_id": loaded.model_id,
            "weights_hash": loaded.weights_hash,
            "corpus_id": shards.manifest.corpus_id,
            "eval_windows": {"first": first, "count": count, "context_length": ctx},
            "eval_tokens": int(windows.numel()),
            "exclude_bos": cfg.exclude_bos,
            "tokens_per_s": tokens_per_s,
            "config_hash": hashes[d.name],
            "metrics": result["metrics"],
            "density_histogram": M.density_histogram(
                result["density"], low=-math.ceil(math.log10(windows.numel()))
            ),
            "worst_tokens": _worst_tokens(
                {**result["per_token"]}, windows, loaded.tokenizer, cfg.worst_tokens
            ),
        }
        reports[d.name] = report
        fresh[d.name] = (result, windows)
    return reports, fresh


def evaluate_saes(
    model_cfg: ModelConfig,
    cfg: EvaluateConfig,
    run_dir: str | Path,
    wandb_cfg: WandbConfig | None = None,
    loaded: LoadedModel | None = None,
) -> dict[str, dict]:
    """Evaluate the configured dictionaries of `run_dir`; return {"<hook>/<sae>": metrics.json content}.

    A dictionary whose metrics.json was written with the same weights, model, windows and settings
    is not evaluated again."""
    run_dir = Path(run_dir)
    dictionaries = find_dictionaries(run_dir, cfg.saes, cfg.hook, cfg.force, "evaluate")
    loaded = loaded or load_model(model_cfg)
    check_model(dictionaries, loaded, cfg.force, "evaluate")
    tracker = Tracker(wandb_cfg or WandbConfig(), run_dir, "evaluate", {"evaluate": asdict(cfg)})
    reports: dict[str, dict] = {}
    for hook_name in sorted({d.hook for d in dictionaries}):
        group = [d for d in dictionaries if d.hook == hook_name]
        group_reports, fresh = evaluate_group(loaded, run_dir, hook_name, group, cfg)
        for name, report in group_reports.items():
            reports[f"{hook_name}/{name}"] = report
        for name, (result, windows) in fresh.items():
            report = group_reports[name]
            out = run_dir / "eval" / hook_name / name
            _write_outputs(out, report, result, windows)
            tracker.summary({f"{hook_name}/{name}/{k}": v for k, v in summary_row(report).items()
                             if isinstance(v, float)})  # fmt: skip
            tracker.log_images({f"{hook_name}/{name}/density": out / "density.png"})
            log.info("evaluated %s/%s -> %s", hook_name, name, out)

    all_reports = collect_reports([run_dir, *map(Path, cfg.compare_with)])
    if all_reports:
        pareto = pareto_plot([summary_row(r) for r in all_reports], run_dir / "eval" / "pareto.png")
        tracker.log_images({"pareto": pareto})
    tracker.finish()
    sys.stdout.write("\n" + format_table([summary_row(r) for r in reports.values()]))
    sys.stdout.write(f"metrics: {run_dir / 'eval'}/<hook>/<dictionary>/metrics.json\n")
    return reports


def run(cfg: DictConfig) -> dict[str, dict]:
    """The evaluate stage on a composed Hydra config."""
    return evaluate_saes(
        to_dataclass(ModelConfig, cfg.model),
        to_dataclass(EvaluateConfig, cfg.evaluate),
        cfg.run_dir,
        to_dataclass(WandbConfig, cfg.wandb),
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)
