"""Dictionary quality over a sweep of k and width: this project's defaults against its peers'
default recipes, on the same harvested shards, batches and budget (`make bench-quality`, run in the
benchmark venv where sparsify and SAELens are installed).

For every k in --ks and expansion in --expansions, at --tokens training tokens:
  ours       the train stage with `sae=topk` and every other setting at its default (TopK, the
             default architecture until 2026-11-28)
  ours-alt   the same with the other optimizer (--alt-optimizer)
  ours-btk   the train stage with its defaults (`sae=batchtopk`: the top k * batch codes of the whole
             batch in training, balanced by the latents' firing rates where d_sae / k >= 400, and
             thresholds set on the final weights at inference)
  sparsify   sparsify 1.3's default recipe: SparseCoder, ScheduleFreeWrapper(SignSGD, momentum 0.95)
             at lr 5e-3 / sqrt(d_sae / 2^14), b_dec at the first batch's mean, no AuxK (auxk_alpha 0),
             decoder rows renormalized and their parallel gradient removed every step
  saelens    SAELens' TopKTrainingSAE with its defaults (Adam 3e-4, b_dec 0, no input normalization)
The peers see exactly the train stage's batches (same order, BOS excluded, same step count).
Every dictionary is then measured the same way: held-out FVU and silent fraction on the train
stage's held-out split, dead fraction over the train stage's dead window (the last `dead_tokens`
training tokens), and CE loss recovered from the evaluate stage on the same held-out windows.
Prints the table, writes <out>/results.json and <out>/pareto.png.

Resumable and splittable: every measured row is appended to <out>/rows.jsonl and peers found there,
trained on the same activations, split and batches, are not trained again (this project's
dictionaries are kept by the train stage itself), so parts of the sweep can run in separate
processes with --skip-ce and `--report` then adds CE loss recovered, the table and the plot for
every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_model import default_model  # noqa: E402

from pipeline.plots import pareto_plot  # noqa: E402
from pipeline.rundir import RunDir, config_hash  # noqa: E402
from pipeline.sae import Sae, SaeConfig  # noqa: E402
from pipeline.stages.evaluate import EvaluateConfig, evaluate_saes  # noqa: E402
from pipeline.stages.train import train_saes  # noqa: E402
from pipeline.tracking import WandbConfig  # noqa: E402
from pipeline.training import TrainConfig, heldout_metrics, training_batches  # noqa: E402
from pipeline.training_plan import data_identity, plan_training  # noqa: E402

OFF = WandbConfig(mode="disabled")


def _batches(plan):
    """The train stage's global batches, in its order, as fp32 [batch, d_in]."""
    batches = training_batches(plan.shards, plan.cfg, plan.n_train, plan.per_epoch, 0)
    for _ in range(plan.total_steps):
        yield next(batches).float()


def dead_fraction(since_fired: torch.Tensor, plan, k: int) -> float:
    """The share of latents idle over the dead window the train stage gives a dictionary of this
    width and k (its last `dead_tokens` tokens)."""
    return float((since_fired >= plan.cfg.dead_window(len(since_fired), k)).float().mean())


def sparsify_optimizer(sp):
    """sparsify 1.3's default optimizer for SparseCoder `sp`, in train mode: SignSGD under
    ScheduleFreeWrapper (momentum 0.95) at lr 5e-3 / sqrt(d_sae / 2^14)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    opt = ScheduleFreeWrapper(SignSGD([{"params": sp.parameters(), "lr": 5e-3 / (sp.num_latents / 2**14) ** 0.5}]),
                              momentum=0.95)  # fmt: skip
    opt.train()
    return opt


def train_sparsify(plan, k: int, expansion: int, out: Path) -> float:
    """sparsify's default recipe on the plan's batches; saves `out`; returns the dead fraction."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sp = SparseCoder(plan.shards.d_model, SparseCoderConfig(expansion_factor=expansion, k=k), device="cpu")
    opt = sparsify_optimizer(sp)
    since_fired = torch.zeros(sp.num_latents, dtype=torch.long)
    for step, x in enumerate(_batches(plan)):
        if step == 0:
            sp.b_dec.data = x.mean(0)
        sp.set_decoder_norm_to_unit_norm()
        result = sp(x)
        result.fvu.backward()
        sp.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired += len(x)
        since_fired[result.latent_indices.flatten()] = 0
    opt.eval()  # schedule-free: the averaged weights are the trained ones
    sp.save_to_disk(out)
    return dead_fraction(since_fired, plan, k)


