import math

import numpy as np
import torch

from pipeline.feature_stats import (
    Coactivation,
    DimensionCorrelation,
    FeaturePassSettings,
    FeatureStats,
    TopExamples,
    decoder_neighbours,
    feature_pass,
    firing_entries,
)
from pipeline.sae import Sae, SaeConfig, build_sae
from pipeline.shards import ShardSet
from tests.conftest import make_shard_set


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
    codes[5, 1] = 1.0  # 1 alone once
    co = Coactivation(4, max_tokens=100)
    co.update(codes)
    partners = co.top_partners(2, min_count=1)
    assert partners.ids[0].tolist() == [2, 1] and partners.count[0].tolist() == [2, 3]
    torch.testing.assert_close(partners.given[0], torch.tensor([2 / 5, 3 / 5]))
    torch.testing.assert_close(partners.lift[0], torch.tensor([2 * 6 / (5 * 2), 3 * 6 / (5 * 4)]))
    assert partners.ids[1].tolist() == [0, -1] and partners.given[1, 0] == 0.75
    assert partners.ids[3].tolist() == [-1, -1]
    assert co.top_partners(2, min_count=3).ids[0].tolist() == [1, -1]  # two co-firings are too few


def test_coactivation_ranks_by_lift_not_base_rate():
    """A feature firing on every token is every feature's most frequent partner, but its lift is 1;
    the partner that fires only with this feature comes first."""
    codes = torch.zeros(100, 4)
    codes[:, 0] = 1.0  # dense
    codes[:10, 1] = 1.0  # this feature
    codes[:5, 2] = 1.0  # its specific partner
    codes[50:90, 3] = 1.0  # unrelated
    co = Coactivation(4, max_tokens=1000)
    co.update(codes)
    partners = co.top_partners(3)
    assert partners.ids[1].tolist() == [2, 0, -1]
    assert partners.lift[1, 1] == 1.0 and partners.given[1, 1] == 1.0 and partners.given[1, 0] == 0.5


def test_decoder_neighbours_are_the_nearest_directions():
    w_dec = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.1, 1.0, 0], [-1.0, 0, 0], [0, 0.2, 1.0]])
    ids, cosines = decoder_neighbours(w_dec, 2, chunk=2)
    assert ids[0].tolist() == [1, 2] and ids[3].tolist()[0] == 4
    expected = torch.nn.functional.normalize(w_dec, dim=-1) @ torch.nn.functional.normalize(w_dec, dim=-1).T
    torch.testing.assert_close(cosines[0], expected[0, [1, 2]])
    assert (ids != torch.arange(5)[:, None]).all()  # never itself


def test_dimension_correlation_is_pearson_over_every_token():
    """Streamed over batches, from the firings only, with some tokens left out: numpy's corrcoef."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen) * 3 + 40  # a large mean, as in the residual stream
    pre = x[:, :3] - 40 + 0.5 * torch.randn(300, 3, generator=gen)
    codes = torch.relu(pre)  # [tokens, 3]
    counted = torch.ones(300, dtype=torch.bool)
    counted[::7] = False
    codes[~counted] = 0
    corr = DimensionCorrelation(3, 5)
    for start in range(0, 300, 64):
        part = slice(start, start + 64)
        corr.update(x[part], *firing_entries(codes[part]), counted[part])
    ids, r = corr.top(5)
    keep = counted.numpy()
    expected = np.corrcoef(codes[keep].T.numpy(), x[keep].T.numpy())[:3, 3:]
    torch.testing.assert_close(r, torch.from_numpy(expected).float().gather(1, ids), atol=1e-4, rtol=1e-4)
    assert ids[:, 0].tolist() == [0, 1, 2]  # each feature is read from its own dimension


def test_a_pass_can_leave_outlier_positions_out(tmp_path):
    """norm_limit: positions above it get no firings (as BOS), yet their norms are still recorded."""
    directory = tmp_path / "acts"
    make_shard_set(directory, outlier_positions=(7,))
    shards = ShardSet(directory)
    sae = Sae.load(_tiny_topk(shards.d_model, tmp_path))
    cfg = FeaturePassSettings(top_k=3, samples=4, progress=False)
    kept = feature_pass(sae, shards, 48, cfg, "cpu")
    left = feature_pass(sae, shards, 48, cfg, "cpu", norm_limit=100.0)
    assert ((kept.top.token % 32) == 7).any() and not ((left.top.token % 32) == 7).any()
    assert left.stats.count.sum() < kept.stats.count.sum()
    assert torch.equal(kept.norms.isnan(), left.norms.isnan()) and (left.norm_ratio()[7::32] > 5).all()


def _tiny_topk(d_in: int, tmp_path):
    """A TopK dictionary whose first latents read the outlier direction (all ones) strongly."""
    sae = build_sae(SaeConfig(architecture="topk", d_in=d_in, d_sae=32, k=4), d_in, {})
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc[:, :4] = 1.0
    return sae.save(tmp_path / "sae")
