"""Shared fixtures: a tiny tokenizer, tiny random models saved locally, a small text corpus."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from pipeline.corpus import CorpusConfig
from pipeline.models import ModelConfig

TEXT = Path(__file__).with_name("data") / "corpus.txt"

# Where libraries keep caches and settings under ~ (datasets' cache of local corpus files, the
# converted default model, matplotlib, Chromium's profile and dconf) and W&B's staging links (under
# /tmp): a temporary folder of the test session instead, so that tests write nothing outside their tmp dirs.
_HOME_DIRS = {"HF_DATASETS_CACHE": "datasets", "SAE_PIPELINE_CACHE": "sae-pipeline", "MPLCONFIGDIR": "matplotlib",
              "XDG_CACHE_HOME": "cache", "XDG_CONFIG_HOME": "config", "SAE_PIPELINE_WANDB_LINKS": "wandb-links"}  # fmt: skip


def pytest_configure(config):
    root = Path(tempfile.mkdtemp(prefix="sae-pipeline-tests-"))
    config._home_dirs_root = root
    for var, sub in _HOME_DIRS.items():
        os.environ[var] = str(root / sub)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is (NCCL ones where two GPUs are); elsewhere they are skipped."""
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def pytest_unconfigure(config):
    shutil.rmtree(config._home_dirs_root, ignore_errors=True)


