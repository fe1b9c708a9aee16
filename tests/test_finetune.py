import torch

from pipeline.corpus import CorpusConfig
from pipeline.finetune_checkpoints import finished_steps, step_dir
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


def test_save_every_keeps_each_steps_model_loadable_beside_the_final_one(trained_llama_dir, tmp_path):
    base = ModelConfig(path=str(trained_llama_dir), dtype="float32", device="cpu")
    cfg = FinetuneConfig(model=base, corpus=CorpusConfig(name="test", source="files", path=str(TEXT)),
                         out=str(tmp_path / "tuned"), steps=4, batch_size=2, context_length=32, lr=1e-2,
                         save_every=2, progress=False)  # fmt: skip
    out = finetune(cfg)
    steps = finished_steps(out)
    assert [s for s, _ in steps] == [2, 4] and steps[0][1] == step_dir(out, 2) and steps[1][1] == out
    hashes = [load_model(ModelConfig(path=str(p), dtype="float32", device="cpu")).weights_hash for _, p in steps]
    assert len({load_model(base).weights_hash, *hashes}) == 3  # step 2 is neither the base nor the final model
