"""Analyze stage: every feature's statistics, top-activating examples and attributions, browsable.

    python -m pipeline analyze run_dir=outputs/default analyze.tokens=1000000

One streaming pass over the harvested activations (the model's residual stream on the corpus) runs
each dictionary's encoder and keeps, per feature: firing frequency, mean / max activation and an
activation histogram; the top-activating examples with the feature's activation on each context
token (exact running top-k); a uniform sample of its firings, shown as activation-quantile groups;
co-activating features. Then on the model: the logit lens of every decoder direction, and for
`analyze.detail_features` features the per-token loss contribution, gradient x input attribution and
the component / head-source decomposition of their top examples (attribution.py).

Writes `<run_dir>/features/<hook>/<sae>/`: features.json (summary of every feature + metadata),
data/chunk-NNN.js (full records, CHUNK features per file, JSON inside one JS call so that the
dashboard opens from the file system with no server), vocab.js, index.html, feature.html.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
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
from pipeline.config import CONF_DIR, to_dataclass
from pipeline.dashboard import CHUNK, write_dashboard
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
from pipeline.feature_stats import Coactivation, FeatureStats, TopExamples, firing_entries
from pipeline.models import LoadedModel, ModelConfig, load_model, validate_hooks
from pipeline.shards import ShardSet
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)


class AnalyzeError(DictionaryError):
    """The analysis cannot run as configured; the message says how to fix it."""


@dataclass
class AnalyzeConfig(DictionarySelection):
    """What to analyze and how much to keep per feature."""

    tokens: int | None = None
    """Tokens of the harvested activations to pass through (whole windows from the start); null = all."""
    top_k: int = 10
    """Top-activating examples kept per feature."""
    samples: int = 16
    """Random firings kept per feature, shown in `quantile_groups` groups by activation."""
    quantile_groups: int = 4
    context_before: int = 20
    """Tokens shown before an example's token (within its window)."""
    context_after: int = 4
    exclude_bos: bool = True
    """BOS positions are not examples (as in training)."""
    coactivation_tokens: int = 32768
    """Tokens on which pairs of co-firing features are counted."""
    detail_features: int = 32
    """Features given input / component attributions and loss contributions (-1 = all)."""
    detail_examples: int = 3
    """Top examples per detailed feature that get them."""
    top_logits: int = 10
    wandb_features: int = 200
    """Rows of the W&B feature table (the most frequent features)."""
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("top_k", "samples", "quantile_groups", "detail_examples", "top_logits"):
            if getattr(self, key) < 1:
                raise AnalyzeError(f"analyze.{key} must be positive, got {getattr(self, key)}")


# ---------------------------------------------------------------- the streaming pass


@dataclass
class _Pass:
    stats: FeatureStats
    top: TopExamples
    samples: TopExamples
    coactivation: Coactivation
    n_windows: int


@torch.inference_mode()
def stream_features(sae, shards: ShardSet, n_windows: int, cfg: AnalyzeConfig, device) -> _Pass:
    """One pass over the first n_windows stored windows: statistics, top examples, samples."""
    ctx = shards.manifest.context_length
    d_sae = sae.d_sae
    windows_per_batch = max(1, (1 << 25) // (d_sae * ctx))  # dense codes of a batch stay ~128 MB
    stats = FeatureStats(d_sae, device)
    top = TopExamples(d_sae, cfg.top_k, cfg.context_before, cfg.context_after, device)
    samples = TopExamples(d_sae, cfg.samples, cfg.context_before, cfg.context_after, device)
    coactivation = Coactivation(d_sae, cfg.coactivation_tokens)
    bos = shards.manifest.bos_token_id if cfg.exclude_bos else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bar = tqdm(total=n_windows * ctx, unit="tok", unit_scale=True, desc="analyze", disable=not cfg.progress)
    for first in range(0, n_windows, windows_per_batch):
        count = min(windows_per_batch, n_windows - first)
        idx = torch.arange(first * ctx, (first + count) * ctx)
        x = shards.gather(idx).to(device, torch.float32)  # [tokens, d_in]
        codes = sae.encode(x)  # [tokens, d_sae]
        if bos is not None:
            codes[(shards.tokens_at(idx) == bos).to(device)] = 0
        rows, latents, acts = firing_entries(codes)
        stats.update(len(codes), latents, acts)
        top.update(rows, latents, acts, acts, codes, first * ctx, ctx)
        keys = torch.rand(len(rows), generator=gen, device=device)
        samples.update(rows, latents, keys, acts, codes, first * ctx, ctx)
        coactivation.update(codes)
        bar.update(len(codes))
    bar.close()
    return _Pass(stats, top, samples, coactivation, n_windows)


# ---------------------------------------------------------------- records


def _round(values: torch.Tensor, digits: int = 3) -> list:
    scale = 10**digits
    return (values.float() * scale).round().div(scale).tolist()


def _example(tokens: torch.Tensor, token: int, act: float, context: torch.Tensor, cfg: AnalyzeConfig) -> dict:
    """One example from the analyzed windows' tokens [n_windows, ctx]: its window and position, and
    the context's token ids and the feature's activations on them."""
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
    }


