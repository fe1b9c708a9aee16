"""TopK SAE training throughput: this project against a plain dense PyTorch step, SAELens and sparsify.

    make bench                 (or: python bench/bench_train.py --peer-python .bench-venv/bin/python)

Same synthetic data, d_in 576, 16x = 9216 latents, k 32, batch 4096, Adam, fp32 and bf16 autocast;
each library with its default learning rate (this project: its train-stage recipe). Prints tokens/s, ratios, the fraction of this machine's
measured matmul peak (counting the dense encoder forward, 2 * d_in * d_sae FLOP per token), and the
held-out FVU after the same number of training tokens. In fp32, also this project's BatchTopK and
Matryoshka BatchTopK steps of the same size (their `ours/it` column: TopK's speed over theirs).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from synthetic import BATCH, D_IN, D_SAE, K, heldout_fvu, synthetic_activations

from pipeline.metrics import token_variance
from pipeline.models import cpu_has_native_bf16
from pipeline.optim import lr_multiplier
from pipeline.sae import SaeConfig, build_sae
from pipeline.training import Dist, TrainConfig, TrainingMember, make_step

ENCODER_FLOP_PER_TOKEN = 2 * D_IN * D_SAE


def matmul_peak(dtype: torch.dtype) -> float:
    """Measured FLOP/s of the encoder-shaped matmul [4096, 576] x [576, 9216]."""
    a, b = torch.randn(BATCH, D_IN, dtype=dtype), torch.randn(D_IN, D_SAE, dtype=dtype)
    a @ b
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return n * BATCH * ENCODER_FLOP_PER_TOKEN / (time.perf_counter() - start)


def _recipe(data, steps):
    """This project's training recipe: inputs scaled to E||x||^2 = d_in, lr warm-up and decay."""
    scale = float((D_IN / data[:BATCH].pow(2).sum(1).mean()).sqrt())
    cfg = TrainConfig(optimizer="adam")  # the peers' optimizer, so that the steps compare
    lr = cfg.learning_rate(D_SAE)
    return (
        scale,
        lambda i: lr * lr_multiplier(i, steps, cfg.lr_warmup_steps, cfg.schedule(), cfg.lr_decay_start),
    )


