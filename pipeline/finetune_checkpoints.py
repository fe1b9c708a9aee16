"""Where the finetune stage keeps the models of its intermediate steps, and how a later stage (track)
finds them: `<out>/checkpoints/step-<N>/`, each a model directory (config, tokenizer, safetensors
weights) with its done marker written last, so a half-written step is never listed."""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINTS = "checkpoints"
DONE = "finetune.json"  # in the final model directory and in each step's: the settings, written last


def step_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def finished_steps(out: Path) -> list[tuple[int, Path]]:
    """(step, model directory) of every complete intermediate step and of the final model, in order;
    [] where `out` holds no finished fine-tuning. Steps a fine-tuning of other settings left are not
    listed (their done marker holds those settings)."""
    steps = [
        (int(d.name.removeprefix("step-")), d)
        for d in sorted((out / CHECKPOINTS).glob("step-*"))
        if (d / DONE).exists()
    ]
    if (out / DONE).exists():
        settings = (out / DONE).read_text()
        final = json.loads(settings)["steps"]
        steps = [s for s in steps if s[0] < final and (s[1] / DONE).read_text() == settings] + [(final, out)]
    return steps
