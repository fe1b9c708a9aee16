"""Analyze stage: every feature's statistics, top-activating examples and attributions, browsable.

    python -m pipeline analyze run_dir=outputs/default analyze.tokens=1000000

One streaming pass over the harvested activations (the model's residual stream on the corpus) runs
each dictionary's encoder and keeps, per feature: firing frequency, mean / max activation and an
activation histogram; the top-activating examples with the feature's activation on each context
token (exact running top-k); a uniform sample of its firings, shown as activation-quantile groups;
co-activating features (feature_stats.py). Then on the model: the logit lens of every decoder
direction, and for `analyze.detail_features` features the per-token loss contribution, gradient x
input attribution and the component / head-source decomposition of their top examples
(attribution.py).

Writes `<run_dir>/features/<hook>/<sae>/`: the dashboard (dashboard/), with full records of every
feature in data/chunk-NNN.js and, last, features.json (summary of every feature + metadata).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.attribution import (
    component_attribution,
    encoder_terms,
    input_attribution,
    logit_effects,
    loss_contribution,
)
from pipeline.cli import stage_main
from pipeline.config import check_settings, to_dataclass
from pipeline.dashboard import CHUNK, INDEX_FILE, INDEX_PAGE, remove_dashboard_temporaries, write_dashboard
from pipeline.dashboard.pages import highlighted_examples
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
from pipeline.feature_stats import (
    FeaturePass,
    FeaturePassSettings,
    Partners,
    decoder_neighbours,
    feature_pass,
)
from pipeline.hooks import HookPoint, parse_hook_name, validate_hooks
from pipeline.locks import exclusive
from pipeline.models import LoadedModel, ModelConfig, load_model
from pipeline.rundir import RunDir
from pipeline.shards import ShardSet
from pipeline.splits import leading_windows
from pipeline.steering import Plain, plain_outputs, steering_report
from pipeline.synthesis import SynthesisSettings, synthesize
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

# 2: `silent` / `silent_features` (were `dead` / `dead_features`); 3: partners by lift, neighbours,
# correlated dimensions; 4: distinct top contexts, quantile shares, index fires_on; 5: norm_ratio /
# outlier per example; 6: loss / attribution on every shown example of a detailed feature; 7: `steering`
# of the detailed features, meta `steering_promoted_rise`; `synthesized` (analyze.synthesize)
FORMAT_VERSION = 7
DETAIL_BATCH = 16  # examples whose attributions are computed in one forward / backward (fewer: ~10 % slower on a CPU)


class AnalyzeError(DictionaryError):
    """The analysis cannot run as configured; the message says how to fix it."""


@dataclass
class AnalyzeConfig(DictionarySelection, FeaturePassSettings):
    """What to analyze and how much to keep and show per feature."""

    tokens: int | None = None
    """Tokens of the harvested activations to pass through (whole windows from the start); null = all."""
    quantile_groups: int = 4
    """Groups the random firings (`samples`) are shown in, by activation."""
    detail_features: int = 32
    """Features given input / component attributions and loss contributions (-1 = all)."""
    detail_examples: int | None = None
    """Shown examples per detailed feature that get them, top examples first, then the quantile
    groups'; null: every shown example."""
    top_logits: int = 10
    outlier_norm: float = 2.0
    """Examples at positions whose activation norm exceeds this multiple of the median are flagged as
    outliers (massive activations). On the default corpus, 0.93 % of positions are above 2x, nearly
    all ` the` and ` ` tokens; every other token stays below 1.43x (99.9th percentile)."""
    exclude_outliers: bool = False
    """Leave the positions above `outlier_norm` out as BOS is (no statistics, no examples there);
    costs one pass reading the analyzed activations first. Off: they are analyzed and flagged."""
    wandb_features: int = 200
    """Rows of the W&B feature table (the most frequent features)."""
    steer_scales: list[float] = field(default_factory=lambda: [1.0, 4.0])
    """The steering panel of the detailed features: the feature added at these multiples of its max
    activation, on `steer_prompts`; [] for none."""
    steer_prompts: list[str] = field(default_factory=lambda: ["I think that", "The function returns", "In the beginning"])
    steer_tokens: int = 16
    """Tokens generated per prompt and scale."""
    synthesize: bool = False
    """Search, for each detailed feature, token sequences that make it fire (synthesis.py), from its top
    example's context and from random tokens; ~2 x synth_seconds per feature."""
    synth_length: int = 8
    synth_steps: int = 40
    synth_seconds: float = 15.0

    def __post_init__(self) -> None:
        check_settings(
            self, "analyze", AnalyzeError,
            positive=("tokens", "top_k", "samples", "quantile_groups", "detail_examples", "top_logits",
                      "coactivation_min_count", "outlier_norm", "steer_tokens", "synth_length", "synth_steps",
                      "synth_seconds"),
            non_negative=("context_before", "context_after", "coactivation_tokens", "wandb_features"),
        )  # fmt: skip
        if self.detail_features < -1:
            raise AnalyzeError(f"analyze.detail_features={self.detail_features} must be -1 (all) or a count")


