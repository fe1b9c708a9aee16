"""Track stage: a dictionary's features followed through a model's fine-tuning, step by step.

    python -m pipeline finetune finetune.out=outputs/tuned finetune.save_every=10
    python -m pipeline track run_dir=outputs/demo track.checkpoints=outputs/tuned corpus=stdlib_source
    open outputs/demo/track/tuned/index.html

The run's dictionary, trained on the run's model θ₀, is applied to θ₀ and to every finished step of
the fine-tuning (finetune_checkpoints.py) on the same held-out windows: per step FVU, CE recovered,
KL and L0 (evaluation.py); per feature its firing frequency, the cosine of its activations with
θ₀'s, its status (kept, shifted, vanished, appeared) and the first step it changed
(trajectories.py). The task (`corpus=`: the fine-tuning text) ranks the features by attribution
under θ₀ (relevance.py), answering whether the features the task relies on are the ones that moved.
Writes `<run_dir>/track/<name of the checkpoints directory>/`: track.json, trajectories.safetensors
(frequency and cosine [steps, d_sae]) and index.html (the steps' curves, the most changed features
with their trajectories, linked into the analyze dashboard); W&B charts the per-step figures over
the fine-tuning steps.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save
from tqdm.auto import tqdm

from pipeline.cli import stage_main
from pipeline.config import check_settings, to_dataclass
from pipeline.corpus import CorpusConfig
from pipeline.dashboard import index_rows, link_report
from pipeline.dashboard.pages import track_page
from pipeline.dictionaries import Dictionary, DictionaryError, OneDictionary, check_model, one_dictionary
from pipeline.evaluation import EvaluationSettings, evaluate_dictionaries, held_out, summary_row
from pipeline.fileio import atomic_write
from pipeline.finetune_checkpoints import finished_steps
from pipeline.models import LoadedModel, ModelConfig, load_model
from pipeline.relevance import TaskAttribution, attribution_patching, task_windows
from pipeline.rundir import RunDir
from pipeline.tracking import Tracker, WandbConfig
from pipeline.trajectories import (
    APPEARED,
    KEPT,
    SHIFTED,
    STATUS_NAMES,
    VANISHED,
    StepStats,
    batch_codes,
    classify,
    first_change,
    reference_codes,
    relevance_of_moved,
    step_stats,
)

log = logging.getLogger(__name__)

REPORT, PAGE, TENSORS = "track.json", "index.html", "trajectories.safetensors"
_METRICS = ("l0", "fvu", "ce_loss_score", "kl_div_with_sae")


class TrackError(DictionaryError):
    """The tracking cannot run as configured; the message says what to change."""


@dataclass
class TrackConfig(OneDictionary):
    checkpoints: str = ""
    """finetune.out of the fine-tuning to follow (its steps kept with finetune.save_every)."""
    tokens: int = 32_768
    """Held-out tokens the feature trajectories are measured on."""
    eval_tokens: int = 8_192
    """Held-out tokens of each step's FVU / CE recovered / KL (the first of the above)."""
    task_tokens: int = 8_192
    """Tokens of the task corpus the features are ranked on (attribution under θ₀)."""
    batch_size: int = 4
    kept: float = 0.8
    """A feature is kept while the cosine of its activations with θ₀'s is at least this."""
    vanished: float = 0.1
    """... vanished once it fires at under this times its θ₀ frequency."""
    appeared: int = 10
    """A feature silent under θ₀ has appeared once it fires on this many positions."""
    top_changed: int = 50
    """Features listed on the page."""
    top_relevant: int = 20
    """The task's most relevant features whose movement is compared with all features'."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise TrackError("set track.checkpoints=<finetune.out of a fine-tuning run with finetune.save_every=N>")
        check_settings(self, "track", TrackError, positive=("tokens", "eval_tokens", "task_tokens", "batch_size",
                       "appeared", "top_relevant"), non_negative=("top_changed",))  # fmt: skip
        if not 0 < self.vanished < 1 or not 0 < self.kept <= 1:
            raise TrackError(f"need 0 < track.kept ({self.kept}) <= 1 and 0 < track.vanished ({self.vanished}) < 1")


def model_steps(model_cfg: ModelConfig, checkpoints: Path) -> list[tuple[int, ModelConfig]]:
    """θ₀ (step 0, the run's model) and every finished step of the fine-tuning, as model configs."""
    steps = finished_steps(checkpoints)
    if not steps:
        raise TrackError(
            f"{checkpoints} holds no finished fine-tuning; run `python -m pipeline finetune "
            f"finetune.out={checkpoints} finetune.save_every=N` first"
        )
    if len(steps) == 1:
        log.warning("%s holds the final model only: set finetune.save_every for the steps between", checkpoints)
    return [(0, model_cfg), *[(step, replace(model_cfg, name=f"{model_cfg.name}-step-{step}", path=str(path),
                                              package=None, gguf_file=None, revision=None)) for step, path in steps]]  # fmt: skip


def _step_metrics(loaded: LoadedModel, run: RunDir, d: Dictionary, cfg: TrackConfig) -> dict:
    settings = EvaluationSettings(tokens=cfg.eval_tokens, batch_size=cfg.batch_size, progress=False)
    evaluated = evaluate_dictionaries(loaded, held_out(loaded, run, d.hook, [d], settings), [d], settings)
    row = summary_row(next(iter(evaluated.values()))[0])
    return {k: row[k] for k in _METRICS}


def _follow(run: RunDir, d: Dictionary, steps: list[tuple[int, ModelConfig]], corpus: CorpusConfig,
            cfg: TrackConfig) -> tuple[list[dict], list[StepStats], TaskAttribution]:  # fmt: skip
    """Every step's metrics and feature statistics, and the task's attribution under θ₀."""
    records, stats, reference, task = [], [], None, None
    for step, model_cfg in tqdm(steps, desc="track", unit="step", disable=not cfg.progress):
        loaded = load_model(model_cfg)
        if reference is None:
            check_model([d], loaded, cfg.force, "track")
        sae = d.sae.to(loaded.device).eval()
        held = held_out(loaded, run, d.hook, [d], EvaluationSettings(tokens=cfg.tokens, progress=False))
        codes = batch_codes(loaded.model, held.read_hook, sae, held.windows, held.bos, cfg.batch_size)
        if reference is None:
            reference = reference_codes(codes)
            codes = (z.to_dense() for z in reference)
            windows = task_windows(loaded, corpus, held.windows.shape[1], cfg.task_tokens)
            task = attribution_patching(loaded.model, held.read_hook, sae, windows, loaded.tokenizer.bos_token_id,
                                        cfg.batch_size, held.hook if held.reads else None)  # fmt: skip
        stats.append(step_stats(codes, reference))
        records.append({"step": step, "model": model_cfg.path or model_cfg.name, **_step_metrics(loaded, run, d, cfg)})
        log.info("step %d: FVU %.4f, CE recovered %.4f", step, records[-1]["fvu"], records[-1]["ce_loss_score"])
        del loaded
    return records, stats, task


def _changed_rows(steps: list[int], stats: list[StepStats], statuses: torch.Tensor, first: torch.Tensor,
                  task: TaskAttribution, n: int) -> list[dict]:  # fmt: skip
    """The n most changed features by the last step, ordered by (1 - cosine) x their largest frequency
    over the steps: the share of positions whose firing moved (a feature seen on one position first
    would put noise on top)."""
    final = statuses[-1]
    changed = torch.nonzero((final == SHIFTED) | (final == VANISHED) | (final == APPEARED)).flatten()
    moved = (1 - stats[-1].cosine.nan_to_num(0.0)) * torch.stack([s.frequency for s in stats]).max(0).values
    order = changed[moved[changed].argsort(descending=True)].tolist()
    rank = torch.argsort(torch.argsort(task.effect, descending=True))
    return [{"id": f, "status": STATUS_NAMES[int(final[f])], "first_step": steps[int(first[f])],
             "frequency": [float(s.frequency[f]) for s in stats], "cosine": [float(s.cosine[f]) for s in stats],
             "task_effect_per_1k": float(task.effect[f]) * 1000 / max(1, task.tokens),
             "task_rank": int(rank[f]) + 1 if task.count[f] > 0 else None} for f in order[:n]]  # fmt: skip


def _report(records: list[dict], stats: list[StepStats], task: TaskAttribution, d: Dictionary, cfg: TrackConfig,
            corpus: CorpusConfig) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """track.json's content, and every step's statuses [steps, d_sae]."""
    statuses = torch.stack([classify(stats[0], s, cfg.kept, cfg.vanished, cfg.appeared) for s in stats])
    alive = stats[0].count > 0
    for record, s, status in zip(records, stats, statuses, strict=True):
        record.update({name: int((status == i).sum()) for i, name in enumerate(STATUS_NAMES)})
        record["mean_cosine"] = float(s.cosine[alive].nan_to_num(0.0).mean())
    final = statuses[-1]
    moved = (final != KEPT) & alive
    relevance = relevance_of_moved(task.effect, task.count, 1 - stats[-1].cosine, moved, alive, cfg.top_relevant)
    steps = [r["step"] for r in records]
    report = {
        "sae": d.name, "hook": d.hook, "checkpoints": cfg.checkpoints, "task": corpus.name, "positions": stats[0].positions,
        "steps": records, "relevance": {**relevance, "task_tokens": task.tokens, "task_loss": task.loss},
        "most_changed": _changed_rows(steps, stats, statuses, first_change(statuses), task, cfg.top_changed),
        "settings": asdict(cfg),
    }  # fmt: skip
    return report, statuses


def _write(out: Path, run: RunDir, d: Dictionary, report: dict, stats: list[StepStats], statuses: torch.Tensor) -> Path:
    tensors = {"steps": torch.tensor([r["step"] for r in report["steps"]]),
               "frequency": torch.stack([s.frequency for s in stats]).float(),
               "cosine": torch.stack([s.cosine for s in stats]).float(), "status": statuses}  # fmt: skip
    atomic_write(out / TENSORS, save({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write(out / REPORT, json.dumps(report, indent=1).encode())
    page = run.feature_page(d.hook, d.name)
    link = os.path.relpath(page, out) if page.exists() else None
    rows = index_rows(run.features(d.hook, d.name))
    atomic_write(out / PAGE, track_page(report, link, rows.get).encode())
    for name in (TENSORS, REPORT, PAGE):
        run.upload(out / name)
    if linked := link_report(run.features(d.hook, d.name), f"track/{out.name}", f"through fine-tuning: {out.name}",
                             out / PAGE):  # fmt: skip
        run.upload(linked)
    return out / PAGE


def _log_wandb(report: dict, run: RunDir, wandb_cfg: WandbConfig | None) -> None:
    tracker = Tracker(wandb_cfg or WandbConfig(), run.root, "track", {"track": report["settings"]}, group=run.location,
                      detail=f"{report['sae']} through {Path(report['checkpoints']).name}")  # fmt: skip
    for record in report["steps"]:
        tracker.log({k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}, step=record["step"])
    tracker.table("most_changed", [{**row, "frequency": json.dumps(row["frequency"]), "cosine": json.dumps(row["cosine"])}
                                   for row in report["most_changed"]])  # fmt: skip
    tracker.summary({k: v for k, v in report["relevance"].items() if isinstance(v, int | float)})
    tracker.finish()


def track_features(model_cfg: ModelConfig, corpus: CorpusConfig, cfg: TrackConfig, run_dir: str | Path,
                   wandb_cfg: WandbConfig | None = None) -> Path:  # fmt: skip
    """Follow the configured dictionary's features through the fine-tuning; return the page."""
    run = RunDir.open(run_dir)
    d = one_dictionary(run, cfg, "track", TrackError)
    checkpoints = Path(cfg.checkpoints)
    steps = model_steps(model_cfg, checkpoints)
    log.info("track %s/%s through %d steps of %s", d.hook, d.name, len(steps) - 1, checkpoints)
    records, stats, task = _follow(run, d, steps, corpus, cfg)
    report, statuses = _report(records, stats, task, d, cfg, corpus)
    page = _write(run.tracking(checkpoints.name), run, d, report, stats, statuses)
    _log_wandb(report, run, wandb_cfg)
    last, rel = report["steps"][-1], report["relevance"]
    log.info("after step %d: kept %d, shifted %d, vanished %d, appeared %d; moved: %.0f%% of the %d most task-relevant "
             "features vs %.0f%% of all -> %s", last["step"], last["kept"], last["shifted"], last["vanished"],
             last["appeared"], 100 * rel["moved_share_of_top_relevant"], rel["top"], 100 * rel["moved_share_of_all"], page)  # fmt: skip
    return page


def run(cfg: DictConfig) -> Path:
    """The track stage on a composed Hydra config."""
    return track_features(to_dataclass(ModelConfig, cfg.model), to_dataclass(CorpusConfig, cfg.corpus),
                          to_dataclass(TrackConfig, cfg.track), cfg.run_dir, to_dataclass(WandbConfig, cfg.wandb))  # fmt: skip


main = stage_main("track", run)
