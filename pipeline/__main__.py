"""`python -m pipeline <stage> [hydra overrides]`: dispatch to a stage's Hydra entry point."""

from __future__ import annotations

import importlib
import pkgutil
import sys

from pipeline import stages

STAGES = sorted(module.name for module in pkgutil.iter_modules(stages.__path__))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        sys.stderr.write(
            "usage: python -m pipeline <stage> [key=value ...] [-m for a multirun sweep]\n"
            f"stages: {', '.join(STAGES)}\n"
            "example: python -m pipeline harvest harvest.hooks=[blocks.6.resid_post] harvest.tokens=100000\n"
        )
        sys.exit(2)
    stage = sys.argv.pop(1)
    sys.argv[0] = f"pipeline {stage}"
    importlib.import_module(f"pipeline.stages.{stage}").main()


if __name__ == "__main__":
    main()
