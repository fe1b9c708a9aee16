"""Evaluate stage: the standard SAE quality metrics, with each dictionary spliced into the real model.

    python -m pipeline evaluate run_dir=outputs/default evaluate.tokens=16384

Every dictionary under `<run_dir>/sae/<hook>/` (or those named in `evaluate.saes`) is evaluated on
held-out windows that training never saw (evaluation.py has the metrics and how they are computed).
Writes `<run_dir>/eval/<hook>/<sae>/metrics.json` (SAEBench core-eval key names),
`per_token.safetensors`, `density.png`, and `<run_dir>/eval/pareto.png`; prints a summary table;
logs to W&B. A dictionary whose metrics.json was computed with the same weights, model, windows and
settings is not evaluated again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save

from pipeline.cli import stage_main
from pipeline.config import to_dataclass
from pipeline.dictionaries import DictionarySelection, check_model, find_dictionaries
from pipeline.evaluation import (
    EvaluationError,
    EvaluationSettings,
    evaluate_dictionaries,
    held_out,
    summary_row,
)
from pipeline.fileio import atomic_write, remove_stale_temporaries
from pipeline.locks import exclusive
from pipeline.models import LoadedModel, ModelConfig, load_model
from pipeline.plots import density_plot, pareto_plot
from pipeline.rundir import METRICS_FILE, RunDir
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig(DictionarySelection, EvaluationSettings):
    """Which dictionaries to evaluate, on how many held-out tokens, and what joins the Pareto plot."""

    compare_with: list[str] = field(default_factory=list)
    """Other run directories whose evaluated dictionaries join the Pareto plot (e.g. a sweep)."""


def _write_outputs(run: RunDir, report: dict, result: dict, windows: torch.Tensor) -> Path:
    """per_token.safetensors, density.png, then metrics.json (the marker that the evaluation is done,
    removed first so that it never vouches for files being replaced)."""
    out = run.evaluation(report["hook"], report["sae"])
    run.evaluation_report(report["hook"], report["sae"]).unlink(missing_ok=True)
    per_token = {k: v.contiguous() for k, v in result["per_token"].items()}
    per_token["counted"] = per_token["counted"].to(torch.uint8)
    per_token["tokens"] = windows.to(torch.int32).contiguous()
    per_token["density"] = result["density"].contiguous()
    atomic_write(out / "per_token.safetensors", save(per_token))
    density_plot(report["density_histogram"], out / "density.png", f"{report['hook']} / {report['sae']}")
    atomic_write(run.evaluation_report(report["hook"], report["sae"]), json.dumps(report, indent=2).encode())
    run.publish(out, METRICS_FILE)
    return out


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
        ("silent %", "silent_fraction", "{:.2%}"),
        ("dense %", "dense_fraction", "{:.2%}"),
    ]
    cells = [[title for title, _, _ in columns]]
    cells += [[fmt.format(row[key]).rstrip("%") for _, key, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]  # fmt: skip
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]) + "\n"


def collect_reports(runs: list[RunDir]) -> list[dict]:
    """Every evaluated dictionary's metrics.json under the given run directories."""
    return [json.loads(path.read_text()) for run in runs for path in run.evaluation_reports()]


def _compared_runs(locations: list[str]) -> list[RunDir]:
    """The runs of evaluate.compare_with, each holding evaluated dictionaries (checked before any compute)."""
    runs = [RunDir.open(location) for location in locations]
    for location, other in zip(locations, runs, strict=True):
        if not other.evaluation_reports():
            raise EvaluationError(
                f"evaluate.compare_with: {location} holds no evaluated dictionaries (no eval/<hook>/<sae>/metrics.json); "
                "run evaluate there first, or fix the path"
            )
    return runs


def _evaluate_hook_group(
    loaded, run: RunDir, hook_name: str, group, cfg: EvaluateConfig, tracker
) -> dict[str, dict]:
    """Evaluate (or take the current metrics.json of) the dictionaries at one hook; write outputs."""
    held = held_out(loaded, run, hook_name, group, cfg)
    reports, todo = {}, []
    for d in group:
        previous = run.evaluated(hook_name, d.name, held.output_hash(d, loaded))
        if previous is None:
            todo.append(d)
        else:
            log.info("%s/%s: already evaluated with this configuration", hook_name, d.name)
            reports[d.name] = previous
    with contextlib.ExitStack() as locks:
        for d in todo:
            out = run.evaluation(hook_name, d.name)
            locks.enter_context(exclusive(out, f"the evaluation {out}"))
            remove_stale_temporaries(out)
        for name, (report, result) in (
            evaluate_dictionaries(loaded, held, todo, cfg) if todo else {}
        ).items():
            out = _write_outputs(run, report, result, held.windows)
            row = summary_row(report)
            tracker.summary({f"{hook_name}/{name}/{k}": v for k, v in row.items() if isinstance(v, float)})
            tracker.log_images({f"{hook_name}/{name}/density": out / "density.png"})
            log.info("evaluated %s/%s -> %s", hook_name, name, run.where(out))
            reports[name] = report
    return reports


def evaluate_saes(
    model_cfg: ModelConfig,
    cfg: EvaluateConfig,
    run_dir: str | Path,
    wandb_cfg: WandbConfig | None = None,
    loaded: LoadedModel | None = None,
) -> dict[str, dict]:
    """Evaluate the configured dictionaries of `run_dir`; return {"<hook>/<sae>": metrics.json content}."""
    run = RunDir.open(run_dir)
    dictionaries = find_dictionaries(run, cfg.saes, cfg.hook, cfg.force, "evaluate")
    others = _compared_runs(cfg.compare_with)
    loaded = loaded or load_model(model_cfg)
    check_model(dictionaries, loaded, cfg.force, "evaluate")
    tracker = Tracker(wandb_cfg or WandbConfig(), run.root, "evaluate", {"evaluate": asdict(cfg)}, group=run.location)
    reports: dict[str, dict] = {}
    # a group: the dictionaries at one hook that predict the same activations (transcoders: hook_out)
    for hook_name, writes in sorted({(d.hook, d.writes) for d in dictionaries}):
        group = [d for d in dictionaries if (d.hook, d.writes) == (hook_name, writes)]
        for name, report in _evaluate_hook_group(loaded, run, hook_name, group, cfg, tracker).items():
            reports[f"{hook_name}/{name}"] = report
    all_reports = collect_reports([run, *others])
    tracker.table("dictionaries", [summary_row(r) for r in reports.values()])  # L0 vs CE recovered, charted by W&B
    if all_reports:
        tracker.log_images({"pareto": pareto_plot([summary_row(r) for r in all_reports], run.pareto_plot)})
        run.upload(run.pareto_plot)
    tracker.finish()
    sys.stdout.write("\n" + format_table([summary_row(r) for r in reports.values()]))
    sys.stdout.write(f"metrics: {run.evaluation_report('<hook>', '<dictionary>')}\n")
    return reports


def run(cfg: DictConfig) -> dict[str, dict]:
    """The evaluate stage on a composed Hydra config."""
    return evaluate_saes(
        to_dataclass(ModelConfig, cfg.model),
        to_dataclass(EvaluateConfig, cfg.evaluate),
        cfg.run_dir,
        to_dataclass(WandbConfig, cfg.wandb),
    )


main = stage_main("evaluate", run)
