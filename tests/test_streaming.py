import pytest
import torch

from pipeline.corpus import iter_texts, load_documents, pack_windows
from pipeline.hooks import validate_hooks
from pipeline.models import load_model
from pipeline.streaming import ModelStream, StreamError, StreamTimes, WindowWalk, block_order

CTX, BOS = 32, 0


@pytest.fixture
def loaded(llama_cfg):
    return load_model(llama_cfg)


def _stream(loaded, corpus, first_window=4, bos_policy="window", windows=None, bos=BOS, norm_limits=None):
    def corpus_windows():
        packed = pack_windows(iter_texts(load_documents(corpus)), loaded.tokenizer, CTX, bos_policy)
        return (w for i, w in enumerate(packed) if windows is None or i < windows)

    hooks = validate_hooks(loaded.model, ["blocks.1.resid_post"])
    return ModelStream(loaded, corpus_windows, first_window, hooks, torch.float32, 3, bos, norm_limits=norm_limits)


def _trained_tokens(stream: ModelStream, n_windows: int) -> torch.Tensor:
    """The first trained-on token ids, straight from the windows."""
    windows = stream.training_windows()
    return torch.cat([w[stream.positions(w)] for w in (next(windows) for _ in range(n_windows))])


@pytest.mark.parametrize("bos_policy", ["window", "document"])
def test_blocks_cut_the_stream_of_trained_tokens_without_gaps(loaded, text_corpus, bos_policy):
    stream = _stream(loaded, text_corpus, bos_policy=bos_policy)
    expected = _trained_tokens(stream, 20)
    walk = WindowWalk(stream)
    bounds = [0, 50, 100, 131, 200, 310]
    got = [torch.cat([w[p] for w, p in walk.covering(lo, hi)]) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    assert [len(g) for g in got] == [50, 50, 31, 69, 110]
    assert torch.equal(torch.cat(got), expected[:310])
    assert (expected != BOS).all()


def test_a_walk_skips_blocks_it_is_not_asked_for(loaded, text_corpus):
    stream = _stream(loaded, text_corpus)
    expected = _trained_tokens(stream, 20)
    walk = WindowWalk(stream)
    walk.covering(0, 40)
    assert torch.equal(torch.cat([w[p] for w, p in walk.covering(200, 260)]), expected[200:260])
    with pytest.raises(ValueError, match="after the walk passed"):
        walk.covering(0, 10)


def test_batches_are_the_model_activations_of_a_shuffled_block(loaded, text_corpus):
    """A block's batches together hold each trained-on position's activation exactly once."""
    stream = _stream(loaded, text_corpus)
    block = 31 * 8  # 8 windows of 31 trained-on tokens
    batches = stream.batches(31, block, seed=0, start_step=0)
    got = torch.cat([next(batches)["blocks.1.resid_post"] for _ in range(8)])
    windows = stream.training_windows()
    ids = torch.stack([next(windows) for _ in range(8)]).long()
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, 32)
    assert got.shape == hidden.shape and not torch.allclose(got, hidden)  # shuffled ...
    order = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(got), order(hidden))  # ... the same rows


def test_a_resumed_stream_draws_the_uninterrupted_batches(loaded, text_corpus):
    stream = _stream(loaded, text_corpus)
    whole = stream.batches(16, 64, seed=3, start_step=0)
    expected = [next(whole)["blocks.1.resid_post"] for _ in range(11)]
    resumed = stream.batches(16, 64, seed=3, start_step=6)
    for step in range(6, 11):
        assert torch.equal(next(resumed)["blocks.1.resid_post"], expected[step])


def test_processes_take_alternate_blocks(loaded, text_corpus):
    stream = _stream(loaded, text_corpus)
    alone = stream.batches(16, 64, seed=0, start_step=0)
    blocks = [torch.cat([next(alone)["blocks.1.resid_post"] for _ in range(4)]) for _ in range(4)]
    for rank in range(2):
        mine = stream.batches(16, 64, seed=0, start_step=0, rank=rank, world=2)
        for j in range(2):
            got = torch.cat([next(mine)["blocks.1.resid_post"] for _ in range(4)])
            assert torch.equal(got, blocks[2 * j + rank])


