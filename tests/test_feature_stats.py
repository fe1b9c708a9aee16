import math

import torch

from pipeline.feature_stats import Coactivation, FeatureStats, TopExamples, firing_entries


def _codes(n_tokens=96, d_sae=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.rand(n_tokens, d_sae, generator=gen) * 5
    return codes * (torch.rand(n_tokens, d_sae, generator=gen) < 0.3)


def test_streaming_top_examples_equal_a_global_sort():
    codes, ctx, m = _codes(), 16, 4
    top = TopExamples(codes.shape[1], m, before=3, after=1)
    for lo in range(0, len(codes), 32):  # batches of two windows
        rows, latents, acts = firing_entries(codes[lo : lo + 32])
        top.update(rows, latents, acts, acts, codes[lo : lo + 32], lo, ctx)
    for f in range(codes.shape[1]):
        values, tokens = codes[:, f].topk(m)
        assert torch.equal(top.act[f], values) and torch.equal(top.token[f], tokens)
        for slot, t in enumerate(tokens.tolist()):
            window = t // ctx
            for j, pos in enumerate(range(t - 3, t + 2)):
                inside = pos // ctx == window and 0 <= pos < len(codes)
                expected = float(codes[pos, f]) if inside else 0.0
                assert abs(float(top.context[f, slot, j]) - expected) < 1e-2


def test_random_keys_give_a_uniform_sample_of_firings():
    codes = torch.zeros(4000, 1)
    codes[::2, 0] = torch.arange(2000).float() + 1  # fires on even tokens, activation = rank
    hits = torch.zeros(4000)
    for seed in range(200):
        sample = TopExamples(1, 5, 0, 0)
        gen = torch.Generator().manual_seed(seed)
        for lo in range(0, 4000, 500):
            rows, latents, acts = firing_entries(codes[lo : lo + 500])
            sample.update(
                rows, latents, torch.rand(len(rows), generator=gen), acts, codes[lo : lo + 500], lo, 500
            )
        hits[sample.token[0]] += 1
    assert hits[1::2].sum() == 0
    halves = hits[:2000].sum(), hits[2000:].sum()  # early and late firings are sampled alike
    assert abs(halves[0] - halves[1]) < 0.2 * sum(halves)


def test_feature_stats_and_histogram():
    codes = _codes()
    stats = FeatureStats(codes.shape[1], bins=16)
    rows, latents, acts = firing_entries(codes)
    stats.update(len(codes), latents, acts)
    assert torch.equal(stats.count, (codes > 0).sum(0))
    torch.testing.assert_close(stats.sum.float(), codes.sum(0))
    torch.testing.assert_close(stats.max, codes.max(0).values)
    assert torch.equal(stats.histogram.sum(1), stats.count)
    edges = stats.edges()
    assert math.isclose(edges[1] / edges[0], 2**0.5)


def test_coactivation_counts_pairs():
    codes = torch.zeros(6, 4)
    codes[:3, [0, 1]] = 1.0  # 0 and 1 together three times
    codes[3:5, [0, 2]] = 1.0  # 0 and 2 twice
    codes[5, 3] = 1.0
    co = Coactivation(4, max_tokens=100)
    co.update(codes)
    partners, prob = co.top_partners(2)
    assert partners[0].tolist() == [1, 2] and torch.allclose(prob[0], torch.tensor([3 / 5, 2 / 5]))
    assert partners[1].tolist() == [0, -1] and prob[1, 0] == 1.0
    assert partners[3].tolist() == [-1, -1]