def _quantile_groups(examples: list[dict], groups: int) -> list[dict]:
    """Random firings sorted by activation and split into equal groups (quantiles of the feature's
    activation distribution, as sampled)."""
    ordered = sorted(examples, key=lambda e: e["activation"])
    size = math.ceil(len(ordered) / groups) if ordered else 1
    out = []
    for g in range(0, len(ordered), size):
        part = ordered[g : g + size]
        out.append({"low": part[0]["activation"], "high": part[-1]["activation"], "examples": part[::-1]})
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


def _attach_details(
    record: dict, loaded: LoadedModel, hook, sae, shards: ShardSet, tokens: torch.Tensor, cfg: AnalyzeConfig
) -> None:
    """Loss contributions and input attributions on the top examples; components of the first.
    Each example's window is cut after its context: later tokens change nothing before them."""
    latent = record["id"]
    w, b = encoder_terms(sae, latent)
    stored = stored_activations_match(shards, loaded, hook.name)
    ctx = tokens.shape[1]
    for e in record["top"][: cfg.detail_examples]:
        end = e["start"] + len(e["ids"])
        ids = tokens[e["window"], :end][None]
        acts = (
            shards.gather(torch.arange(e["window"] * ctx, e["window"] * ctx + end))[None] if stored else None
        )
        shown = len(e["ids"]) + (1 if e["start"] > 0 else 0)  # + the prediction made just before the context
        _, delta = loss_contribution(loaded.model, hook, sae, latent, ids, acts, last=shown)
        # loss[i]: the change in the loss of predicting token i of the context (at the token before it)
        loss = delta[0] if e["start"] > 0 else torch.cat([delta.new_zeros(1), delta[0]])
        e["loss"] = _round(loss[-len(e["ids"]) :].cpu(), 4)
        attribution, _ = input_attribution(
            loaded.model,
            hook,
            ids[:, : e["position"] + 1].to(loaded.device),
            torch.tensor([e["position"]]),
            w,
            b,
        )
        e["attribution"] = _round(
            torch.cat([attribution[0, e["start"] :].cpu(), torch.zeros(end - e["position"] - 1)]), 4
        )
    first = record["top"][0]
    if hook.point.startswith("resid"):
        parts = component_attribution(loaded.model, hook, tokens[first["window"], : first["position"] + 1],
                                      first["position"], w, b)  # fmt: skip
        parts["components"] = [[name, round(v, 4)] for name, v in parts["components"]]
        for source in parts["head_sources"]:
            source["sources"] = _round(torch.tensor(source["sources"]), 4)
        record["components"] = {"example": 0, **parts}


