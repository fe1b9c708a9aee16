"""TopK training throughput and quality of SAELens and EleutherAI sparsify (run by bench_train.py in
the benchmark venv, where both are installed). Prints one JSON line per (library, dtype)."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from synthetic import BATCH, D_IN, D_SAE, K, heldout_fvu, synthetic_activations


def run_saelens(data, heldout, steps, autocast):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)  # SAELens' default learning rate

    def step(i, x):
        with autocast():
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients={},
                    dead_neuron_mask=None,
                    n_training_steps=i,
                    is_logging_step=False,
                )
            )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda x: sae(x)


def run_sparsify(data, heldout, steps, autocast):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(
        D_IN, SparseCoderConfig(expansion_factor=D_SAE // D_IN, k=K), device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        sae.b_dec.copy_(data[:BATCH].mean(0))  # sparsify's trainer starts b_dec at the first batch's mean
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (D_SAE / 2**14) ** 0.5)  # sparsify's lr scaling

    def step(i, x):
        with autocast():
            out = sae(x)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step, lambda x: sae(x).sae_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = synthetic_activations(BATCH * args.steps)
    heldout = synthetic_activations(8192, seed=1)
    for name, make in [("sae-lens", run_saelens), ("sparsify", run_sparsify)]:
        for dtype in args.dtypes.split(","):

            def autocast(dtype=dtype):
                return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

            torch.manual_seed(0)
            step, reconstruct = make(data, heldout, args.steps, autocast)
            for i in range(args.steps):
                if i == args.warmup:
                    start = time.perf_counter()
                step(i, data[i * BATCH : (i + 1) * BATCH])
            tok_s = BATCH * (args.steps - args.warmup) / (time.perf_counter() - start)
            print(
                json.dumps(
                    {
                        "impl": name,
                        "dtype": dtype,
                        "tokens_per_s": tok_s,
                        "fvu": heldout_fvu(reconstruct, heldout),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
