import pytest
import torch

from pipeline.checkpoints import CheckpointError, load_checkpoint, remove_checkpoint, save_checkpoint
from pipeline.sae import SaeConfig, build_sae
from pipeline.training import TrainConfig, TrainingMember


def _member(seed, optimizer="signum"):
    torch.manual_seed(seed)
    return TrainingMember(
        build_sae(SaeConfig(expansion=2, k=3), 8), TrainConfig(lr=1e-3, optimizer=optimizer)
    )


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_roundtrip_restores_weights_optimizer_and_counters(tmp_path, optimizer):
    path = tmp_path / "checkpoints" / "abc.safetensors"
    m = _member(0, optimizer)
    m.sae.W_enc.sum().backward()
    m.opt.step()
    m.since_fired.fill_(7)
    m.sae.firing_rate.uniform_()  # BatchTopK's firing rates: training state that resumes too
    save_checkpoint(path, [m], step=5, state={"config_hash": "abc", "scale": 2.0})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # one file: whole or absent

    fresh = _member(1, optimizer)
    meta = load_checkpoint(path, [fresh], "abc")
    assert meta["step"] == 5 and meta["scale"] == 2.0
    for (name, a), b in zip(m.sae.state_dict().items(), fresh.sae.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    saved_state = m.opt.state[m.sae.W_enc]
    assert saved_state  # Adam's moments or Signum's iterate and average
    for key, value in saved_state.items():
        torch.testing.assert_close(fresh.opt.state[fresh.sae.W_enc][key], value, msg=key)
    assert int(fresh.since_fired[0]) == 7

    with pytest.raises(CheckpointError, match="another training configuration"):
        load_checkpoint(path, [fresh], "other")
    remove_checkpoint(path)
    assert not path.parent.exists() and load_checkpoint(path, [fresh], "abc") is None


def test_an_unreadable_checkpoint_is_named(tmp_path):
    path = tmp_path / "abc.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is unreadable.*delete it"):
        load_checkpoint(path, [_member(0)], "abc")
