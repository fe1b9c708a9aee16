"""Relevance stage: which features a task relies on, ranked, and the ranking checked.

    python -m pipeline relevance run_dir=outputs/demo relevance.sae=batchtopk-k32-x8 corpus=stdlib_source
    open outputs/demo/relevance/blocks.9.resid_post/batchtopk-k32-x8/stdlib_source/relevance.html

The task is a corpus (`corpus=`, e.g. the fine-tuning text), cut into windows as harvest cuts them.
Every feature gets the attribution-patching estimate of how much the task's next-token loss changes
when it is removed at every position (relevance.py: one forward and backward per batch for all
features). The features with the largest estimates are checked against true removal (one forward
each) on the first `check_tokens`, with random firing ones beside them, and Pearson's r between the
two is reported. Writes `<run_dir>/relevance/<hook>/<sae>/<task>/`: relevance.json and
relevance.html (the ranking, linked to the analyze dashboard's feature pages), and a W&B table.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.cli import stage_main
from pipeline.config import check_settings, to_dataclass
from pipeline.corpus import CorpusConfig
from pipeline.dashboard import index_rows, link_report
from pipeline.dashboard.pages import relevance_page
from pipeline.dictionaries import DictionaryError, OneDictionary, check_model, one_dictionary
from pipeline.fileio import atomic_write
from pipeline.hooks import validate_hooks
from pipeline.models import LoadedModel, ModelConfig, load_model
from pipeline.relevance import TaskAttribution, ablation_effects, attribution_patching, task_windows
from pipeline.rundir import RunDir
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

REPORT, PAGE = "relevance.json", "relevance.html"


class RelevanceError(DictionaryError):
    """The relevance ranking cannot run as configured; the message says what to change."""


@dataclass
class RelevanceConfig(OneDictionary):
    tokens: int = 32_768
    """Task tokens (whole windows of context_length)."""
    context_length: int = 256
    batch_size: int = 4
    top: int = 50
    """Features listed each way (needed most, in the way)."""
    check_features: int = 12
    """Features whose true removal is measured: half the largest estimates, half random firing ones."""
    check_tokens: int = 4_096
    seed: int = 0

    def __post_init__(self) -> None:
        check_settings(self, "relevance", RelevanceError, positive=("tokens", "context_length", "batch_size", "top",
                       "check_tokens"), non_negative=("check_features",))  # fmt: skip


def _checked(sample: list[int], estimate: TaskAttribution, true: torch.Tensor, tokens: int) -> dict:
    pearson = float(torch.corrcoef(torch.stack([estimate.effect[sample], true]))[0, 1]) if len(sample) > 1 else float("nan")
    return {"features": sample, "tokens": tokens, "estimate": estimate.effect[sample].tolist(),
            "ablation": true.tolist(), "pearson": pearson}  # fmt: skip


def check_sample(estimate: TaskAttribution, n: int, seed: int) -> list[int]:
    """Half the features with the largest |estimate|, half random other firing ones."""
    firing = torch.nonzero(estimate.count > 0).flatten()
    largest = firing[estimate.effect[firing].abs().argsort(descending=True)][: (n + 1) // 2].tolist()
    others = [int(f) for f in firing if int(f) not in largest]
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))
    return largest + [others[i] for i in order[: n - len(largest)].tolist()]


def _ranked(estimate: TaskAttribution, top: int) -> tuple[list[dict], list[dict]]:
    """(the features the task needs most, those in its way), each as JSON-ready rows."""
    def row(f: int) -> dict:
        return {"id": f, "effect": float(estimate.effect[f]), "effect_per_1k": float(estimate.effect[f]) * 1000 / estimate.tokens,
                "frequency": float(estimate.count[f]) / estimate.tokens}  # fmt: skip

    firing = torch.nonzero(estimate.count > 0).flatten()
    order = firing[estimate.effect[firing].argsort(descending=True)].tolist()
    needed = [row(f) for f in order[:top] if estimate.effect[f] > 0]
    in_the_way = [row(f) for f in order[::-1][:top] if estimate.effect[f] < 0]
    return needed, in_the_way


def _fires_on(run: RunDir, hook: str, name: str) -> tuple[Path | None, dict[int, list[str]]]:
    """(the analyze dashboard's feature page, each feature's fires_on) where the dictionary is analyzed."""
    rows = index_rows(run.features(hook, name))
    return (run.feature_page(hook, name) if rows else None), {i: r.get("fires_on", []) for i, r in rows.items()}


def rank_features(model_cfg: ModelConfig, corpus: CorpusConfig, cfg: RelevanceConfig, run_dir: str | Path,
                  wandb_cfg: WandbConfig | None = None, loaded: LoadedModel | None = None) -> Path:  # fmt: skip
    """Rank the configured dictionary's features for the task corpus; return the output directory."""
    run = RunDir.open(run_dir)
    d = one_dictionary(run, cfg, "relevance", RelevanceError)
    loaded = loaded or load_model(model_cfg)
    check_model([d], loaded, cfg.force, "relevance")
    hook, sae = validate_hooks(loaded.model, [d.hook])[0], d.sae.to(loaded.device).eval()
    writes = validate_hooks(loaded.model, [d.writes])[0] if d.sae.transcodes else None
    windows, bos = task_windows(loaded, corpus, cfg.context_length, cfg.tokens), loaded.tokenizer.bos_token_id
    log.info("relevance of %s/%s for %s: %d windows of %d tokens", d.hook, d.name, corpus.name, *windows.shape)
    checked = max(1, cfg.check_tokens // cfg.context_length)  # the first windows: the check runs on them
    on_check = attribution_patching(loaded.model, hook, sae, windows[:checked], bos, cfg.batch_size, writes)
    estimate = on_check.plus(attribution_patching(loaded.model, hook, sae, windows[checked:], bos, cfg.batch_size, writes))
    sample = check_sample(on_check, cfg.check_features, cfg.seed)
    true = ablation_effects(loaded.model, hook, sae, windows[:checked], bos, sample, cfg.batch_size, writes)
    needed, in_the_way = _ranked(estimate, cfg.top)
    report = {"task": corpus.name, "sae": d.name, "hook": d.hook, "tokens": estimate.tokens, "loss": estimate.loss,
              "needed": needed, "in_the_way": in_the_way, "check": _checked(sample, on_check, true, on_check.tokens),
              "settings": asdict(cfg)}  # fmt: skip
    out = run.relevance(d.hook, d.name, corpus.name)
    page, fires_on = _fires_on(run, d.hook, d.name)
    link = os.path.relpath(page, out) if page else None
    atomic_write(out / REPORT, json.dumps(report, indent=1).encode())
    atomic_write(out / PAGE, relevance_page(report, link, fires_on).encode())
    for name in (REPORT, PAGE):
        run.upload(out / name)
    if linked := link_report(run.features(d.hook, d.name), f"relevance/{corpus.name}", f"what {corpus.name} relies on",
                             out / PAGE):  # fmt: skip
        run.upload(linked)
    _log_wandb(report, run, wandb_cfg)
    log.info("relevance: estimate vs true removal r = %.3f over %d features -> %s", report["check"]["pearson"],
             len(sample), out / PAGE)  # fmt: skip
    return out


def _log_wandb(report: dict, run: RunDir, wandb_cfg: WandbConfig | None) -> None:
    tracker = Tracker(wandb_cfg or WandbConfig(), run.root, "relevance", {"relevance": report["settings"]},
                      group=run.location, detail=f"{report['sae']} {report['task']}")  # fmt: skip
    tracker.table("features", [{"id": f["id"], "effect_per_1k": f["effect_per_1k"], "frequency": f["frequency"]}
                               for f in report["needed"] + report["in_the_way"]])  # fmt: skip
    tracker.summary({"task_loss": report["loss"], "check_pearson": report["check"]["pearson"]})
    tracker.finish()


def run(cfg: DictConfig) -> Path:
    """The relevance stage on a composed Hydra config."""
    return rank_features(to_dataclass(ModelConfig, cfg.model), to_dataclass(CorpusConfig, cfg.corpus),
                         to_dataclass(RelevanceConfig, cfg.relevance), cfg.run_dir, to_dataclass(WandbConfig, cfg.wandb))  # fmt: skip


main = stage_main("relevance", run)
