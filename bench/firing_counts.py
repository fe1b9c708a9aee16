"""Rare or unused? How often each dictionary of a `make bench-quality` sweep fires over a long span.

    python bench/firing_counts.py                        # every dictionary in outputs/bench-quality
    python bench/firing_counts.py --span 300000 topk-k16-x32 sparsify-k16-x32

The sweep counts a latent dead when it is idle over the last 10k training tokens and silent when it
never fires on the 32k held-out tokens. At k 16 and 32x a latent fires once in 1,152 tokens on
average, so a rarely firing latent falls under both windows by chance. This counts, for each
dictionary, the firings of every latent over a longer span (the last --span training tokens and the
held-out split) and prints the share of latents that never fire there and that fire at most 10 and
30 times: latents that are rare against ones that are unused. It also prints the spread of the
firing rates (the rate of the latent at the 5 % and 50 % quantile, over the mean counted rate, about
k / d_sae) and the share of latents that a random --window of tokens would leave idle if each latent
fired at its counted rate independently (Poisson): the dead share the dictionary's own frequency
spread implies.
With --draws N it also prints, for each dictionary, the share of latents idle over N random draws of
--window training tokens (the saved dictionary counted as the training window counts the dictionary
it trains).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.metrics import StreamingReconstructionStats  # noqa: E402
from pipeline.rundir import RunDir  # noqa: E402
from pipeline.sae import Sae  # noqa: E402
from pipeline.shards import ShardSet  # noqa: E402
from pipeline.splits import heldout_start  # noqa: E402
from pipeline.training import TrainConfig  # noqa: E402


def firing_counts(sae: Sae, shards: ShardSet, start: int, batch_size: int = 4096) -> tuple[torch.Tensor, int]:
    """Firings of every latent [d_sae] over the tokens [start, end) of `shards` (BOS left out, as in
    training), counted as the held-out metrics count them, and the number of tokens counted."""
    stats = StreamingReconstructionStats(sae.d_in, sae.d_sae)
    with torch.no_grad():
        for idx in shards.position_chunks(start, shards.n_tokens, batch_size, exclude_bos=True):
            x = shards.gather(idx).float()
            stats.update(x, *sae(x))
    return stats.fire_count, stats.n


def expected_idle(counts: torch.Tensor, n: int, window: int) -> float:
    """The share of latents idle over a random `window` of tokens if each fires independently at its
    rate counts / n (Poisson): mean of exp(-window x rate)."""
    return float(torch.exp(-window * counts.double() / n).mean())


def rate_quantiles(counts: torch.Tensor, quantiles: tuple[float, ...] = (0.05, 0.5)) -> list[float]:
    """The firing rate at each quantile of the latents, over the mean of the counted rates."""
    rates = counts.double()
    return torch.quantile(rates / rates.mean(), torch.tensor(quantiles, dtype=torch.float64)).tolist()


def idle_over_draws(sae: Sae, shards: ShardSet, held_out: int, window: int, draws: int, seed: int = 1) -> list[float]:
    """The share of latents that never fire on each of `draws` random samples of `window` training
    tokens (BOS left out), drawn from the whole training split as the training's batches are."""
    gen, bos = torch.Generator().manual_seed(seed), shards.manifest.bos_token_id
    shares = []
    for _ in range(draws):
        idx = torch.randperm(held_out, generator=gen)[: 2 * window]
        idx = idx[shards.tokens_at(idx) != bos][:window]
        stats = StreamingReconstructionStats(sae.d_in, sae.d_sae)
        with torch.no_grad():
            for chunk in idx.split(4096):
                x = shards.gather(chunk).float()
                stats.update(x, *sae(x))
        shares.append(float((stats.fire_count == 0).float().mean()))
    return shares


def _dictionaries(root: Path, hook: str, names: list[str]) -> dict[str, Path]:
    found = {d.name: d for d in sorted((root / "sae" / hook).glob("*")) + sorted((root / "peers").glob("*"))}
    found = {name: d for name, d in found.items() if (d / "sae.safetensors").exists()}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"no dictionary {missing} under {root}; known: {sorted(found)}")
    return {n: found[n] for n in names} if names else found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="dictionaries (directory names); none: all")
    parser.add_argument("--out", default="outputs/bench-quality", help="the sweep's output directory")
    parser.add_argument("--hook", default="blocks.9.resid_post")
    parser.add_argument("--span", type=int, default=300_000, help="training tokens counted before the held-out split")
    parser.add_argument("--draws", type=int, default=0, help="random draws of --window training tokens")
    parser.add_argument("--window", type=int, default=10_240, help="tokens per draw")
    args = parser.parse_args()
    run = RunDir(args.out)
    shards = ShardSet(run.activations(args.hook))
    held_out = heldout_start(shards.n_tokens, shards.manifest.context_length, TrainConfig().holdout_tokens)
    start = max(0, held_out - args.span)
    print(f"| dictionary | k | d_sae | expected firings | never | ≤ 10 | ≤ 30 | rate / mean at 5 % / 50 % "
          f"| Poisson idle over {args.window} |\n|---|---|---|---|---|---|---|---|---|")
    for name, directory in _dictionaries(run.root, args.hook, args.names).items():
        sae = Sae.load(directory)
        counts, n = firing_counts(sae, shards, start)
        cells = [f"{float((counts <= limit).float().mean()) * 100:.2f} %" for limit in (0, 10, 30)]
        low, median = rate_quantiles(counts)
        cells += [f"{low:.2f} / {median:.2f}", f"{expected_idle(counts, n, args.window) * 100:.2f} %"]
        print(f"| {name} | {sae.cfg.k} | {sae.d_sae} | {n * sae.cfg.k // sae.d_sae} | " + " | ".join(cells) + " |")
        if args.draws:
            idle = idle_over_draws(sae, shards, held_out, args.window, args.draws)
            print(f"  {name}: idle over {args.draws} random draws of {args.window} training tokens: "
                  + ", ".join(f"{share * 100:.2f} %" for share in idle))  # fmt: skip


if __name__ == "__main__":
    main()