def feature_records(
    d: Dictionary, passed: _Pass, loaded: LoadedModel, hook, shards: ShardSet, cfg: AnalyzeConfig
) -> Iterator[list[dict]]:
    """JSON-ready records of every feature, CHUNK features at a time (so that only one chunk of
    records is ever held in memory, whatever the number of features)."""
    sae, stats = d.sae, passed.stats
    n_tokens = stats.tokens
    count = stats.count.cpu()
    frequency = count.double() / max(n_tokens, 1)
    mean = (stats.sum.cpu() / count.clamp_min(1)).float()
    max_act = stats.max.cpu()
    top, samples = passed.top, passed.samples
    top_token, top_act, top_ctx = top.token.cpu(), top.act.cpu(), top.context.float().cpu()
    s_token, s_act, s_ctx = samples.token.cpu(), samples.act.cpu(), samples.context.float().cpu()
    histogram = stats.histogram.cpu()
    partners, partner_prob = passed.coactivation.top_partners(8)
    logits = _logit_tables(loaded.model, sae.W_dec.detach().float(), cfg.top_logits)
    dims = sae.W_dec.detach().float().abs().topk(4, dim=-1)
    dims_sign = sae.W_dec.detach().float().gather(1, dims.indices)
    ctx = shards.manifest.context_length
    tokens = shards.tokens_at(torch.arange(passed.n_windows * ctx)).view(passed.n_windows, ctx)
    detail = set(_detail_features(frequency, cfg.detail_features))
    bar = tqdm(total=len(detail), desc="attributions", unit="feature", disable=not cfg.progress)
    records = []
    for f in range(sae.d_sae):
        alive = int(count[f]) > 0
        record = {
            "id": f,
            "dead": not alive,
            "frequency": float(frequency[f]),
            "count": int(count[f]),
            "mean_activation": round(float(mean[f]), 4),
            "max_activation": round(float(max_act[f]), 4),
            "histogram": histogram[f].tolist() if alive else [],
            "top": [
                _example(tokens, int(t), float(a), c, cfg)
                for t, a, c in zip(top_token[f], top_act[f], top_ctx[f], strict=True)
                if t >= 0
            ],
            "quantile_groups": _quantile_groups(
                [
                    _example(tokens, int(t), float(a), c, cfg)
                    for t, a, c in zip(s_token[f], s_act[f], s_ctx[f], strict=True)
                    if t >= 0
                ],
                cfg.quantile_groups,
            ),  # fmt: skip
            "logits": {
                "positive": [
                    [int(i), round(float(v), 4)]
                    for i, v in zip(logits["pos_ids"][f], logits["pos_vals"][f], strict=True)
                ],
                "negative": [
                    [int(i), round(float(v), 4)]
                    for i, v in zip(logits["neg_ids"][f], logits["neg_vals"][f], strict=True)
                ],
                "histogram": logits["hist"][f].tolist(),
                "low": round(float(logits["low"][f]), 4),
                "high": round(float(logits["high"][f]), 4),
            },  # fmt: skip
            "dimensions": [
                [int(i), round(float(v), 4)] for i, v in zip(dims.indices[f], dims_sign[f], strict=True)
            ],
            "coactivation": [
                [int(j), round(float(p), 4)]
                for j, p in zip(partners[f], partner_prob[f], strict=True)
                if j >= 0
            ],
            "components": None,
        }
        if f in detail and record["top"]:
            _attach_details(record, loaded, hook, sae, shards, tokens, cfg)
            bar.update(1)
        records.append(record)
        if len(records) == CHUNK or f == sae.d_sae - 1:
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
        html_examples = wandb.Html(example_html(r, vocab))
        table.add_data(r["id"], r["frequency"], r["max_activation"], promoted, html_examples)
    histogram = wandb.Histogram(frequency[frequency > 0].log10().tolist())
    tracker.log({f"{prefix}/features": table, f"{prefix}/log10_frequency": histogram})


def _keeping(chunks: Iterator[list[dict]], wanted: set[int], kept: list[dict]) -> Iterator[list[dict]]:
    """Pass the chunks on, keeping the records of the `wanted` features."""
    for chunk in chunks:
        kept.extend(r for r in chunk if r["id"] in wanted)
        yield chunk


def example_html(record: dict, vocab: list[str], n: int = 3) -> str:
    """The top examples as HTML with tokens shaded by activation (every token text escaped)."""
    peak = max(record["max_activation"], 1e-9)
    lines = []
    for e in record["top"][:n]:
        spans = []
        for token, act in zip(e["ids"], e["acts"], strict=True):
            alpha = min(1.0, max(0.0, act / peak))
            text = html.escape(vocab[token] if 0 <= token < len(vocab) else f"<{token}>")
            spans.append(f'<span style="background:rgba(255,120,0,{alpha:.2f})">{text}</span>')
        lines.append(f'<div style="font-family:monospace;white-space:pre-wrap">{"".join(spans)}</div>')
    return "".join(lines)


