import torch

from pipeline.corpus import CorpusConfig
from pipeline.models import ModelConfig, load_model
from pipeline.stages.finetune import FinetuneConfig, finetune
from tests.conftest import TEXT


def test_finetune_changes_the_weights_saves_a_loadable_model_and_skips_a_rerun(trained_llama_dir, tmp_path):
    base = ModelConfig(path=str(trained_llama_dir), dtype="float32", device="cpu")
    cfg = FinetuneConfig(
        model=base,
        corpus=CorpusConfig(name="test", source="files", path=str(TEXT)),
        out=str(tmp_path / "tuned"),
        steps=3,
        batch_size=2,
        context_length=32,
        lr=1e-2,
        progress=False,
    )
    out = finetune(cfg)
    tuned = load_model(ModelConfig(path=str(out), dtype="float32", device="cpu"))
    original = load_model(base)
    assert tuned.weights_hash != original.weights_hash
    assert tuned.tokenizer_id.split("#")[1] == original.tokenizer_id.split("#")[1]  # same vocabulary
    ids = torch.randint(2, 300, (1, 16))
    assert torch.isfinite(tuned.model(ids).logits).all()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    finetune(cfg)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
