"""Shared fixtures: a tiny tokenizer, tiny random models saved locally, a small text corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.corpus import CorpusConfig
from pipeline.models import ModelConfig

TEXT = Path(__file__).with_name("data") / "corpus.txt"


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
