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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

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
)
from pipeline.feature_records import (
    FORMAT_VERSION,
    RecordSettings,
    detail_features,
    feature_records,
    panel_summary,
)
from pipeline.feature_stats import FeaturePass, feature_pass
from pipeline.hooks import validate_hooks
from pipeline.locks import exclusive
from pipeline.models import LoadedModel, ModelConfig, load_model
from pipeline.rundir import RunDir
from pipeline.shards import ShardSet
from pipeline.splits import leading_windows
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

class AnalyzeError(DictionaryError):
    """The analysis cannot run as configured; the message says how to fix it."""


@dataclass
class AnalyzeConfig(DictionarySelection, RecordSettings):
    """What to analyze and how much to keep and show per feature."""

    tokens: int | None = None
    """Tokens of the harvested activations to pass through (whole windows from the start); null = all."""
    exclude_outliers: bool = False
    """Leave the positions above `outlier_norm` out as BOS is (no statistics, no examples there);
    costs one pass reading the analyzed activations first. Off: they are analyzed and flagged."""
    wandb_features: int = 200
    """Rows of the W&B feature table (the most frequent features)."""

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
        "detail_features": len(detail_features(passed.frequency(), cfg.detail_features)),
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
        chunks = panel_summary(_keeping(feature_records(d, passed, loaded, hook, shards, cfg), for_wandb,
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