def _already_analyzed(out: Path, config_hash: str) -> bool:
    try:
        meta = json.loads((out / "features.json").read_text())["meta"]
    except (OSError, ValueError, KeyError):
        return False
    return meta.get("config_hash") == config_hash and (out / "index.html").exists()


def analyze_saes(
    model_cfg: ModelConfig,
    cfg: AnalyzeConfig,
    run_dir: str | Path,
    wandb_cfg: WandbConfig | None = None,
    loaded: LoadedModel | None = None,
) -> dict[str, Path]:
    """Analyze the configured dictionaries of `run_dir`; return {"<hook>/<sae>": dashboard directory}."""
    run_dir = Path(run_dir)
    dictionaries = find_dictionaries(run_dir, cfg.saes, cfg.hook, cfg.force, "analyze")
    loaded = loaded or load_model(model_cfg)
    check_model(dictionaries, loaded, cfg.force, "analyze")
    vocab = vocabulary(loaded.tokenizer)
    tracker = Tracker(wandb_cfg or WandbConfig(), run_dir, "analyze", {"analyze": asdict(cfg)})
    out_dirs = {}
    for d in dictionaries:
        hook = validate_hooks(loaded.model, [d.hook])[0]
        shards = shards_for(run_dir, d.hook, loaded)
        ctx = shards.manifest.context_length
        n_windows = shards.manifest.n_sequences if cfg.tokens is None else min(
            shards.manifest.n_sequences, -(-cfg.tokens // ctx)
        )  # fmt: skip
        if n_windows * ctx < cfg.top_k:
            raise AnalyzeError(
                f"analyze.tokens={cfg.tokens} gives {n_windows * ctx} tokens, too few for analyze.top_k={cfg.top_k} "
                "examples per feature; analyze more tokens (harvest more if the shards are short)"
            )
        sae = d.sae.to(loaded.device).eval()
        out = run_dir / "features" / d.hook / d.name
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "wandb_features", "saes")}
        config_hash = output_config_hash(sae, loaded, shards, {**settings, "windows": n_windows})
        if _already_analyzed(out, config_hash):
            log.info(
                "%s/%s: already analyzed with this configuration -> %s", d.hook, d.name, out / "index.html"
            )
            out_dirs[f"{d.hook}/{d.name}"] = out
            continue
        log.info("analyzing %s/%s on %d tokens", d.hook, d.name, n_windows * ctx)
        passed = stream_features(sae, shards, n_windows, cfg, loaded.device)
        count = passed.stats.count.cpu()
        frequency = count.double() / max(passed.stats.tokens, 1)
        for_wandb = set(
            torch.argsort(frequency, descending=True)[
                : min(cfg.wandb_features, int((count > 0).sum()))
            ].tolist()
        )
        table_records: list[dict] = []
        chunks = _keeping(feature_records(d, passed, loaded, hook, shards, cfg), for_wandb, table_records)

        meta = {
            "sae": d.name,
            "sae_dir": str(d.directory),
            "hook": d.hook,
            "model_id": loaded.model_id,
            "corpus_id": shards.manifest.corpus_id,
            "architecture": sae.cfg.architecture,
            "d_sae": sae.d_sae,
            "tokens": passed.stats.tokens,
            "context_length": ctx,
            "histogram_edges": passed.stats.edges(),
            "chunk_size": CHUNK,
            "dead_features": int((count == 0).sum()),
            "detail_features": len(_detail_features(frequency, cfg.detail_features)),
            "config_hash": config_hash,
        }
        write_dashboard(out, meta, chunks, vocab)
        _wandb_table(tracker, table_records, frequency, vocab, f"{d.hook}/{d.name}")
        out_dirs[f"{d.hook}/{d.name}"] = out
        log.info("%s/%s: %d features (%d dead) -> %s", d.hook, d.name, sae.d_sae, meta["dead_features"],
                 out / "index.html")  # fmt: skip
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="analyze")
def main(cfg: DictConfig) -> None:
    run(cfg)
