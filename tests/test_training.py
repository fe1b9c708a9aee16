import torch

from pipeline.sae import SaeConfig, build_sae
from pipeline.training import Dist, TrainConfig, TrainingMember, make_step


def test_learning_rate_and_schedule_follow_the_optimizer_unless_given():
    assert TrainConfig().learning_rate(2**14) == 5e-3 and TrainConfig().schedule() == "constant"
    assert TrainConfig().learning_rate(4 * 2**14) == 2.5e-3  # scaled by d_sae ** -0.5
    adam = TrainConfig(optimizer="adam")
    assert adam.learning_rate(2**14) == 2e-3 and adam.schedule() == "linear"
    given = TrainConfig(lr_base=1e-3, lr_decay="cosine")
    assert given.learning_rate(2**14) == 1e-3 and given.schedule() == "cosine"
    assert TrainConfig(lr=0.1).learning_rate(2**16) == 0.1


def test_dead_window_is_10k_tokens_unless_an_average_latent_would_fire_fewer_than_8_times():
    cfg = TrainConfig()
    assert cfg.dead_window(d_sae=16 * 576, k=16) == 10_000
    assert cfg.dead_window(d_sae=32 * 576, k=16) == 10_000  # the sweep's widest for its k: 8 d_sae / k = 9,216
    assert cfg.dead_window(d_sae=2**17, k=32) == 8 * 2**12  # an average latent fires once in 4,096 tokens
    assert cfg.dead_window(d_sae=2**17, k=None) == 10_000  # no fixed k (relu, jumprelu)
    assert TrainConfig(dead_tokens=500).dead_window(d_sae=2**17, k=32) == 500
    wide = TrainingMember(build_sae(SaeConfig(k=4, d_sae=2**14), 8), cfg)
    relu = TrainingMember(build_sae(SaeConfig(architecture="relu", k=4, d_sae=2**14), 8), cfg)
    assert (wide.dead_tokens, relu.dead_tokens) == (2**15, 10_000)


def test_dead_latents_step_three_times_as_far_under_signum():
    """Each Signum step moves an entry by lr; a dead latent's encoder column and bias move 3 lr."""
    torch.manual_seed(0)
    cfg = TrainConfig(lr=0.01, dead_tokens=100, batch_size=64, grad_clip=None)
    member = TrainingMember(build_sae(SaeConfig(k=2, expansion=2), 8), cfg)
    dead = torch.arange(16) < 4
    member.since_fired[dead] = 100  # latents 0-3 idle for the whole window
    sae = member.sae
    before = {"W_enc": sae.W_enc.detach().clone(), "b_enc": sae.b_enc.detach().clone()}
    make_step(member, cfg, Dist(), torch.device("cpu"))(torch.randn(64, 8), torch.tensor(8.0), 1.0)
    moved = {  # the largest move of each latent's entries in Signum's iterate z, [16] each
        "W_enc": (member.opt.state[sae.W_enc]["z"] - before["W_enc"]).abs().amax(dim=0),
        "b_enc": (member.opt.state[sae.b_enc]["z"] - before["b_enc"]).abs(),
    }
    for name, per_latent in moved.items():
        torch.testing.assert_close(per_latent[dead], torch.full((4,), 0.03), msg=name)
        torch.testing.assert_close(per_latent[~dead], torch.full((12,), 0.01), msg=name)
    assert TrainingMember(build_sae(SaeConfig(k=2, expansion=2), 8), TrainConfig(optimizer="adam")).dead_step_scale == 1
    transcoder = build_sae(SaeConfig(architecture="transcoder", k=2, expansion=2), 8)
    assert TrainingMember(transcoder, cfg).dead_step_scale == 1  # none for transcoders unless set