def make_tokenizer():
    """A byte-level BPE with BOS/EOS trained on the test corpus (offline, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"], show_progress=False)
    tok.train([str(TEXT)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def make_model(arch: str, vocab: int, **overrides):
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
    )

    torch.manual_seed(0)
    configs = {
        "llama": lambda: LlamaConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            vocab_size=vocab,
        ),
        "gpt2": lambda: GPT2Config(
            n_layer=3, n_embd=48, n_head=4, n_positions=128, vocab_size=vocab, bos_token_id=0, eos_token_id=1
        ),
        "neox": lambda: GPTNeoXConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            vocab_size=vocab,
            use_parallel_residual=False,
        ),
        "gemma2": lambda: Gemma2Config(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            vocab_size=vocab,
        ),
    }
    config = configs[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny random Llama and GPT-2 models saved as local model directories."""
    dirs = {}
    for arch in ("llama", "gpt2"):
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        make_model(arch, len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture
def llama_cfg(tiny_model_dirs) -> ModelConfig:
    return ModelConfig(name="tiny-llama", path=str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")


@pytest.fixture
def text_corpus() -> CorpusConfig:
    return CorpusConfig(name="test", source="files", path=str(TEXT))


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def make_shard_set(
    directory: Path, n_seq: int = 48, ctx: int = 32, d: int = 16, per_shard: int = 16, seed: int = 0,
    outlier_positions: tuple[int, ...] = (),
):  # fmt: skip
    """Synthetic activations (sparse combinations of 48 directions) written as a harvested shard set;
    at `outlier_positions` of every window they are huge, as BOS (massive activations)."""
    from pipeline.shards import Manifest, ShardWriter, shard_name, write_manifest

    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(48, d, generator=gen)
    codes = (
        (torch.rand(n_seq * ctx, 48, generator=gen) < 0.06) * torch.rand(n_seq * ctx, 48, generator=gen) * 4
    )
    acts = (codes @ basis + 0.01 * torch.randn(n_seq * ctx, d, generator=gen)).reshape(n_seq, ctx, d)
    tokens = torch.randint(2, 300, (n_seq, ctx), generator=gen, dtype=torch.int32)
    tokens[:, 0] = 0
    acts[:, 0] = 50.0  # BOS positions are huge outliers, as in real models
    acts[:, list(outlier_positions)] = 40.0
    writer = ShardWriter()
    for index, start in enumerate(range(0, n_seq, per_shard)):
        writer.submit(
            index,
            directory / shard_name(index),
            tokens[start : start + per_shard],
            acts[start : start + per_shard],
        )
    writer.close()
    manifest = Manifest(
        model_id="synthetic",
        weights_hash="0" * 64,
        hook=directory.name,
        d_model=d,
        dtype="float32",
        context_length=ctx,
        tokenizer_id="t",
        bos_policy="window",
        bos_token_id=0,
        corpus_id="c",
        sequences_per_shard=per_shard,
        shards=[writer.records[i] for i in range(len(writer.records))],
    )
    write_manifest(directory, manifest)
    return manifest


@pytest.fixture(scope="session")
def trained_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama after a few seconds of next-token training on the test corpus, so its clean CE
    is far below that of an ablated stream (as in a real model, and unlike a random one)."""
    from pipeline.corpus import pack_windows

    model = make_model("llama", len(tokenizer)).train()
    windows = torch.stack(list(pack_windows([TEXT.read_text()], tokenizer, 32, "window")))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = windows[torch.randint(len(windows), (16,), generator=gen)].long()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("trained-llama")
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_cfg(trained_llama_dir) -> ModelConfig:
    """The trained tiny Llama in fp32 on the CPU."""
    return ModelConfig(name="tiny-llama", path=str(trained_llama_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def loaded(model_cfg):
    from pipeline.models import load_model

    return load_model(model_cfg)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, model_cfg, loaded):
    """A run directory with 40 harvested windows at three hooks and a TopK dictionary (topk-k8-x4) at
    blocks.1.resid_post, from the trained tiny Llama (fp32). Stages add their outputs to it."""
    from pipeline.corpus import CorpusConfig
    from pipeline.harvesting import HarvestConfig, harvest_activations
    from pipeline.sae import SaeConfig
    from pipeline.stages.train import TrainConfig, train_saes
    from pipeline.tracking import WandbConfig

    HOOK, CTX = "blocks.1.resid_post", 32
    run_dir = tmp_path_factory.mktemp("run")
    corpus = CorpusConfig(name="test", source="files", path=str(TEXT))
    harvest_activations(
        model_cfg,
        corpus,
        HarvestConfig(hooks=[HOOK, "blocks.1.mlp_in", "blocks.1.mlp_out"], tokens=CTX * 40, context_length=CTX,
                      progress=False),  # fmt: skip
        run_dir,
        loaded=loaded,
    )
    train = TrainConfig(hook=HOOK, batch_size=128, holdout_tokens=CTX * 8, epochs=3, progress=False,
                        checkpoint_every=0, lr=3e-3)  # fmt: skip
    train_saes(train, SaeConfig(architecture="topk", expansion=4, k=8), run_dir, WandbConfig(mode="disabled"))
    return run_dir


@pytest.fixture(scope="session")
def transcoder_run(tmp_path_factory, trained_run):
    """A copy of trained_run's activations with a transcoder and a skip transcoder (k 8, x4) reading
    blocks.1.mlp_in and predicting blocks.1.mlp_out."""
    from pipeline.sae import SaeConfig
    from pipeline.stages.train import TrainConfig, train_saes
    from pipeline.tracking import WandbConfig

    run_dir = copy_run(trained_run, tmp_path_factory.mktemp("transcoders") / "run")
    shutil.rmtree(run_dir / "sae")
    train = TrainConfig(hook="blocks.1.mlp_in", hook_out="blocks.1.mlp_out", batch_size=128, holdout_tokens=32 * 8,
                        epochs=20, progress=False, checkpoint_every=0, lr=3e-3, variants=[{}, {"skip": True}])  # fmt: skip
    train_saes(train, SaeConfig(architecture="transcoder", expansion=4, k=8), run_dir, WandbConfig(mode="disabled"))
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy of a run directory's activations and dictionaries (for tests that damage them)."""
    shutil.copytree(
        run_dir, to, ignore=shutil.ignore_patterns("eval", "features", "wandb", "logs", ".*.lock")
    )
    return to


def poison_activation(hook_dir: Path, window: int, position: int) -> None:
    """Write NaN into the stored fp32 activation at (window, position) of a shard directory and record
    the new checksum: a well-formed shard holding a bad value (as a broken harvest would write)."""
    from pipeline.fileio import file_sha256
    from pipeline.shards import read_shard_header

    manifest = json.loads((hook_dir / "manifest.json").read_text())
    first = 0
    for record in manifest["shards"]:
        if window < first + record["n_sequences"]:
            path = hook_dir / record["name"]
            info = read_shard_header(path)["activations"]
            d_model = info.shape[-1]
            offset = info.offset + (((window - first) * manifest["context_length"] + position) * d_model) * 4
            data = bytearray(path.read_bytes())
            data[offset : offset + 4] = bytes.fromhex("0000c07f")
            path.write_bytes(bytes(data))
            record["sha256"] = file_sha256(path)
            (hook_dir / "manifest.json").write_text(json.dumps(manifest))
            return
        first += record["n_sequences"]
    raise IndexError(window)


def staged_by_wandb(run_dir: Path) -> set[Path]:
    """The files the one offline W&B run in `run_dir` points `wandb sync` to (a table's rows, its HTML
    cells), by the absolute paths its log holds. W&B's service writes and closes a run's log after
    `finish()` returns, so the service is shut down (and waited for) before the log is read."""
    import re

    import wandb

    wandb.teardown()
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return {Path(p.decode()) for p in re.findall(rb"(/[\w./-]+/artifacts/staging/tmp\w{8})", log.read_bytes())}