# ---------------------------------------------------------------- records


def _round(values: torch.Tensor, digits: int = 3) -> list:
    scale = 10**digits
    return (values.float() * scale).round().div(scale).tolist()


def _example(
    tokens: torch.Tensor, token: int, act: float, context: torch.Tensor, norm_ratio: float, cfg: AnalyzeConfig
) -> dict:
    """One example from the analyzed windows' tokens [n_windows, ctx]: its window and position, the
    context's token ids and the feature's activations on them, and its position's activation norm
    over the median (`outlier` above analyze.outlier_norm)."""
    ctx = tokens.shape[1]
    window, position = divmod(token, ctx)
    start = max(0, position - cfg.context_before)
    stop = min(ctx, position + cfg.context_after + 1)
    offset = start - (position - cfg.context_before)
    return {
        "window": window,
        "position": position,
        "start": start,
        "activation": round(act, 4),
        "ids": tokens[window, start:stop].tolist(),
        "acts": _round(context[offset : offset + stop - start]),
        "norm_ratio": round(norm_ratio, 2),
        "outlier": norm_ratio > cfg.outlier_norm,
    }


def _distinct(examples: list[dict], n: int | None = None) -> list[dict]:
    """The first `n` examples (all when None) whose context tokens differ from every earlier one's:
    repeated text (a licence header, boilerplate) is shown once."""
    seen, out = set(), []
    for example in examples:
        context = tuple(example["ids"])
        if context not in seen:
            seen.add(context)
            out.append(example)
    return out[:n]


def _quantile_groups(examples: list[dict], groups: int, shown: list[dict]) -> list[dict]:
    """Random firings sorted by activation and split into equal groups (quantiles of the feature's
    activation distribution, as sampled); each with the share of the sample it holds, which
    estimates its share of all firings. Firings already `shown` (the top examples) and repeated
    contexts are left out of the examples, not of the groups' ranges and shares."""
    ordered = sorted(examples, key=lambda e: e["activation"])
    size = math.ceil(len(ordered) / groups) if ordered else 1
    top = {(e["window"], e["position"]) for e in shown}
    out = []
    for g in range(0, len(ordered), size):
        part = ordered[g : g + size]
        new = [e for e in _distinct(part[::-1]) if (e["window"], e["position"]) not in top]
        out.append({"low": part[0]["activation"], "high": part[-1]["activation"],
                    "share": round(len(part) / len(ordered), 4), "sampled": len(ordered), "examples": new})  # fmt: skip
    return out[::-1]


