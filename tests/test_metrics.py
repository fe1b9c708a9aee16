import torch

from pipeline.metrics import StreamingReconstructionStats, fvu, fvu_per_dimension, l0, mse, token_variance


def test_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    # mean (2, 1); total variance = (1 + 1) + (1 + 1) = 4; squared error = 1
    assert float(fvu(x, x_hat)) == 0.25
    assert float(token_variance(x)) == 2.0
    assert float(mse(x, x_hat)) == 0.25
    assert float(fvu_per_dimension(x, x_hat)) == (0 / 2 + 1 / 2) / 2
    assert float(l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]))) == 1.5


def test_mean_predictor_has_fvu_one_and_identity_zero():
    x = torch.randn(100, 8)
    assert torch.isclose(fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0))
    assert float(fvu(x, x)) == 0.0


def test_streaming_equals_one_batch():
    x, x_hat = torch.randn(300, 8) + 3, torch.randn(300, 8)
    codes = (torch.rand(300, 20) < 0.1).float()
    stats = StreamingReconstructionStats(8, 20)
    for i in range(0, 300, 70):
        stats.update(x[i : i + 70], x_hat[i : i + 70], codes[i : i + 70])
    assert abs(stats.fvu() - float(fvu(x, x_hat))) < 1e-5
    assert abs(stats.l0() - float(l0(codes))) < 1e-6
    assert stats.silent_fraction() == float((codes.sum(0) == 0).float().mean())


def test_ce_kl_and_recovery_definitions():
    from pipeline.metrics import ce_loss_recovered, kl_divergence, log_probs, next_token_ce

    logits = torch.randn(2, 5, 11)
    tokens = torch.randint(0, 11, (2, 5))
    ce = next_token_ce(logits, tokens)
    expected = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(ce, expected)
    assert float(kl_divergence(log_probs(logits), log_probs(logits)).abs().max()) < 1e-6
    assert float(kl_divergence(log_probs(logits), log_probs(torch.zeros_like(logits))).min()) >= 0
    assert ce_loss_recovered(2.0, 2.0, 5.0) == 1.0  # identity splice
    assert ce_loss_recovered(2.0, 5.0, 5.0) == 0.0  # zero splice
    assert ce_loss_recovered(2.0, 3.5, 5.0) == 0.5


def test_streaming_extras_against_hand_computed_values():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    codes = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.5, 0.0]])
    stats = StreamingReconstructionStats(2, 3)
    stats.update(x, x_hat, codes)
    assert stats.cossim() == 0.5  # cos = 1 and 0
    assert abs(stats.l2_ratio() - (1 + 2) / 2) < 1e-12  # ||x_hat|| / ||x|| = 5/5 and 2/1
    assert stats.l1() == (3 + 0.5) / 2
    assert stats.mse() == (1 + 4) / 4
    assert abs(stats.fvu_per_dimension() - float(fvu_per_dimension(x, x_hat))) < 1e-6
    assert stats.density().tolist() == [0.5, 1.0, 0.0]
    assert stats.silent_fraction() == 1 / 3
    assert stats.frequent_fraction(0.6) == 1 / 3


def test_density_histogram_and_kl_score():
    from pipeline.metrics import density_histogram, kl_div_score

    density = torch.tensor([0.0, 0.0, 1e-3, 1e-3, 0.5, 1.0])
    hist = density_histogram(density, bins=4, low=-4.0)
    assert hist["silent"] == 2 and hist["counts"] == [0, 2, 0, 2]
    assert hist["log10_density_edges"] == [-4.0, -3.0, -2.0, -1.0, 0.0]
    assert kl_div_score(0.0, 2.0) == 1.0 and kl_div_score(2.0, 2.0) == 0.0
