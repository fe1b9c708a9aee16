"""Transcoders of an MLP against sparsify's transcoder recipe on the same batches, and against an SAE of
the MLP's output, all spliced into the model by the evaluate stage (run in the benchmark venv, where
sparsify is installed: `.bench-venv/bin/python bench/bench_transcoders.py`, after `make transcoders`).

    ours        the train stage's transcoder and skip transcoder (sae=transcoder, sae.skip=true)
    sparsify    sparsify 1.3's recipe with transcode=true (and skip_connection): SignSGD under
                ScheduleFreeWrapper (momentum 0.95) at lr 5e-3 / sqrt(d_sae / 2^14), W_dec zero at
                init and not normalized, b_enc centring the mean input and b_dec at the mean output of
                the first batch (as its trainer does), no AuxK (auxk_alpha 0, its default)
    SAE         the run's TopK SAE of the MLP's output, if trained (`make transcoders` trains one)
The peers see exactly the train stage's batches (pairs of input and output activations of the same
tokens, same order, same step count, raw activations as sparsify trains on them). Every dictionary is
measured the same way: held-out FVU of the MLP output and silent fraction on the train stage's held-out
split, dead fraction over its dead window, and the evaluate stage's CE loss recovered and KL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_model import default_model  # noqa: E402
from quality_sweep import batches_key, dead_fraction, sparsify_optimizer  # noqa: E402  (bench/: the peer recipe, one definition)

from pipeline.rundir import RunDir  # noqa: E402
from pipeline.sae import Sae, SaeConfig  # noqa: E402
from pipeline.stages.evaluate import EvaluateConfig, evaluate_saes  # noqa: E402
from pipeline.stages.train import train_saes  # noqa: E402
from pipeline.tracking import WandbConfig  # noqa: E402
from pipeline.training import TrainConfig, heldout_metrics, training_positions  # noqa: E402
from pipeline.training_plan import plan_training  # noqa: E402

OFF = WandbConfig(mode="disabled")
MODEL = default_model()


def _pairs(plan):
    """The train stage's global batches as fp32 (input [batch, d], output [batch, d]) pairs, in its order."""
    inputs, outputs = plan.stored[plan.cfg.hook], plan.stored[plan.cfg.hook_out]
    positions = training_positions(inputs, plan.cfg, plan.n_train, plan.per_epoch, 0, plan.keep)
    for _ in range(plan.total_steps):
        idx = next(positions)
        yield inputs.gather(idx).float(), outputs.gather(idx).float()


def train_sparsify(plan, k: int, expansion: int, skip: bool, out: Path) -> float:
    """sparsify's transcoder recipe on the plan's batches; saves `out`; returns the dead fraction."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    config = SparseCoderConfig(expansion_factor=expansion, k=k, transcode=True, skip_connection=skip)
    sp = SparseCoder(plan.shards.d_model, config, device="cpu")
    opt = sparsify_optimizer(sp)
    since_fired = torch.zeros(sp.num_latents, dtype=torch.long)
    for step, (x, y) in enumerate(_pairs(plan)):
        if step == 0:
            sp.encoder.bias.data = -x.mean(0) @ sp.encoder.weight.data.T
            sp.b_dec.data = y.mean(0)
        result = sp(x, y)
        result.fvu.backward()
        opt.step()
        opt.zero_grad()
        since_fired += len(x)
        since_fired[result.latent_indices.flatten()] = 0
    opt.eval()  # schedule-free: the averaged weights are the trained ones
    sp.save_to_disk(out)
    return dead_fraction(since_fired, plan, k)


def _as_run_dictionary(directory: Path, run: RunDir, name: str, dead: float, plan) -> Path:
    """A sparsify transcoder saved into the run as one of its dictionaries (for the evaluate stage)."""
    sae = Sae.load(directory)
    metrics = heldout_metrics(sae, plan.stored[plan.cfg.hook], plan.n_train, plan.cfg.exclude_bos,
                              target=plan.stored[plan.cfg.hook_out])  # fmt: skip
    sae.meta.update(model_id=plan.shards.manifest.model_id, hook=plan.cfg.hook, hook_out=plan.cfg.hook_out,
                    training_split_tokens=plan.n_train, metrics={**metrics, "dead_fraction": dead},
                    batches=batches_key(plan))  # fmt: skip
    return sae.save(run.sae(plan.cfg.hook, name))


def _trained_on(directory: Path, plan) -> bool:
    """Whether a peer's dictionary there was trained on the plan's activations and batches."""
    config = directory / "cfg.json"
    return config.exists() and json.loads(config.read_text()).get("batches") == batches_key(plan)


def _row(name: str, report: dict, directory: Path) -> dict:
    m, trained = report["metrics"], json.loads((directory / "cfg.json").read_text())["metrics"]
    return {"dictionary": name, "hook": report["hook"] + (f" -> {report['hook_out']}" if "hook_out" in report else ""),
            "l0": m["sparsity"]["l0"], "fvu": trained["fvu"], "dead": trained["dead_fraction"],
            "silent": trained["silent_fraction"], "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
            "kl": m["model_behavior_preservation"]["kl_div_with_sae"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="outputs/transcoders", help="a run with the MLP's input and output harvested")
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: the train stage's 2 epochs)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    hook, hook_out = f"blocks.{args.layer}.mlp_in", f"blocks.{args.layer}.mlp_out"
    cfg = TrainConfig(hook=hook, hook_out=hook_out, tokens=args.tokens, progress=False, variants=[{}, {"skip": True}])
    sae_cfg = SaeConfig(architecture="transcoder", k=args.k, expansion=args.expansion)
    ours = train_saes(cfg, sae_cfg, run.root, OFF)
    plan = plan_training(cfg, sae_cfg, run)
    dictionaries = dict(ours)
    for skip in (False, True):
        name = f"sparsify-transcoder{'-skip' if skip else ''}-k{args.k}-x{args.expansion}"
        peer = run.root / "peers" / name / f"layers.{args.layer}.mlp"  # sparsify's own layout
        if not _trained_on(run.sae(hook, name), plan):  # by an earlier run of this benchmark
            dead = train_sparsify(plan, args.k, args.expansion, skip, peer)
            _as_run_dictionary(peer, run, name, dead, plan)
        dictionaries[name] = run.sae(hook, name)
    sae_of_output = run.sae(hook_out, SaeConfig(k=args.k, expansion=args.expansion).default_name())
    if (sae_of_output / "cfg.json").exists():
        dictionaries["SAE of the output"] = sae_of_output
    reports = evaluate_saes(MODEL, EvaluateConfig(saes=[str(d) for d in dictionaries.values()],
                                                  tokens=args.eval_tokens, progress=False), run.root, OFF)  # fmt: skip
    rows = []
    for name, directory in dictionaries.items():
        report = next(r for r in reports.values() if Path(r["sae_dir"]) == Path(directory))
        rows.append(_row(name, report, Path(directory)))
    (run.root / "bench-transcoders.json").write_text(json.dumps(rows, indent=2))
    print("| dictionary | reads -> predicts | L0 | held-out FVU | dead | silent | CE loss recovered | KL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dictionary']} | {r['hook']} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['dead']:.2%} | "
              f"{r['silent']:.2%} | {r['ce_loss_score']:.4f} | {r['kl']:.4f} |")


if __name__ == "__main__":
    main()
