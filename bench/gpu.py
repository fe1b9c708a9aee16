"""The GPU path, measured on one GPU in minutes and offline (bench/gpu.sh runs it on a bare machine).

    python bench/gpu.py                      (needs CUDA; sparsify is measured where installed)

1. The TopK training step at d_in 2304 (Gemma-2-2B's width), 65,536 latents, k 64, bf16 autocast,
   batch 8192, on synthetic activations: tokens/s of this project's step (Signum, the default, and
   Adam) and of sparsify 1.3's (SparseCoder with its schedule-free SignSGD) on the same data
   (target: >= 1.4x sparsify).
2. A Llama-3.2-1B-shaped model built from its config with random weights (nothing is downloaded) and a
   tokenizer trained here on the embedded pydoc corpus; the embedded standard-library source corpus
   (large enough that the stream continues after the harvested windows); hook blocks.8.resid_post:
   harvest / the bare truncated forward (target >= 0.9), training from the model / the bare forward,
   evaluate / the bare forward to logits. Beside harvest, a diagnostic: its shard writers alone on
   synthetic shards of its shape, with the default threads and with twice as many (the ceiling that
   hashing and the disk put on harvest).
Prints one table; --json writes the figures. `--smoke` runs the same code at toy sizes on the CPU
(a check of the script before GPU time is spent on it; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_evaluate import bare_forward as bare_logits_forward
from bench_harvest import bare_forward
from bench_stream import timed_training
from synthetic import synthetic_activations

from pipeline.corpus import CorpusConfig, pydoc_documents
from pipeline.harvesting import HarvestConfig, harvest_activations
from pipeline.hooks import validate_hooks
from pipeline.metrics import token_variance
from pipeline.models import ModelConfig, load_model
from pipeline.sae import SaeConfig, build_sae
from pipeline.shards import ShardSet, ShardWriter, default_writer_threads, shard_name
from pipeline.stages.evaluate import EvaluateConfig, evaluate_saes
from pipeline.streaming import ModelSource
from pipeline.tracking import WandbConfig
from pipeline.training import Dist, TrainConfig, TrainingMember, make_step

HOOK = "blocks.8.resid_post"
CORPUS = CorpusConfig(name="stdlib_source", source="stdlib_source")


@dataclass(frozen=True)
class Sizes:
    device: str
    d_in: int
    latents: int
    k: int
    batch: int
    model: dict  # LlamaConfig fields
    vocab: int  # the tokenizer's


FULL = Sizes("cuda", 2304, 65_536, 64, 8192, {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128_256}, 16_384)  # fmt: skip
SMOKE = Sizes("cpu", 64, 512, 8, 256, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 10,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048}, 1024)  # fmt: skip


def synchronize(sizes: Sizes) -> None:
    if sizes.device == "cuda":
        torch.cuda.synchronize()


def tokens_per_s(step, data: torch.Tensor, sizes: Sizes, warmup: int = 5) -> float:
    steps = len(data) // sizes.batch
    for i in range(steps):
        if i == warmup:
            synchronize(sizes)
            start = time.perf_counter()
        step(data[i * sizes.batch : (i + 1) * sizes.batch])
    synchronize(sizes)
    return sizes.batch * (steps - warmup) / (time.perf_counter() - start)


def ours(sizes: Sizes, optimizer: str):
    cfg = TrainConfig(optimizer=optimizer, autocast="bfloat16", device=sizes.device, dead_tokens=10**12)
    sae = build_sae(SaeConfig(architecture="topk", d_sae=sizes.latents, k=sizes.k), sizes.d_in).to(sizes.device)
    step = make_step(TrainingMember(sae, cfg), cfg, Dist(), torch.device(sizes.device))
    return lambda x: step(x, token_variance(x), 1.0)


def sparsify(sizes: Sizes):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sp = SparseCoder(sizes.d_in, SparseCoderConfig(num_latents=sizes.latents, k=sizes.k), device=sizes.device)
    lr = 5e-3 / (sizes.latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sp.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()

    def step(x):
        with torch.autocast(sizes.device, dtype=torch.bfloat16):
            out = sp(x)
        out.fvu.backward()
        sp.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sp.set_decoder_norm_to_unit_norm()

    return step


def sae_step(sizes: Sizes, steps: int) -> dict:
    data = synthetic_activations(sizes.batch * steps, n_features=sizes.latents // 4, d_in=sizes.d_in, active=32,
                                 device=sizes.device)  # fmt: skip
    figures = {f"ours ({name})": tokens_per_s(ours(sizes, name), data, sizes) for name in ("signum", "adam")}
    try:
        figures["sparsify"] = tokens_per_s(sparsify(sizes), data, sizes)
    except ImportError as err:
        print(f"sparsify not measured ({err}); carry its wheels (bench/gpu.sh)")
    return figures


def llama_1b_like(sizes: Sizes, directory: Path) -> ModelConfig:
    """A Llama-3.2-1B-shaped model with random weights and a BPE tokenizer trained on pydoc."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=sizes.vocab, special_tokens=["<bos>", "<eos>"], show_progress=False)
    tok.train_from_iterator(pydoc_documents(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>").save_pretrained(directory)
    config = LlamaConfig(**sizes.model, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500_000.0)
    torch.manual_seed(0)
    with torch.device(sizes.device):  # random init on the GPU: a minute of CPU time saved
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    return ModelConfig(name="llama-1b-shaped", path=str(directory), dtype="bfloat16", device=sizes.device)


def timed_harvest(model_cfg: ModelConfig, loaded, cfg: HarvestConfig, run: Path) -> float:
    start = time.perf_counter()
    harvest_activations(model_cfg, CORPUS, cfg, run, loaded=loaded)
    return time.perf_counter() - start


def writers_alone(shape: tuple[int, int, int], shards: int, directory: Path, threads: int | None = None) -> float:
    """Seconds for harvest's shard writers (hash, write, fsync, rename; `threads` of them, default
    as harvest's) to write `shards` synthetic bf16 shards of `shape` [windows, context, d_model]."""
    tokens = torch.zeros(shape[:2], dtype=torch.int32)
    acts = torch.randn(shape, dtype=torch.bfloat16)
    writer = ShardWriter(threads)
    start = time.perf_counter()
    for index in range(shards):
        writer.submit(("writers", index), directory / shard_name(index), tokens, acts)
    writer.close()
    seconds = time.perf_counter() - start
    shutil.rmtree(directory)
    return seconds


def model_side(model_cfg: ModelConfig, sizes: Sizes, run: Path, tokens: int, train_tokens: int, figures: dict,
               only_harvest: bool = False) -> None:  # fmt: skip
    """Fills `figures` as it goes: a later part's failure keeps the earlier figures."""
    loaded = load_model(model_cfg)
    harvest_cfg = HarvestConfig(hooks=[HOOK], tokens=tokens, batch_size=64, progress=False)
    harvest_s = timed_harvest(model_cfg, loaded, harvest_cfg, run)
    shards = ShardSet(run / "activations" / HOOK)
    windows = shards.tokens_at(torch.arange(shards.n_tokens)).view(-1, shards.manifest.context_length)
    bare_s = bare_forward(loaded, validate_hooks(loaded.model, [HOOK]), windows, harvest_cfg.batch_size)
    n = windows.numel()
    figures.update({"bare truncated forward": n / bare_s, "harvest": n / harvest_s})
    shape, n_shards = (harvest_cfg.sequences_per_shard, harvest_cfg.context_length, loaded.d_model), len(shards.manifest.shards)
    figures["shard writers alone"] = n / writers_alone(shape, n_shards, run.with_name("writers"))
    threads = 2 * default_writer_threads()
    figures[f"shard writers alone, {threads} threads"] = n / writers_alone(shape, n_shards, run.with_name("writers"), threads)
    if only_harvest:  # and once more, warm: pinned buffers allocated, kernels chosen
        figures["harvest, again"] = n / timed_harvest(model_cfg, loaded, harvest_cfg, run.with_name("again"))
        return
    # a run of its own, as a user's: only the held-out split is stored (harvested before the timed
    # loop), so the stream skips those windows alone on each pass over the corpus, not all harvested
    stream_run = run.with_name("stream")
    held = shards.n_tokens // 8
    cfg = TrainConfig(hook=HOOK, source="model", tokens=train_tokens, batch_size=sizes.batch, holdout_tokens=held,
                      device=sizes.device, progress=False)  # fmt: skip
    train_s, _, split = timed_training(cfg, stream_run, ModelSource(model_cfg, CORPUS, harvest_cfg))
    figures["train from the model"] = train_tokens / train_s
    print(f"train from the model, {split}", flush=True)
    eval_cfg = EvaluateConfig(batch_size=16, holdout_tokens=held, progress=False)
    start = time.perf_counter()
    evaluate_saes(model_cfg, eval_cfg, stream_run, WandbConfig(mode="disabled"), loaded=loaded)
    eval_s = time.perf_counter() - start
    stored = ShardSet(stream_run / "activations" / HOOK)
    eval_windows = stored.tokens_at(torch.arange(stored.n_tokens)).view(-1, windows.shape[1])[-(held // windows.shape[1]) :]
    figures["evaluate"] = eval_windows.numel() / eval_s
    figures["bare forward to logits"] = eval_windows.numel() / bare_logits_forward(loaded.model, eval_windows, 16)


def report(figures: dict, sizes: Sizes) -> None:
    print(f"TopK step, d_in {sizes.d_in}, {sizes.latents} latents, k {sizes.k}, batch {sizes.batch}, bf16 autocast (tokens/s):")
    step, model = figures.get("sae_step", {}), figures.get("model", {})
    for name, rate in step.items():
        print(f"  {name:32}{rate:>12,.0f}")
    if "sparsify" in step:
        print(f"  ours (signum) / sparsify: {step['ours (signum)'] / step['sparsify']:.2f}   (target >= 1.4)")
    print(f"Llama-3.2-1B-shaped model (random weights, bf16), {HOOK} (tokens/s):")
    for name, rate in model.items():
        print(f"  {name:32}{rate:>12,.0f}")
    forward = model.get("bare truncated forward")
    if forward:
        print(f"  harvest / forward {model['harvest'] / forward:.2f} (target >= 0.9)")
        for name, rate in model.items():
            if name.startswith(("shard writers", "harvest, again")) or name == "train from the model":
                print(f"  {name} / forward {rate / forward:.2f}")
    if "evaluate" in model:
        print(f"  evaluate / forward to logits {model['evaluate'] / model['bare forward to logits']:.2f}")


def measure(name: str, work, figures: dict, json_path: Path | None) -> None:
    """Runs one section; a failure is printed and the next section still runs (device time is scarce)."""
    start, figures[name] = time.perf_counter(), {}
    try:
        work(figures[name])
    except Exception:  # noqa: BLE001  (the traceback is the report)
        traceback.print_exc()
    figures.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    print(f"{name} ({figures['seconds'][name]} s): {figures[name]}", flush=True)
    if json_path:
        json_path.write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="SAE steps per measurement")
    parser.add_argument("--tokens", type=int, default=2_097_152, help="tokens harvested (the corpus holds 2.8M)")
    parser.add_argument("--train-tokens", type=int, default=4_194_304, help="tokens trained from the model")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only-step", action="store_true", help="the SAE step alone")
    parser.add_argument("--only-harvest", action="store_true", help="harvest, the bare forward and the writers alone")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script only")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs CUDA (--smoke runs it at toy sizes on the CPU)")
    if args.smoke:
        args.tokens, args.train_tokens, args.steps = 32_768, 8192, 8
    device = torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (smoke: toy sizes)"
    figures: dict = {"device": device, "torch": torch.__version__}
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    if not args.only_harvest:
        measure("sae_step", lambda out: out.update(sae_step(sizes, args.steps)), figures, args.json)
    if args.only_step:
        return report(figures, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        model_cfg = llama_1b_like(sizes, Path(tmp) / "model")
        def work(out: dict) -> None:
            model_side(model_cfg, sizes, Path(tmp) / "run", args.tokens, args.train_tokens, out, args.only_harvest)

        measure("model", work, figures, args.json)
    report(figures, sizes)


if __name__ == "__main__":
    main()
