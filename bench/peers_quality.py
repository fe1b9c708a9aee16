"""Quality of SAELens' and sparsify's TopK modules, with each library's defaults, on this project's
harvested shards and training budget (run in the benchmark venv by `make bench-quality`).

Same data order, held-out split and FVU definition as the train stage; Adam for both (SAELens'
default optimizer; sparsify's default Signum schedule is not reproduced here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.shards import ShardSet  # noqa: E402
from pipeline.splits import heldout_start  # noqa: E402
from pipeline.training import TrainConfig, heldout_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", default="outputs/default/activations/blocks.9.resid_post")
    parser.add_argument("--tokens", type=int, default=844_000)
    args = parser.parse_args()
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    from sparsify import SparseCoder, SparseCoderConfig

    shards = ShardSet(args.shards)
    cfg = TrainConfig()
    n_train = heldout_start(shards.n_tokens, shards.manifest.context_length, cfg.holdout_tokens)
    d_in, d_sae, k = shards.d_model, 16 * shards.d_model, 32
    steps = args.tokens // cfg.batch_size

    def batches():
        epoch = 0
        while True:
            yield from shards.iter_batches(cfg.batch_size, seed=epoch, exclude_bos=True, stop=n_train)
            epoch += 1

    class Wrapped(torch.nn.Module):
        """Adapts a peer SAE to heldout_metrics' (x_hat, codes) interface."""

        def __init__(self, forward):
            super().__init__()
            self.forward_fn, self.d_in, self.d_sae = forward, d_in, d_sae
            self.W_enc = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.forward_fn(x)

    torch.manual_seed(0)
    lens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(lens.parameters(), lr=3e-4)
    for step, x in zip(range(steps), batches(), strict=False):
        out = lens.training_forward_pass(
            TrainStepInput(
                sae_in=x.float(),
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    lens_metrics = heldout_metrics(Wrapped(lambda x: (lens(x), lens.encode(x))), shards, n_train, True)
    print(json.dumps({"impl": "sae-lens (defaults, Adam 3e-4)", **lens_metrics}), flush=True)

    torch.manual_seed(0)
    sp = SparseCoder(d_in, SparseCoderConfig(expansion_factor=16, k=k), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sp.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    for step, x in zip(range(steps), batches(), strict=False):
        x = x.float()
        if step == 0:
            with torch.no_grad():
                sp.b_dec.copy_(x.mean(0))
        out = sp(x, dead_mask=since_fired >= 10_000_000)  # sparsify's default dead window (10M tokens)
        (out.fvu + out.auxk_loss / 32).backward()
        sp.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sp.set_decoder_norm_to_unit_norm()
        since_fired += len(x)
        since_fired[out.latent_indices.flatten()] = 0

    def sp_forward(x):
        acts, idx, _ = sp.encode(x)
        codes = torch.zeros(len(x), d_sae).scatter_(1, idx, acts)
        return sp.decode(acts, idx), codes

    sp_metrics = heldout_metrics(Wrapped(sp_forward), shards, n_train, True)
    print(json.dumps({"impl": "sparsify (Adam, its lr scaling)", **sp_metrics}), flush=True)


if __name__ == "__main__":
    main()