def train_saelens(plan, k: int, expansion: int, out: Path) -> float:
    """SAELens' TopK training SAE with its defaults on the plan's batches; saves `out`."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    d_in = plan.shards.d_model
    lens = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=d_in, d_sae=expansion * d_in, k=k, dtype="float32", device="cpu")
    )
    opt = torch.optim.Adam(lens.parameters(), lr=3e-4)
    since_fired = torch.zeros(expansion * d_in, dtype=torch.long)
    for step, x in enumerate(_batches(plan)):
        result = lens.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=step,
                           is_logging_step=False)
        )  # fmt: skip
        result.loss.backward()
        opt.step()
        opt.zero_grad()
        since_fired += len(x)
        since_fired[(result.feature_acts > 0).any(0)] = 0
    lens.save_inference_model(out)
    return dead_fraction(since_fired, plan, k)


def train_ours(
    run: RunDir, hook: str, ks: list[int], expansion: int, tokens: int, optimizer: str | None,
    architecture: str = "topk",
) -> dict[int, Path]:  # fmt: skip
    """The train stage, every k in one pass; {k: dictionary directory}."""
    extra = {"optimizer": optimizer} if optimizer else {}
    cfg = TrainConfig(hook=hook, tokens=tokens, progress=False, variants=[{"k": k} for k in ks], **extra)
    saved = train_saes(cfg, SaeConfig(expansion=expansion, architecture=architecture), run.root, OFF)
    names = {k: SaeConfig(k=k, expansion=expansion, architecture=architecture).default_name() for k in ks}
    return {k: saved[name] for k, name in names.items()}


def measure(directory: Path, plan) -> dict:
    """Held-out FVU, L0 and silent fraction, as the train stage measures them."""
    sae = Sae.load(directory)
    return heldout_metrics(sae, plan.shards, plan.n_train, plan.cfg.exclude_bos)


def _cached_rows(run: RunDir) -> dict[tuple, dict]:
    """Rows measured by earlier (interrupted or split) runs of this benchmark, the last per point."""
    path = run.root / "rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {(r["method"], r["k"], r["expansion"]): r for r in rows}


def batches_key(plan) -> str:
    """What a peer's training depends on besides its method, k and width: the activations, the split
    and the batches. A peer's row measured under another key is trained again, not reused."""
    return config_hash({"data": data_identity(plan.stored, plan.stream), "n_train": plan.n_train,
                        "steps": plan.total_steps, "batch_size": plan.cfg.batch_size, "seed": plan.cfg.seed})  # fmt: skip


def _sweep_point(args, run: RunDir, plan, k: int, expansion: int, ours: dict) -> list[dict]:
    rows, cached, key = [], _cached_rows(run), batches_key(plan)
    for method in args.methods:
        earlier = cached.get((method, k, expansion))
        if method in ("sparsify", "saelens") and earlier is not None and earlier.get("batches") == key:
            rows.append(earlier)
            continue
        started = time.perf_counter()
        out = run.root / "peers" / f"{method}-k{k}-x{expansion}"
        if method in ours:
            out = ours[method][k]
            dead = json.loads((out / "cfg.json").read_text())["metrics"]["dead_fraction"]
        elif method == "sparsify":
            dead = train_sparsify(plan, k, expansion, out)
        else:
            dead = train_saelens(plan, k, expansion, out)
        row = {"method": method, "k": k, "expansion": expansion, "dir": str(out), "dead_fraction": dead,
               **measure(out, plan), "train_seconds": round(time.perf_counter() - started), "batches": key}  # fmt: skip
        print(json.dumps(row), flush=True)
        with open(run.root / "rows.jsonl", "a") as cache:
            cache.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def ce_recovered(rows: list[dict], run: RunDir, hook: str, eval_tokens: int) -> None:
    """Add the evaluate stage's CE loss recovered and KL of every dictionary to its row."""
    cfg = EvaluateConfig(
        saes=[r["dir"] for r in rows], hook=hook, force=True, tokens=eval_tokens, progress=False
    )
    reports = evaluate_saes(default_model(), cfg, run.root, OFF)
    for row in rows:
        metrics = reports[f"{hook}/{Path(row['dir']).name}"]["metrics"]
        row["ce_loss_score"] = metrics["model_performance_preservation"]["ce_loss_score"]
        row["kl_div_with_sae"] = metrics["model_behavior_preservation"]["kl_div_with_sae"]


