"""Evaluation throughput against the bare forward pass (tokens -> logits) of the same model.

    make bench            (or: python bench/bench_evaluate.py --tokens 8192)

Target (issue #5): evaluate >= 0.45x the bare forward. Evaluating needs the clean logits and the
spliced logits, so two full forwards would cap it at 0.5x; the spliced pass replays the clean
layers before the hook and the residual-stream ablations cost one window in all.
The timed stage is the whole `evaluate_saes` call (metrics, plots, files), with the model loaded.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from default_model import add_dtype_argument, default_model

from pipeline.corpus import CorpusConfig
from pipeline.harvesting import HarvestConfig, harvest_activations
from pipeline.models import dtype_name, load_model
from pipeline.sae import SaeConfig, build_sae
from pipeline.shards import ShardSet
from pipeline.stages.evaluate import EvaluateConfig, evaluate_saes
from pipeline.tracking import WandbConfig


def bare_forward(model, tokens: torch.Tensor, batch_size: int) -> float:
    """Seconds for the full forward (logits) over `tokens` [n_seq, ctx] in the evaluation's batches."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tokens), batch_size):
            model(
                input_ids=tokens[i : i + batch_size].long().to(model.device), use_cache=False
            ).logits.float()
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)  # the last batch's kernels, queued asynchronously
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hook", default="blocks.9.resid_post")
    add_dtype_argument(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()

    model_cfg = default_model(args.dtype)
    loaded = load_model(model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        harvest_activations(
            model_cfg,
            CorpusConfig(),
            HarvestConfig(hooks=[args.hook], tokens=args.tokens, progress=False),
            run_dir,
            loaded=loaded,
        )
        shards = ShardSet(run_dir / "activations" / args.hook)
        meta = {"model_id": loaded.model_id, "hook": args.hook, "training_split_tokens": 0}
        sae = build_sae(SaeConfig(architecture="topk", expansion=args.expansion, k=32), loaded.d_model, meta)
        sae.save(run_dir / "sae" / args.hook / "bench")
        tokens = shards.tokens_at(torch.arange(shards.n_tokens)).view(-1, shards.manifest.context_length)
        cfg = EvaluateConfig(batch_size=args.batch_size, progress=False)

        def timed_evaluate() -> float:
            shutil.rmtree(run_dir / "eval", ignore_errors=True)
            start = time.perf_counter()
            evaluate_saes(model_cfg, cfg, run_dir, WandbConfig(mode="disabled"), loaded=loaded)
            return time.perf_counter() - start

        eval_times, bare_times = [], []
        for _ in range(args.rounds):
            eval_times.append(timed_evaluate())
            bare_times.append(bare_forward(loaded.model, tokens, args.batch_size))
    n = tokens.numel()
    eval_s, bare_s = min(eval_times), min(bare_times)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {loaded.device}, {dtype_name(loaded.dtype)}")  # fmt: skip
    print(
        f"evaluate {args.hook}, one {args.expansion}x TopK dictionary, {n} tokens in batches of {args.batch_size}"
    )
    print(f"  bare forward (logits): {n / bare_s:8.0f} tok/s")
    print(f"  evaluate:              {n / eval_s:8.0f} tok/s   ratio {bare_s / eval_s:.2f} (target >= 0.45)")


if __name__ == "__main__":
    main()
