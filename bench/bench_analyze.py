"""Analysis throughput next to the bare forward pass of the same model.

    make bench            (or: python bench/bench_analyze.py --tokens 65536)

The streaming pass reads the harvested activations and runs the dictionary's encoder (no model
forward), so it is compared with what computing those activations costs: the model's bare forward.
The whole stage adds a fixed cost: the logit lens of every feature and the attributions and loss
contributions of `analyze.detail_features` features, which run the model.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from default_model import default_model

from pipeline.corpus import CorpusConfig
from pipeline.feature_stats import feature_pass
from pipeline.harvesting import HarvestConfig, harvest_activations
from pipeline.models import load_model
from pipeline.sae import SaeConfig, build_sae
from pipeline.shards import ShardSet
from pipeline.stages.analyze import AnalyzeConfig, analyze_saes
from pipeline.tracking import WandbConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--hook", default="blocks.9.resid_post")
    parser.add_argument("--expansion", type=int, default=16)
    args = parser.parse_args()

    model_cfg = default_model()
    loaded = load_model(model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        harvest_activations(model_cfg, CorpusConfig(), HarvestConfig(hooks=[args.hook], tokens=args.tokens,
                            progress=False), run_dir, loaded=loaded)  # fmt: skip
        shards = ShardSet(run_dir / "activations" / args.hook)
        sae = build_sae(SaeConfig(architecture="topk", expansion=args.expansion, k=32), loaded.d_model,
                        {"model_id": loaded.model_id, "hook": args.hook})  # fmt: skip
        sae.save(run_dir / "sae" / args.hook / "bench")
        n = shards.n_tokens
        ctx = shards.manifest.context_length
        tokens = shards.tokens_at(torch.arange(n)).view(-1, ctx)

        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(tokens), 8):
                loaded.model(input_ids=tokens[i : i + 8].long(), use_cache=False)
        bare_s = time.perf_counter() - start

        cfg = AnalyzeConfig(progress=False)
        start = time.perf_counter()
        feature_pass(sae, shards, len(tokens), cfg, loaded.device)
        pass_s = time.perf_counter() - start

        start = time.perf_counter()
        analyze_saes(model_cfg, cfg, run_dir, WandbConfig(mode="disabled"), loaded=loaded)
        stage_s = time.perf_counter() - start
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {loaded.device}")  # fmt: skip
    print(f"analyze {args.hook}, one {args.expansion}x TopK dictionary ({sae.d_sae} features), {n} tokens")
    print(f"  bare model forward:        {n / bare_s:8.0f} tok/s")
    print(f"  streaming pass:            {n / pass_s:8.0f} tok/s   ({bare_s / pass_s:.1f}x the forward)")
    print(f"  whole stage:               {n / stage_s:8.0f} tok/s   ({stage_s:.0f} s; "
          f"{cfg.detail_features} features with attributions)")  # fmt: skip


if __name__ == "__main__":
    main()