def table(rows: list[dict], methods: list[str]) -> str:
    lines = ["| width | k | " + " | ".join(f"{m}: FVU / dead / silent / CE rec." for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]  # fmt: skip
    for x, k in sorted({(r["expansion"], r["k"]) for r in rows}):
        cells = []
        for m in methods:
            r = next((r for r in rows if (r["method"], r["k"], r["expansion"]) == (m, k, x)), None)
            if r is None:
                cells.append("not run")
                continue
            cells.append(f"{r['fvu']:.4f} / {r['dead_fraction']:.2%} / {r['silent_fraction']:.2%} / "
                         f"{r.get('ce_loss_score', float('nan')):.4f}")  # fmt: skip
        lines.append(f"| {x}x | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="outputs/default", help="run directory holding the activations")
    parser.add_argument("--out", default="outputs/bench-quality", help="where dictionaries and results go")
    parser.add_argument("--hook", default="blocks.9.resid_post")
    parser.add_argument("--tokens", type=int, default=844_000)
    parser.add_argument("--ks", default="16,32,64")
    parser.add_argument("--expansions", default="8,16,32")
    parser.add_argument("--methods", default="ours,ours-btk,ours-alt,sparsify,saelens")
    parser.add_argument("--alt-optimizer", default="adam", help="the optimizer of the ours-alt rows")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument(
        "--skip-ce", action="store_true", help="train and measure only (for runs split over processes)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: CE, table and plot of every row in <out>/rows.jsonl",
    )
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    args.ks = [int(k) for k in args.ks.split(",")]
    args.expansions = [int(x) for x in args.expansions.split(",")]
    return args


def _link_activations(run: RunDir, source: RunDir, hook: str) -> None:
    """Let `run` read `source`'s activations of `hook` (a symlink, re-pointed when `source` changes;
    the train stage and `batches_key` then train every dictionary again on the new activations)."""
    link, target = run.activations(hook), source.activations(hook).resolve()
    if link.is_symlink() and link.resolve() != target:
        print(f"{run.root} read the activations of {link.resolve()}; now {target}", flush=True)
        link.unlink()
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)


def _train_rows(args, run: RunDir) -> list[dict]:
    """Train and measure every method at every point of the sweep."""
    rows = []
    for expansion in args.expansions:
        ours = {}
        if "ours" in args.methods:
            ours["ours"] = train_ours(run, args.hook, args.ks, expansion, args.tokens, None)
        if "ours-alt" in args.methods:
            alt = RunDir(run.root / f"alt-{args.alt_optimizer}")
            _link_activations(alt, run, args.hook)
            ours["ours-alt"] = train_ours(alt, args.hook, args.ks, expansion, args.tokens, args.alt_optimizer)
        if "ours-btk" in args.methods:
            ours["ours-btk"] = train_ours(run, args.hook, args.ks, expansion, args.tokens, None, "batchtopk")
        for k in args.ks:
            plan = plan_training(
                TrainConfig(hook=args.hook, tokens=args.tokens), SaeConfig(k=k, expansion=expansion), run
            )
            rows.extend(_sweep_point(args, run, plan, k, expansion, ours))
    return rows


def main() -> None:
    args = _arguments()
    run = RunDir(args.out)
    _link_activations(run, RunDir(args.run_dir), args.hook)
    rows = list(_cached_rows(run).values()) if args.report else _train_rows(args, run)
    if args.skip_ce:
        return
    ce_recovered(rows, run, args.hook, args.eval_tokens)
    (run.root / "results.json").write_text(json.dumps(rows, indent=2))
    pareto_plot([{"label": f"{r['method']} k{r['k']} x{r['expansion']}", "l0": r["l0"], "fvu": r["fvu"],
                  "ce_loss_score": r["ce_loss_score"]} for r in rows], run.root / "pareto.png")  # fmt: skip
    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    print(table(rows, methods))


if __name__ == "__main__":
    main()
