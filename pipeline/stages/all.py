"""`python -m pipeline all`: harvest -> train -> evaluate -> analyze (-> explain, with
explain_after_analyze=true) on one composed configuration. The one module that imports other stages:
it only runs them in order.

    python -m pipeline all experiment=demo

Every stage skips what is already done with the same configuration (harvest keeps complete shards,
train / evaluate / analyze compare a config hash stored with their outputs), so re-running after a
change redoes only the stages it affects.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from pipeline.cli import stage_main
from pipeline.dashboard import INDEX_PAGE
from pipeline.rundir import RunDir
from pipeline.stages import analyze, evaluate, explain, harvest, train

log = logging.getLogger(__name__)


def run_all(cfg: DictConfig) -> dict:
    """Run the four stages on `cfg` (a composed `pipeline` config); return each stage's result."""
    trained_on = [cfg.train.hook] + ([cfg.train.hook_out] if cfg.train.get("hook_out") else [])
    if cfg.train.source == "shards" and not set(trained_on) <= set(cfg.harvest.hooks):
        raise ValueError(
            f"train.hook / hook_out {trained_on} are not all among harvest.hooks={list(cfg.harvest.hooks)}; "
            "harvest the hooks you train on"
        )
    results = {}
    for name, stage in (("harvest", harvest), ("train", train), ("evaluate", evaluate), ("analyze", analyze)):
        if name == "harvest" and cfg.train.source == "model":
            log.info("---- harvest: skipped (train.source=model stores only the held-out split)")
            continue
        log.info("---- %s", name)
        results[name] = stage.run(cfg)
    if cfg.explain_after_analyze:
        log.info("---- explain")
        results["explain"] = {key: explain.run(cfg, *key.split("/", 1)) for key in results["analyze"]}
    run = RunDir.open(cfg.run_dir)
    lines = ["", f"done: {run.location}" + (f" (local mirror: {run.root})" if run.remote else "")]
    for key, path in results["analyze"].items():
        lines.append(f"  dashboard {key}: {path / INDEX_PAGE}")
    lines.append(
        f"  metrics:  {run.evaluation_report('<hook>', '<dictionary>')}  (Pareto plot: {run.pareto_plot})"
    )
    sys.stdout.write("\n".join(lines) + "\n")
    return results


main = stage_main("pipeline", run_all)