def ours(data, autocast_name, steps, architecture="topk"):
    cfg = TrainConfig(
        optimizer="adam", autocast=autocast_name, dead_tokens=10**12, device="cpu"
    )  # no dead latents, as for the peers
    scale, lr_at = _recipe(data, steps)
    sae = build_sae(SaeConfig(architecture=architecture, expansion=D_SAE // D_IN, k=K), D_IN)
    sae.init_from_data(data[:BATCH] * scale)
    member = TrainingMember(sae, replace(cfg, lr=lr_at(0)))
    step = make_step(member, cfg, Dist(), torch.device("cpu"))

    def train_step(i, x):
        member.opt.param_groups[0]["lr"] = lr_at(i)
        x = x * scale
        step(x, token_variance(x), 1.0)

    def finish():
        """The reconstruction of the trained dictionary, BatchTopK's threshold set on its final
        weights first (as the train stage does when it saves; a no-op for TopK)."""
        sae.calibrate(data[-4 * BATCH :] * scale, BATCH)
        return lambda x: sae(x * scale).x_hat / scale

    return train_step, finish


def naive(data, autocast_name, steps):
    """A plain dense PyTorch TopK step (same recipe): dense codes, dense decoder, autograd everywhere."""
    scale, lr_at = _recipe(data, steps)
    sae = build_sae(SaeConfig(architecture="topk", expansion=D_SAE // D_IN, k=K), D_IN)
    sae.init_from_data(data[:BATCH] * scale)
    opt = torch.optim.Adam(sae.parameters(), lr=lr_at(0))
    ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast_name == "bfloat16" else nullcontext
    )

    def step(i, x):
        opt.param_groups[0]["lr"] = lr_at(i)
        x = x * scale
        with ctx():
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            values, idx = pre.topk(K, dim=1)
            z = torch.zeros_like(pre).scatter(1, idx, values.relu())
            loss = (z @ sae.W_dec + sae.b_dec - x).pow(2).sum(1).mean() / token_variance(x)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()

    return step, lambda: lambda x: sae(x * scale).x_hat / scale


def measure(make, data, heldout, dtype, steps, warmup) -> dict:
    torch.manual_seed(0)
    step, finish = make(data, dtype, steps)
    for i in range(steps):
        if i == warmup:
            start = time.perf_counter()
        step(i, data[i * BATCH : (i + 1) * BATCH])
    tok_s = BATCH * (steps - warmup) / (time.perf_counter() - start)
    return {"tokens_per_s": tok_s, "fvu": heldout_fvu(finish(), heldout)}


def peer_rows(
    peer_python: str, steps: int, warmup: int, dtypes: tuple[str, ...]
) -> dict[tuple[str, str], dict]:
    """The peers' rows {(impl, dtype): row}, measured by peers_train.py in the venv of `peer_python`."""
    peers = subprocess.run(
        [
            peer_python,
            str(Path(__file__).with_name("peers_train.py")),
            f"--steps={steps}",
            f"--warmup={warmup}",
            f"--dtypes={','.join(dtypes)}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if peers.returncode:
        print(f"peer benchmark failed:\n{peers.stderr[-2000:]}", file=sys.stderr)
    # the libraries print notices of their own; the rows are the JSON lines
    rows = (json.loads(line) for line in peers.stdout.splitlines() if line.startswith("{"))
    return {(row["impl"], row["dtype"]): row for row in rows}


def print_table(
    results: dict[tuple[str, str], dict], dtypes: tuple[str, ...], steps: int, warmup: int
) -> None:
    peaks = {dtype: matmul_peak(getattr(torch, dtype)) for dtype in dtypes}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if len(dtypes) == 1:
        print("bf16 rows left out: this CPU has no native bf16 (pipeline.models.cpu_has_native_bf16)")
    print(
        f"TopK d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, Adam, {steps} steps ({steps - warmup} timed)"
    )
    print("matmul peak: " + ", ".join(f"{dtype} {peak / 1e9:.0f} GFLOP/s" for dtype, peak in peaks.items()))
    width = max(len(impl) for impl, _ in results)
    for dtype in dtypes:
        mine = results[("this project", dtype)]["tokens_per_s"]
        print(f"\n{dtype:{width}} {'tokens/s':>10} {'ours/it':>8} {'% peak':>7} {'held-out FVU':>13}")
        for (impl, d), row in results.items():
            if d != dtype:
                continue
            peak = row["tokens_per_s"] * ENCODER_FLOP_PER_TOKEN / peaks[dtype]
            print(
                f"{impl:{width}} {row['tokens_per_s']:>10,.0f} {mine / row['tokens_per_s']:>8.2f} {100 * peak:>6.0f}% {row['fvu']:>13.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="training steps per run (the first --warmup untimed)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peer-python", help="python of a venv with sae-lens and eai-sparsify installed")
    args = parser.parse_args()
    if args.peer_python and not Path(args.peer_python).exists():
        parser.error(
            f"--peer-python {args.peer_python} does not exist: `make .bench-venv/bin/python` builds the peers' venv"
        )

    data = synthetic_activations(BATCH * args.steps)
    heldout = synthetic_activations(8192, seed=1)
    # bf16 autocast only where the CPU multiplies bf16 natively: elsewhere a bf16 matmul runs ~100x slower
    dtypes = ("float32", "bfloat16") if cpu_has_native_bf16() else ("float32",)
    results = {}
    for dtype in dtypes:
        results[("this project", dtype)] = measure(ours, data, heldout, dtype, args.steps, args.warmup)
        results[("plain dense PyTorch", dtype)] = measure(
            naive, data, heldout, dtype, args.steps, args.warmup
        )
    for arch in ("batchtopk", "matryoshka_batchtopk"):
        results[(f"this project, {arch}", "float32")] = measure(
            partial(ours, architecture=arch), data, heldout, "float32", args.steps, args.warmup
        )
    if args.peer_python:
        results.update(peer_rows(args.peer_python, args.steps, args.warmup, dtypes))
    print_table(results, dtypes, args.steps, args.warmup)


if __name__ == "__main__":
    main()
