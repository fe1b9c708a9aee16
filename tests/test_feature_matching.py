import torch

from pipeline.feature_matching import against_control, classify, match_features
from pipeline.sae import SaeConfig, build_sae


def _sae(seed=0, d=16, expansion=4):
    sae = build_sae(SaeConfig(architecture="topk", expansion=expansion, k=4), d)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def test_matching_recovers_a_permutation_and_classifies():
    base = _sae()
    other = _sae()
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(base.d_sae, generator=gen)
    with torch.no_grad():
        other.W_dec.copy_(base.W_dec[perm] + 0.01 * torch.randn(base.W_dec.shape, generator=gen))
        other.W_enc.copy_(base.W_enc[:, perm])
        other.W_dec[:8] = torch.randn(8, 16, generator=gen)  # 8 other features replaced by unrelated directions
    matches = match_features(base, other)
    inverse = torch.argsort(perm)
    moved = set(perm[:8].tolist())
    for f in range(base.d_sae):
        if f not in moved:
            assert int(matches["assigned"][f]) == int(inverse[f])
            assert matches["assigned_cos"][f] > 0.99 and matches["encoder_cos"][f] > 0.99
    classes = classify(matches, kept=0.8, shifted=0.5)
    assert int((classes["status"] == 0).sum()) == base.d_sae - 8
    assert int(classes["status"][list(moved)].ne(0).sum()) == 8
    assert int(classes["new"].sum()) == int((classes["status"] == 2).sum())


def test_against_control_counts_the_features_each_side_alone_moved():
    status = torch.tensor([0, 0, 1, 2, 0, 2])
    control = torch.tensor([0, 1, 0, 0, 0, 2])
    counts = against_control({"status": status}, {"status": control})
    assert counts == {"moved_beyond_control": 2, "moved_only_in_control": 1, "sign_test_z": 0.58}
    assert against_control({"status": status}, {"status": status})["sign_test_z"] == 0.0
