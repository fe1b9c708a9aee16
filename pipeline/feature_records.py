"""A feature's record: what the dashboard shows of it, built from one streaming pass and the model.

From the pass (feature_stats.py): frequency, mean / max activation and histogram; the top examples
(distinct contexts) and the sampled firings in activation-quantile groups, each with its context's
activations and its position's norm; co-firing partners, decoder neighbours and correlated model
dimensions. From the model: the logit lens of every decoder direction, and for the detailed features
(spread over the frequency ranking) the loss contribution and input attribution of every shown
example, the component / head-source decomposition of the top one (attribution.py), the steering
panel (steering.py) and, optionally, synthesized inputs (synthesis.py). README: "A feature record".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pipeline.attribution import (
    component_attribution,
    encoder_terms,
    input_attribution,
    logit_effects,
    loss_contribution,
)
from pipeline.dashboard import CHUNK
from pipeline.dictionaries import Dictionary, stored_activations_match
from pipeline.feature_stats import FeaturePass, FeaturePassSettings, Partners, decoder_neighbours
from pipeline.hooks import HookPoint, parse_hook_name
from pipeline.models import LoadedModel
from pipeline.shards import ShardSet
from pipeline.steering import Plain, plain_outputs, steering_report
from pipeline.synthesis import SynthesisSettings, synthesize

# 2: `silent` / `silent_features` (were `dead` / `dead_features`); 3: partners by lift, neighbours,
# correlated dimensions; 4: distinct top contexts, quantile shares, index fires_on; 5: norm_ratio /
# outlier per example; 6: loss / attribution on every shown example of a detailed feature; 7: `steering`
# of the detailed features, meta `steering_promoted_rise`; `synthesized` (analyze.synthesize)
FORMAT_VERSION = 7
DETAIL_BATCH = 16  # examples whose attributions are computed in one forward / backward (fewer: ~10 % slower on a CPU)


@dataclass
class RecordSettings(FeaturePassSettings):
    """What a feature's record shows, beyond what the pass keeps."""

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
    steer_scales: list[float] = field(default_factory=lambda: [1.0, 4.0])
    """The steering panel of the detailed features: the feature added at these multiples of its max
    activation, on `steer_prompts`; [] for none (as are `steer_prompts=[]`)."""
    steer_prompts: list[str] = field(default_factory=lambda: ["I think that", "The function returns", "In the beginning"])
    steer_tokens: int = 16
    """Tokens generated per prompt and scale."""
    synthesize: bool = False
    """Search, for each detailed feature, token sequences that make it fire (synthesis.py), from its top
    example's context and from random tokens; ~2 x synth_seconds per feature."""
    synth_length: int = 8
    synth_steps: int = 40
    synth_seconds: float = 15.0


def _round(values: torch.Tensor, digits: int = 3) -> list:
    """values as (nested) lists of floats rounded to `digits` decimals, in float64 so that they print
    as such (2.705, not float32's 2.7049999237060547)."""
    scale = 10**digits
    return (values.double() * scale).round().div(scale).tolist()


def _example(
    tokens: torch.Tensor, token: int, act: float, context: list[float], norm_ratio: float, cfg: RecordSettings
) -> dict:
    """One example from the analyzed windows' tokens [n_windows, ctx]: its window and position, the
    context's token ids and the feature's (rounded) activations on them, and its position's activation
    norm over the median (`outlier` above analyze.outlier_norm)."""
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
        "acts": context[offset : offset + stop - start],
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


def detail_features(frequency: torch.Tensor, n: int) -> list[int]:
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
                    cfg: RecordSettings, writes: HookPoint) -> None:  # fmt: skip
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


def _tables(sae, passed: FeaturePass, loaded: LoadedModel, shards: ShardSet, cfg: RecordSettings) -> _Tables:
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


def _examples(t: _Tables, kept: tuple, f: int, cfg: RecordSettings) -> list[dict]:
    token, act, context = kept
    # feature f's rows as Python lists at once: ~10x fewer small tensor operations per example
    rows = zip(token[f].tolist(), act[f].tolist(), _round(context[f]), t.norm_ratio[token[f].clamp_min(0)].tolist(), strict=True)
    return [_example(t.tokens, tok, a, c, ratio, cfg) for tok, a, c, ratio in rows if tok >= 0]


def _record(f: int, t: _Tables, cfg: RecordSettings) -> dict:
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


def _steers(cfg: RecordSettings) -> bool:
    """Whether the detailed features get a steering panel: there are scales and prompts to steer."""
    return bool(cfg.steer_scales and cfg.steer_prompts)


def _steering(record: dict, loaded: LoadedModel, hook: HookPoint, sae, plain: Plain | None, cfg: RecordSettings) -> dict | None:
    """The steering panel of a detailed feature: it is added at multiples of its max activation."""
    if plain is None:
        return None
    return steering_report(loaded, hook, sae, record["id"], "add", record["max_activation"], cfg.steer_scales, plain,
                           cfg.steer_prompts, cfg.steer_tokens)  # fmt: skip


def _synthesized(record: dict, loaded: LoadedModel, hook: HookPoint, sae, cfg: RecordSettings) -> list[dict] | None:
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


def panel_summary(chunks: Iterator[list[dict]], meta: dict) -> Iterator[list[dict]]:
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
    cfg: RecordSettings,
) -> Iterator[list[dict]]:
    """JSON-ready records of every feature, CHUNK features at a time (so that only one chunk of
    records is ever held in memory, whatever the number of features)."""
    tables = _tables(d.sae, passed, loaded, shards, cfg)
    detail = set(detail_features(tables.frequency, cfg.detail_features))
    plain = plain_outputs(loaded, hook, cfg.steer_prompts, cfg.steer_tokens) if detail and _steers(cfg) else None
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