def test_the_stream_passes_the_corpus_again_but_never_the_stored_windows(loaded, text_corpus):
    stream = _stream(loaded, text_corpus, first_window=2, windows=5)
    firsts = [int(w[1]) for w, _ in zip(stream.training_windows(), range(9), strict=False)]
    packed = list(pack_windows(iter_texts(load_documents(text_corpus)), loaded.tokenizer, CTX, "window"))[:5]
    assert firsts == [int(packed[i][1]) for i in (2, 3, 4) * 3]


def test_a_corpus_with_only_stored_windows_stops_with_a_clear_error(loaded, text_corpus):
    stream = _stream(loaded, text_corpus, first_window=5, windows=5)
    with pytest.raises(StreamError, match="nothing is left to train on"):
        next(stream.training_windows())


def test_a_stream_leaves_out_positions_above_the_norm_limit_and_keeps_its_blocks(loaded, text_corpus):
    """train.exclude_outliers on the model stream: a block serves only its rows below the limit (each
    at least once, as many batches as ever), so a resumed stream still draws the uninterrupted batches."""
    hook = "blocks.1.resid_post"
    plain = _stream(loaded, text_corpus)
    block = plain.block(WindowWalk(plain), 0, 64)[hook]
    limit = float(block.norm(dim=-1).median())  # half the rows are left out
    stream = _stream(loaded, text_corpus, norm_limits={hook: limit})
    whole = stream.batches(16, 64, seed=3, start_step=0)
    served = [next(whole)[hook] for _ in range(8)]  # two blocks of 4 batches
    first = torch.cat(served[:4])
    assert (first.norm(dim=-1) <= limit).all()
    kept = block[block.norm(dim=-1) <= limit]
    assert torch.equal(torch.unique(first, dim=0), torch.unique(kept, dim=0))
    resumed = stream.batches(16, 64, seed=3, start_step=5)
    for step in range(5, 8):
        assert torch.equal(next(resumed)[hook], served[step])
    assert (stream.sample(64)[hook].norm(dim=-1) <= limit).all() and len(stream.sample(64)[hook]) == len(kept)


def test_a_block_order_repeats_its_kept_rows_to_the_block_size():
    order = block_order(10, torch.tensor([1, 4, 7]), seed=0)
    assert len(order) == 10 and set(order.tolist()) == {1, 4, 7}
    assert torch.equal(order[3:6], order[:3])  # the permutation again
    assert sorted(block_order(10, None, seed=0).tolist()) == list(range(10))


def test_a_block_with_every_position_above_the_limit_stops_with_a_clear_error(loaded, text_corpus):
    stream = _stream(loaded, text_corpus, norm_limits={"blocks.1.resid_post": 0.0})
    with pytest.raises(StreamError, match="raise train.exclude_outliers"):
        next(stream.batches(16, 64, seed=0, start_step=0))


def test_a_blocks_time_counts_as_waiting_for_windows_then_as_the_forward(loaded, text_corpus, monkeypatch):
    """What bounds a train.source=model run: the time spent getting a block's windows is waiting,
    the time computing its activations is the forward (a fake clock: each part advances it)."""
    clock = [100.0]
    monkeypatch.setattr("pipeline.streaming.perf_counter", lambda: clock[0])  # this module's clock only
    stream = _stream(loaded, text_corpus)
    walk, compute = WindowWalk(stream), stream.compute

    def slow_covering(lo, hi, covering=walk.covering):
        clock[0] += 2.0
        return covering(lo, hi)

    def slow_compute(pieces):
        clock[0] += 3.0
        return compute(pieces)

    walk.covering, stream.compute = slow_covering, slow_compute
    acts = stream.block(walk, 0, 40)
    stream.block(walk, 40, 80)
    assert len(acts["blocks.1.resid_post"]) == 40
    assert stream.times == StreamTimes(forward=6.0, waiting=4.0)
    assert stream.times.summary(20.0) == (
        "the training loop's 20.0 s: 6.0 s (30 %) computing activations, 4.0 s (20 %) waiting for tokenized "
        "windows, 10.0 s (50 %) in the SAE steps and the rest"
    )
