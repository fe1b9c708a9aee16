"""Training straight from the model (`train.source=model`) against the bare truncated forward, and its
held-out FVU against training from shards on the same windows with the same budget.

    make bench            (or: python bench/bench_stream.py --tokens 262144)

  model   the held-out split (the corpus' first `holdout` tokens) is stored; train.source=model
          streams the windows after it
  shards  a shard set of exactly those windows, the streamed ones first and the held-out ones last,
          trained on by the train stage (its held-out split: the last windows, so the same ones)
Prints the training loop's tokens/s from the model / the bare truncated forward over the windows it
streams (target >= 0.85: the SAE step hides under the forward), and FVU model / FVU shards (target:
within 2%; what differs is only the order: one shuffled block against a shuffle of the whole split).
Both dictionaries use the train stage's defaults (SaeConfig(), TrainConfig()).
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
from default_model import add_dtype_argument, default_model

from pipeline.corpus import CorpusConfig
from pipeline.harvesting import HarvestConfig, corpus_windows, forward_shard, harvest_activations
from pipeline.hooks import validate_hooks
from pipeline.models import dtype_name, load_model
from pipeline.sae import Sae, SaeConfig
from pipeline.shards import Manifest, ShardSet, ShardWriter, shard_name, write_manifest
from pipeline.stages import train as train_stage
from pipeline.streaming import ModelSource
from pipeline.tracking import WandbConfig
from pipeline.training import TrainConfig

HOOK = "blocks.9.resid_post"


def timed_training(cfg: TrainConfig, run_dir: Path, source=None) -> tuple[float, dict, str | None]:
    """(seconds in the training loop, the saved dictionary's metrics, and with source=model where the
    loop's time went: the forward, the wait for tokenized windows, the rest)."""
    seconds, split = [], []
    loop = train_stage._train_loop

    def timed_loop(plan, *args, **kwargs):
        start = time.perf_counter()
        loop(plan, *args, **kwargs)
        seconds.append(time.perf_counter() - start)
        split.append(plan.stream.times.summary(seconds[0]) if plan.stream is not None else None)

    train_stage._train_loop = timed_loop
    try:
        saved = train_stage.train_saes(cfg, SaeConfig(), run_dir, WandbConfig(mode="disabled"), source)
    finally:
        train_stage._train_loop = loop
    return seconds[0], Sae.load(next(iter(saved.values()))).config_dict()["metrics"], split[0]


def same_windows_shards(loaded, stored: Path, streamed: torch.Tensor, out: Path, batch_size: int) -> None:
    """Write `out`: the streamed windows [n, ctx] then the stored ones, as shards of the stored set's kind."""
    held = ShardSet(stored)
    windows = torch.cat([streamed, held.tokens_at(torch.arange(held.n_tokens)).view(-1, streamed.shape[1])])
    hooks = validate_hooks(loaded.model, [HOOK])
    writer, per_shard = ShardWriter(), held.manifest.sequences_per_shard
    out.mkdir(parents=True)
    for index, start in enumerate(range(0, len(windows), per_shard)):
        tokens = windows[start : start + per_shard].to(torch.int32)
        acts = forward_shard(loaded, hooks, tokens, batch_size, held.dtype)[HOOK]
        writer.submit(index, out / shard_name(index), tokens, acts)
    writer.close()
    records = [writer.records[i] for i in sorted(writer.records)]
    write_manifest(out, Manifest(**{**held.manifest.identity(), "shards": records}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144, help="training tokens of both dictionaries")
    parser.add_argument("--holdout", type=int, default=16_384)
    add_dtype_argument(parser)
    args = parser.parse_args()

    model_cfg = default_model(args.dtype)
    corpus = CorpusConfig(name="pydoc", source="pydoc")
    loaded = load_model(model_cfg)
    windows_cfg = HarvestConfig(hooks=[HOOK], progress=False)
    ctx = windows_cfg.context_length
    base = TrainConfig(hook=HOOK, tokens=args.tokens, holdout_tokens=args.holdout, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_run, shards_run = Path(tmp) / "model", Path(tmp) / "shards"
        held = replace(windows_cfg, tokens=-(-args.holdout // ctx) * ctx)
        harvest_activations(model_cfg, corpus, held, model_run, loaded=loaded)
        first = held.tokens // ctx
        streamed = torch.stack(list(itertools.islice(corpus_windows(loaded, corpus, windows_cfg), first,
                                                     first + -(-args.tokens // (ctx - 1)))))  # fmt: skip
        source = ModelSource(model_cfg, corpus, windows_cfg)
        model_s, model_metrics, model_split = timed_training(replace(base, source="model"), model_run, source)
        same_windows_shards(loaded, model_run / "activations" / HOOK, streamed,
                            shards_run / "activations" / HOOK, windows_cfg.batch_size)  # fmt: skip
        shards_s, shards_metrics, _ = timed_training(base, shards_run)
    bare_s = bare_forward(loaded, validate_hooks(loaded.model, [HOOK]), streamed, windows_cfg.batch_size)
    bare_rate = streamed[:, 1:].numel() / bare_s  # trained-on tokens (BOS excluded) per second
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"model: SmolLM2-135M ({dtype_name(loaded.dtype)}) {HOOK}; dictionary: {SaeConfig().default_name()}, "
          f"{args.tokens} training tokens, held-out {shards_metrics['heldout_tokens']} tokens")  # fmt: skip
    print(f"{'':34}{'tokens/s':>10}{'held-out FVU':>14}")
    print(f"{'bare truncated forward':34}{bare_rate:>10,.0f}")
    print(f"{'train from shards':34}{args.tokens / shards_s:>10,.0f}{shards_metrics['fvu']:>14.4f}")
    print(f"{'train from the model':34}{args.tokens / model_s:>10,.0f}{model_metrics['fvu']:>14.4f}")
    print(f"ratio train-from-model / bare forward: {args.tokens / model_s / bare_rate:.3f}   (target >= 0.85)")
    print(f"train from the model, {model_split}")
    print(f"FVU from the model / from shards: {model_metrics['fvu'] / shards_metrics['fvu']:.4f}   (target 0.98-1.02)")


if __name__ == "__main__":
    main()