def _logit_tables(model, W_dec: torch.Tensor, n: int, bins: int = 24) -> dict[str, torch.Tensor]:
    """Top promoted / suppressed tokens and a histogram of the logit effects of every feature."""
    out = {k: [] for k in ("pos_ids", "pos_vals", "neg_ids", "neg_vals", "hist", "low", "high")}
    for lo in range(0, len(W_dec), 512):
        effects = logit_effects(model, W_dec[lo : lo + 512].to(next(model.parameters()).device))  # [n, vocab]
        pos, neg = effects.topk(n, dim=-1), effects.topk(n, dim=-1, largest=False)
        low, high = effects.min(-1).values, effects.max(-1).values
        scaled = (
            ((effects - low[:, None]) / (high - low).clamp_min(1e-12)[:, None] * bins)
            .long()
            .clamp(0, bins - 1)
        )
        hist = torch.zeros(len(effects), bins, dtype=torch.long, device=effects.device)
        hist.scatter_add_(1, scaled, torch.ones_like(scaled))
        for key, value in zip(
            out, (pos.indices, pos.values, neg.indices, neg.values, hist, low, high), strict=True
        ):
            out[key].append(value.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _detail_features(frequency: torch.Tensor, n: int) -> list[int]:
    """`n` live features spread evenly over the frequency ranking (common and rare ones alike)."""
    alive = torch.argsort(frequency, descending=True)[: int((frequency > 0).sum())]
    if n < 0 or n >= len(alive):
        return alive.tolist()
    picks = torch.linspace(0, len(alive) - 1, n).round().long()
    return alive[picks].tolist()


def _shown_examples(record: dict, limit: int | None) -> list[dict]:
    """The examples a feature page shows, top examples first, then the quantile groups' (the first
    `limit` of them; all when None)."""
    shown = record["top"] + [e for group in record["quantile_groups"] for e in group["examples"]]
    return shown[:limit]


def _example_details(examples: list[dict], loaded: LoadedModel, hook, sae, latent: int, shards: ShardSet,
                     tokens: torch.Tensor, stored: bool, writes: HookPoint) -> None:  # fmt: skip
    """Loss contributions and input attributions of `examples`, computed together on their windows cut
    after the furthest context: the model is causal, so the tokens after an example's own context
    change nothing in it."""
    ctx = tokens.shape[1]
    windows = torch.tensor([e["window"] for e in examples])
    ends = torch.tensor([e["start"] + len(e["ids"]) for e in examples])
    positions = torch.tensor([e["position"] for e in examples])
    end, first = int(ends.max()), max(1, min(e["start"] for e in examples))  # first: first token predicted
    ids = tokens[windows, :end]  # [n, end]
    acts = shards.gather((windows[:, None] * ctx + torch.arange(end)).flatten()).view(len(examples), end, -1) if stored else None
    _, delta = loss_contribution(loaded.model, hook, sae, latent, ids, acts, last=end - first + 1,
                                 writes=writes if writes != hook else None)  # fmt: skip
    # by token index: the change in the loss of predicting that token (at the token before it); none for token 0
    loss = torch.cat([delta.new_zeros(len(examples), first), delta], dim=1).cpu()  # [n, end]
    w, b = encoder_terms(sae, latent)
    span = int(positions.max()) + 1
    attribution, _ = input_attribution(loaded.model, hook, ids[:, :span].to(loaded.device), positions, w, b)
    attribution = torch.cat([attribution.cpu(), attribution.new_zeros(len(examples), end - span).cpu()], dim=1)
    attribution[torch.arange(end)[None] > positions[:, None]] = 0  # no token after the example's one is attributed
    for i, e in enumerate(examples):
        e["loss"] = _round(loss[i, e["start"] : ends[i]], 4)
        e["attribution"] = _round(attribution[i, e["start"] : ends[i]], 4)


def _attach_details(record: dict, loaded: LoadedModel, hook, sae, shards: ShardSet, tokens: torch.Tensor,
                    cfg: AnalyzeConfig, writes: HookPoint) -> None:  # fmt: skip
    """Loss contributions and input attributions on the shown examples (DETAIL_BATCH at a time, those
    of similar length together); components of the first top example. `writes`: where the decoder
    writes (a transcoder's output hook; else `hook`)."""
    latent = record["id"]
    w, b = encoder_terms(sae, latent)
    stored = stored_activations_match(shards, loaded, hook)
    examples = sorted(_shown_examples(record, cfg.detail_examples), key=lambda e: e["start"] + len(e["ids"]))
    for lo in range(0, len(examples), DETAIL_BATCH):
        _example_details(examples[lo : lo + DETAIL_BATCH], loaded, hook, sae, latent, shards, tokens, stored, writes)
    first = record["top"][0]
    if hook.on_residual_stream:
        parts = component_attribution(loaded.model, hook, tokens[first["window"], : first["position"] + 1],
                                      first["position"], w, b)  # fmt: skip
        parts["components"] = [[name, round(v, 4)] for name, v in parts["components"]]
        for source in parts["head_sources"]:
            source["sources"] = _round(torch.tensor(source["sources"]), 4)
        record["components"] = {"example": 0, **parts}


@dataclass
class _Tables:
    """Everything the feature records are made of, per feature, on the CPU."""

    frequency: torch.Tensor  # [d_sae] float64
    count: torch.Tensor
    mean: torch.Tensor
    max: torch.Tensor
    histogram: torch.Tensor  # [d_sae, bins]
    top: tuple  # (global token [d_sae, top_k], activation, context activations [d_sae, top_k, C])
    samples: tuple  # the same for the random firings
    partners: Partners  # co-firing features by lift, with counts
    neighbours: tuple  # ([d_sae, 8] features with the nearest decoder directions, their cosines)
    correlated: tuple  # ([d_sae, 4] model dimensions most correlated with the activation, Pearson r)
    logits: dict[str, torch.Tensor]  # _logit_tables
    dimensions: tuple  # ([d_sae, 4] model dimensions with the largest decoder weights, their weights)
    tokens: torch.Tensor  # [n_windows, ctx] the analyzed windows' token ids
    norm_ratio: torch.Tensor  # [n_windows * ctx] each position's activation norm / the median


def _tables(sae, passed: FeaturePass, loaded: LoadedModel, shards: ShardSet, cfg: AnalyzeConfig) -> _Tables:
    stats = passed.stats
    count = stats.count.cpu()
    w_dec = sae.W_dec.detach().float()
    dims = w_dec.abs().topk(4, dim=-1)
    ctx = shards.manifest.context_length

    def examples(kept):
        return kept.token.cpu(), kept.act.cpu(), kept.context.float().cpu()

    return _Tables(
        frequency=passed.frequency(),
        count=count,
        mean=(stats.sum.cpu() / count.clamp_min(1)).float(),
        max=stats.max.cpu(),
        histogram=stats.histogram.cpu(),
        top=examples(passed.top),
        samples=examples(passed.samples),
        partners=passed.coactivation.top_partners(8, cfg.coactivation_min_count),
        neighbours=decoder_neighbours(w_dec, 8),
        correlated=passed.correlation.top(4),
        logits=_logit_tables(loaded.model, w_dec, cfg.top_logits),
        dimensions=(dims.indices.cpu(), w_dec.gather(1, dims.indices).cpu()),
        tokens=shards.tokens_at(torch.arange(passed.n_windows * ctx)).view(passed.n_windows, ctx),
        norm_ratio=passed.norm_ratio(),
    )


def _pairs(ids: torch.Tensor, values: torch.Tensor) -> list[list]:
    """[[id, value rounded], ...] skipping ids < 0 (empty slots)."""
    return [[int(i), round(float(v), 4)] for i, v in zip(ids, values, strict=True) if i >= 0]


def _examples(t: _Tables, kept: tuple, f: int, cfg: AnalyzeConfig) -> list[dict]:
    token, act, context = kept
    return [
        _example(t.tokens, int(tok), float(a), c, float(t.norm_ratio[tok]), cfg)
        for tok, a, c in zip(token[f], act[f], context[f], strict=True)
        if tok >= 0
    ]


def _record(f: int, t: _Tables, cfg: AnalyzeConfig) -> dict:
    """The JSON-ready record of feature `f` (README: "A feature record")."""
    fired = int(t.count[f]) > 0
    logits = t.logits
    top = _distinct(_examples(t, t.top, f, cfg), cfg.top_k)
    return {
        "id": f,
        "silent": not fired,
        "frequency": float(t.frequency[f]),
        "count": int(t.count[f]),
        "mean_activation": round(float(t.mean[f]), 4),
        "max_activation": round(float(t.max[f]), 4),
        "histogram": t.histogram[f].tolist() if fired else [],
        "top": top,
        "quantile_groups": _quantile_groups(_examples(t, t.samples, f, cfg), cfg.quantile_groups, top),
        "logits": {
            "positive": _pairs(logits["pos_ids"][f], logits["pos_vals"][f]),
            "negative": _pairs(logits["neg_ids"][f], logits["neg_vals"][f]),
            "histogram": logits["hist"][f].tolist(),
            "low": round(float(logits["low"][f]), 4),
            "high": round(float(logits["high"][f]), 4),
        },
        "dimensions": _pairs(t.dimensions[0][f], t.dimensions[1][f]),
        "correlated_dimensions": _pairs(t.correlated[0][f], t.correlated[1][f]),
        "coactivation": [
            [int(i), round(float(lift), 2), int(n), round(float(p), 4)]
            for i, lift, n, p in zip(*(column[f] for column in t.partners), strict=True)
            if i >= 0
        ],
        "neighbours": _pairs(t.neighbours[0][f], t.neighbours[1][f]),
        "components": None,
        "steering": None,
        "synthesized": None,
    }


def _steering(record: dict, loaded: LoadedModel, hook: HookPoint, sae, plain: Plain | None, cfg: AnalyzeConfig) -> dict | None:
    """The steering panel of a detailed feature: it is added at multiples of its max activation."""
    if plain is None:
        return None
    return steering_report(loaded, hook, sae, record["id"], "add", record["max_activation"], cfg.steer_scales, plain,
                           cfg.steer_prompts, cfg.steer_tokens)  # fmt: skip


def _synthesized(record: dict, loaded: LoadedModel, hook: HookPoint, sae, cfg: AnalyzeConfig) -> list[dict] | None:
    """With analyze.synthesize: the inputs searched for the feature, from its top example's context (the
    tokens up to its maximum) and from random tokens, each with its activation and fluency."""
    if not cfg.synthesize:
        return None
    tokenizer = loaded.tokenizer
    banned = torch.zeros(len(tokenizer), dtype=torch.bool)
    banned[tokenizer.all_special_ids] = True
    top = record["top"][0]
    at = top["position"] - top["start"]
    context = torch.tensor(top["ids"][max(0, at + 1 - cfg.synth_length) : at + 1])
    context = context[~banned[context]]  # a BOS in the context stays out of the optimised tokens
    randomly = torch.nonzero(~banned).flatten()
    randomly = randomly[torch.randint(len(randomly), (cfg.synth_length,), generator=torch.Generator().manual_seed(record["id"]))]
    settings = SynthesisSettings(steps=cfg.synth_steps, seconds=cfg.synth_seconds, seed=cfg.seed)
    found = []
    for start, ids in (("top example", context), ("random", randomly)):
        out = synthesize(loaded.model, hook, sae, record["id"], ids, tokenizer.bos_token_id, banned, settings,
                         unit=max(record["max_activation"], 1e-6))  # fmt: skip
        found.append({"start": start, "ids": out.ids, "activation": round(out.activation, 4),
                      "logprob": round(out.logprob, 3), "steps": out.steps})  # fmt: skip
    return found


def _panel_summary(chunks: Iterator[list[dict]], meta: dict) -> Iterator[list[dict]]:
    """Pass the chunks on; once they are all through (meta is written after the chunks), meta holds
    per steering scale the share of the steered features whose logit-lens promoted tokens rose, and
    per synthesis start the mean ratio of the synthesized input's activation to the corpus maximum."""
    rises: dict[float, list[bool]] = {}
    ratios: dict[str, list[float]] = {}
    for chunk in chunks:
        for r in chunk:
            for step in (r.get("steering") or {}).get("scales", []):
                rises.setdefault(step["scale"], []).append(step["promoted_rise"] > 0)
            for found in r.get("synthesized") or []:
                ratios.setdefault(found["start"], []).append(found["activation"] / max(r["max_activation"], 1e-9))
        yield chunk
    meta["steering_promoted_rise"] = {str(scale): round(sum(v) / len(v), 4) for scale, v in rises.items()}
    meta["steered_features"] = max((len(v) for v in rises.values()), default=0)
    meta["synthesized_over_corpus_max"] = {start: round(sum(v) / len(v), 4) for start, v in ratios.items()}


def feature_records(
    d: Dictionary,
    passed: FeaturePass,
    loaded: LoadedModel,
    hook: HookPoint,
    shards: ShardSet,
    cfg: AnalyzeConfig,
) -> Iterator[list[dict]]:
    """JSON-ready records of every feature, CHUNK features at a time (so that only one chunk of
    records is ever held in memory, whatever the number of features)."""
    tables = _tables(d.sae, passed, loaded, shards, cfg)
    detail = set(_detail_features(tables.frequency, cfg.detail_features))
    plain = plain_outputs(loaded, hook, cfg.steer_prompts, cfg.steer_tokens) if detail and cfg.steer_scales else None
    bar = tqdm(total=len(detail), desc="detailed features", unit="feature", disable=not cfg.progress)
    records = []
    writes = parse_hook_name(d.writes)
    for f in range(d.sae.d_sae):
        record = _record(f, tables, cfg)
        if f in detail and record["top"]:
            _attach_details(record, loaded, hook, d.sae, shards, tables.tokens, cfg, writes)
            record["steering"] = _steering(record, loaded, writes, d.sae, plain, cfg)
            record["synthesized"] = _synthesized(record, loaded, hook, d.sae, cfg)
            bar.update(1)
        records.append(record)
        if len(records) == CHUNK or f == d.sae.d_sae - 1:
            yield records
            records = []
    bar.close()


def vocabulary(tokenizer) -> list[str]:
    """The text of every token id, as it reads inside a text (byte-level markers decoded)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


# ---------------------------------------------------------------- the stage


def _wandb_table(
    tracker: Tracker, records: list[dict], frequency: torch.Tensor, vocab: list[str], prefix: str
) -> None:
    """A W&B table of `records` (the most frequent features) and the log10 frequency histogram."""
    if not tracker.active:
        return
    import wandb

    table = wandb.Table(columns=["id", "frequency", "max_activation", "top_promoted_tokens", "top_examples"])
    for r in sorted(records, key=lambda r: -r["frequency"]):
        promoted = " ".join(repr(vocab[i]) for i, _ in r["logits"]["positive"][:5])
        table.add_data(
            r["id"], r["frequency"], r["max_activation"], promoted, wandb.Html(highlighted_examples(r, vocab))
        )
    histogram = wandb.Histogram(frequency[frequency > 0].log10().tolist())
    tracker.log({f"{prefix}/features": table, f"{prefix}/log10_frequency": histogram})


def _keeping(chunks: Iterator[list[dict]], wanted: set[int], kept: list[dict]) -> Iterator[list[dict]]:
    """Pass the chunks on, keeping the records of the `wanted` features."""
    for chunk in chunks:
        kept.extend(r for r in chunk if r["id"] in wanted)
        yield chunk


def _meta(
    d: Dictionary, loaded: LoadedModel, shards: ShardSet, passed: FeaturePass, cfg: AnalyzeConfig, hash_: str
) -> dict:
    """features.json's `meta`: what was analyzed, how, and the config hash that marks it done."""
    return {
        "sae": d.name,
        "sae_dir": str(d.directory),
        "hook": d.hook,
        **({"hook_out": d.sae.meta["hook_out"]} if d.sae.transcodes else {}),
        "model_id": loaded.model_id,
        "corpus_id": shards.manifest.corpus_id,
        "architecture": d.sae.cfg.architecture,
        "d_sae": d.sae.d_sae,
        "tokens": passed.stats.tokens,
        "context_length": shards.manifest.context_length,
        "histogram_edges": passed.stats.edges(),
        "chunk_size": CHUNK,
        "silent_features": int((passed.stats.count == 0).sum()),
        "detail_features": len(_detail_features(passed.frequency(), cfg.detail_features)),
        "median_norm": round(float(passed.norms.nanmedian()), 3),
        "outlier_norm": cfg.outlier_norm,
        "outlier_positions": round(float((passed.norm_ratio() > cfg.outlier_norm).float().mean()), 6),
        "features_peaking_at_outliers": _peaking_at_outliers(passed, cfg.outlier_norm),
        "format_version": FORMAT_VERSION,
        "config_hash": hash_,
    }


def _norm_limit(shards: ShardSet, n_windows: int, cfg: AnalyzeConfig) -> float | None:
    """With analyze.exclude_outliers: outlier_norm x the median activation norm of the analyzed
    positions (BOS left out), above which positions are left out."""
    if not cfg.exclude_outliers:
        return None
    norms, counted = shards.position_norms(n_windows * shards.manifest.context_length, cfg.exclude_bos)
    return cfg.outlier_norm * float(norms[counted].median())


def _peaking_at_outliers(passed: FeaturePass, outlier_norm: float) -> float:
    """The share of the features that fired whose highest activation is at an outlier position."""
    top1 = passed.top.token[:, 0].cpu()
    fired = top1 >= 0
    outlier = passed.norm_ratio()[top1[fired]] > outlier_norm
    return round(float(outlier.float().mean()), 4) if fired.any() else 0.0


def _analyze(
    d: Dictionary, loaded: LoadedModel, run: RunDir, cfg: AnalyzeConfig, tracker: Tracker, vocab
) -> Path:
    """Analyze one dictionary (unless it is analyzed with this configuration); its dashboard directory."""
    hook = validate_hooks(loaded.model, [d.hook])[0]
    shards = shards_for(run, d.hook, loaded)
    ctx = shards.manifest.context_length
    n_windows = leading_windows(shards.manifest.n_sequences, ctx, cfg.tokens)
    if n_windows * ctx < cfg.top_k:
        raise AnalyzeError(
            f"analyze.tokens={cfg.tokens} gives {n_windows * ctx} tokens, too few for analyze.top_k={cfg.top_k} "
            "examples per feature; analyze more tokens (harvest more if the shards are short)"
        )
    sae, out = d.sae.to(loaded.device).eval(), run.features(d.hook, d.name)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "wandb_features", "saes")}
    hash_ = output_config_hash(
        sae, loaded, shards, {**settings, "windows": n_windows, "format_version": FORMAT_VERSION}
    )
    if run.analyzed(d.hook, d.name, hash_):
        run.download(out)
        log.info("%s/%s: already analyzed with this configuration -> %s", d.hook, d.name, out / INDEX_PAGE)
        return out
    log.info("analyzing %s/%s on %d tokens", d.hook, d.name, n_windows * ctx)
    with exclusive(out, f"the dashboard {out}"):
        remove_dashboard_temporaries(out)
        passed = feature_pass(sae, shards, n_windows, cfg, loaded.device, _norm_limit(shards, n_windows, cfg))
        frequency = passed.frequency()
        n_table = min(cfg.wandb_features, int((frequency > 0).sum()))
        for_wandb, table_records = set(torch.argsort(frequency, descending=True)[:n_table].tolist()), []
        meta = _meta(d, loaded, shards, passed, cfg, hash_)
        chunks = _panel_summary(_keeping(feature_records(d, passed, loaded, hook, shards, cfg), for_wandb,
                                            table_records), meta)  # fmt: skip
        index = write_dashboard(out, meta, chunks, vocab)
        run.publish(out, INDEX_FILE)
    _wandb_table(tracker, table_records, frequency, vocab, f"{d.hook}/{d.name}")
    log.info(
        "%s/%s: %d features (%d silent) -> %s", d.hook, d.name, sae.d_sae, meta["silent_features"], index
    )
    return out


