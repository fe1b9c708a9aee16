"""Steer stage: what a feature does, read from what the model writes when the feature is edited.

    python -m pipeline steer run_dir=outputs/demo steer.feature=1044 'steer.prompts=["I think that"]'
    python -m pipeline steer run_dir=outputs/demo steer.feature=1044 'steer.scales=[-2,2,8]'
    python -m pipeline steer run_dir=outputs/demo steer.feature=1044 steer.mode=remove

Adds the feature's decoder direction at its dictionary's hook (or clamps its activation to a value,
or removes it; steering.py; a transcoder's at the output it writes, its activation coded from the
input it reads), generates greedily from each prompt without and with the edit at every
scale, and prints them side by side with how the next-token distribution after the prompt moved
(KL, the tokens that rose most, and the log-probability change of the tokens the feature promotes
by the logit lens). With `steer.relative` (the default) scales are multiples of the feature's
largest activation on the stored activations, the size it reaches on real text.
Writes `<run_dir>/steer/<hook>/<sae>/feature-<id>.json`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.cli import stage_main
from pipeline.config import check_settings, to_dataclass
from pipeline.dictionaries import Dictionary, OneDictionary, check_model, one_dictionary, shards_for
from pipeline.fileio import atomic_write
from pipeline.hooks import validate_hooks
from pipeline.models import LoadedModel, ModelConfig, load_model
from pipeline.rundir import RunDir
from pipeline.steering import MODES, SteeringError, plain_outputs, steering_report

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["I think that", "The function returns", "In the beginning"]


@dataclass
class SteerConfig(OneDictionary):
    feature: int | None = None
    """The feature to steer (required)."""
    mode: str = "add"
    """add (scale x the decoder direction) | clamp (the activation set to scale) | remove."""
    scales: list[float] = field(default_factory=lambda: [2.0, 8.0])
    relative: bool = True
    """Scales are multiples of the feature's largest activation on the stored activations."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 24
    tokens: int = 65_536
    """Stored tokens the largest activation is measured on (relative scales)."""

    def __post_init__(self) -> None:
        check_settings(self, "steer", SteeringError, positive=("max_new_tokens", "tokens"),
                       non_negative=("feature",), choices={"mode": MODES})  # fmt: skip
        if self.feature is None:
            raise SteeringError("steer.feature is not set: name the feature to steer, e.g. steer.feature=1044")
        if not self.prompts:
            raise SteeringError('steer.prompts is empty: give at least one, e.g. \'steer.prompts=["I think that"]\'')


@torch.no_grad()
def largest_activation(d: Dictionary, run: RunDir, loaded: LoadedModel, feature: int, tokens: int) -> float:
    """The feature's largest activation over the first `tokens` stored tokens at its hook (BOS left
    out, as training and analyze leave it)."""
    shards = shards_for(run, d.hook, loaded)
    top = 0.0
    for idx in shards.position_chunks(0, min(tokens, shards.n_tokens), 8192, exclude_bos=True):
        x = shards.gather(idx).to(loaded.device, torch.float32)
        top = max(top, float(d.sae.encode(x)[:, feature].max()))
    if top <= 0:
        raise SteeringError(
            f"feature {feature} never fires on the first {tokens} stored tokens, so relative scales mean "
            "nothing; give absolute ones (steer.relative=false) or steer another feature"
        )
    return top


def format_report(report: dict, tokenizer) -> str:
    """The continuations side by side, then how the next token moved, as text."""
    unit = f" x {report['unit']:.3g}" if report["unit"] != 1 else ""
    lines = [f"feature {report['feature']} of {report['dictionary']} at {report['hook']}, {report['mode']}{unit}"]
    for i, prompt in enumerate(report["prompts"]):
        lines += ["", repr(prompt), f"  {'plain':>10} : {report['plain'][i]!r}"]
        for step in report["scales"]:
            risen = ", ".join(f"{tokenizer.decode([t])!r} +{p:.3f}" for t, p in step["risen"][i][:3])
            lines += [f"  {step['scale']:>+10g} : {step['texts'][i]!r}", f"{'':15}KL {step['kl'][i]:.3f}; rose: {risen}"]
    rises = ", ".join(f"{s['promoted_rise']:+.3f} at {s['scale']:g}" for s in report["scales"])
    lines += ["", f"log-probability change of the 10 tokens it promotes (logit lens): {rises}"]
    return "\n".join(lines) + "\n"


def steer(model_cfg: ModelConfig, cfg: SteerConfig, run_dir: str | Path, loaded: LoadedModel | None = None) -> Path:
    """Steer the configured feature; print the report and write it as JSON; return its path."""
    run = RunDir.open(run_dir)
    d = one_dictionary(run, cfg, "steer", SteeringError)
    if not 0 <= cfg.feature < d.sae.d_sae:
        raise SteeringError(f"steer.feature={cfg.feature} is not a feature of {d.name} (0 to {d.sae.d_sae - 1})")
    loaded = loaded or load_model(model_cfg)
    check_model([d], loaded, cfg.force, "steer")
    unit = largest_activation(d, run, loaded, cfg.feature, cfg.tokens) if cfg.relative else 1.0
    hook = validate_hooks(loaded.model, [d.writes])[0]
    reads = validate_hooks(loaded.model, [d.hook])[0] if d.sae.transcodes else None  # its code comes from there
    sae = d.sae.to(loaded.device).eval()
    plain = plain_outputs(loaded, hook, cfg.prompts, cfg.max_new_tokens)
    report = steering_report(loaded, hook, sae, cfg.feature, cfg.mode, unit, cfg.scales, plain, cfg.prompts,
                             cfg.max_new_tokens, reads)  # fmt: skip
    report = {**report, "dictionary": str(d.directory), "hook": d.hook, **({"edited_at": hook.name} if d.sae.transcodes else {}),
              "settings": asdict(cfg)}  # fmt: skip
    sys.stdout.write(format_report(report, loaded.tokenizer))
    out = run.steering(d.hook, d.name, cfg.feature)
    atomic_write(out, json.dumps(report, indent=1).encode())
    run.upload(out)
    log.info("steering report -> %s", out)
    return out


def run(cfg: DictConfig) -> Path:
    """The steer stage on a composed Hydra config."""
    return steer(to_dataclass(ModelConfig, cfg.model), to_dataclass(SteerConfig, cfg.steer), cfg.run_dir)


main = stage_main("steer", run)