def analyze_saes(
    model_cfg: ModelConfig,
    cfg: AnalyzeConfig,
    run_dir: str | Path,
    wandb_cfg: WandbConfig | None = None,
    loaded: LoadedModel | None = None,
) -> dict[str, Path]:
    """Analyze the configured dictionaries of `run_dir`; return {"<hook>/<sae>": dashboard directory}."""
    run = RunDir.open(run_dir)
    dictionaries = find_dictionaries(run, cfg.saes, cfg.hook, cfg.force, "analyze")
    loaded = loaded or load_model(model_cfg)
    check_model(dictionaries, loaded, cfg.force, "analyze")
    vocab = vocabulary(loaded.tokenizer)
    tracker = Tracker(wandb_cfg or WandbConfig(), run.root, "analyze", {"analyze": asdict(cfg)}, group=run.location)
    out_dirs = {f"{d.hook}/{d.name}": _analyze(d, loaded, run, cfg, tracker, vocab) for d in dictionaries}
    tracker.finish()
    return out_dirs


def run(cfg: DictConfig) -> dict[str, Path]:
    """The analyze stage on a composed Hydra config."""
    return analyze_saes(
        to_dataclass(ModelConfig, cfg.model),
        to_dataclass(AnalyzeConfig, cfg.analyze),
        cfg.run_dir,
        to_dataclass(WandbConfig, cfg.wandb),
    )


main = stage_main("analyze", run)
