import errno
import hashlib
import json

import pytest
import torch

from pipeline import fileio
from pipeline.fileio import DiskFullError, atomic_write
from pipeline.shards import (
    Manifest,
    ShardError,
    ShardSet,
    ShardWriter,
    merge_worker_manifests,
    shard_name,
    worker_manifest_name,
    write_manifest,
    write_shard,
)

CTX, D = 8, 4


def _manifest(**kw):
    base = dict(
        model_id="m",
        weights_hash="h",
        hook="blocks.0.resid_post",
        d_model=D,
        dtype="float32",
        context_length=CTX,
        tokenizer_id="t",
        bos_policy="window",
        bos_token_id=0,
        corpus_id="c",
        sequences_per_shard=3,
    )
    return Manifest(**{**base, **kw})


def _write_set(directory, n_seq=(3, 3, 2), dtype=torch.float32):
    """Shards whose activation at global token index i is [i, i, i, i] and whose tokens mark BOS at 0."""
    writer = ShardWriter()
    start = 0
    for index, n in enumerate(n_seq):
        tokens = torch.arange(start, start + n * CTX, dtype=torch.int32).reshape(n, CTX) + 5
        tokens[:, 0] = 0
        acts = (
            torch.arange(start, start + n * CTX, dtype=torch.float32)[:, None]
            .expand(-1, D)
            .reshape(n, CTX, D)
        )
        writer.submit(("h", index), directory / shard_name(index), tokens, acts.to(dtype))
        start += n * CTX
    writer.close()
    records = [writer.records[("h", i)] for i in range(len(n_seq))]
    write_manifest(directory, _manifest(dtype=str(dtype).removeprefix("torch."), shards=records))
    return ShardSet(directory)


def test_shards_are_standard_safetensors(tmp_path):
    from safetensors.torch import load_file

    acts = torch.randn(2, CTX, D).to(torch.bfloat16)
    tokens = torch.arange(2 * CTX, dtype=torch.int32).reshape(2, CTX)
    record = write_shard(tmp_path / "s.safetensors", tokens, acts)
    loaded = load_file(tmp_path / "s.safetensors")
    assert torch.equal(loaded["activations"], acts) and torch.equal(loaded["tokens"], tokens)
    assert record.sha256 == hashlib.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()
    write_shard(tmp_path / "t.safetensors", tokens, acts.clone())
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()


def test_roundtrip_and_random_access(tmp_path):
    shards = _write_set(tmp_path)
    assert (shards.n_tokens, shards.d_model, shards.dtype) == (64, D, torch.float32)
    tokens, acts = shards.sequence(4)
    assert tokens[0] == 0 and tokens[1] == 4 * CTX + 1 + 5
    assert torch.equal(acts[:, 0], torch.arange(4 * CTX, 5 * CTX, dtype=torch.float32))
    idx = torch.tensor([63, 0, 30, 17])
    assert torch.equal(shards.gather(idx)[:, 0], torch.tensor([63.0, 0, 30, 17]))  # in the order asked for
    shards.verify()


def test_epoch_is_a_permutation_and_deterministic(tmp_path):
    shards = _write_set(tmp_path)
    batches = list(shards.iter_batches(8, seed=1, block_tokens=4, mix_blocks=3))
    seen = torch.cat([b[:, 0] for b in batches]).long()
    assert len(batches) == 8 and sorted(seen.tolist()) == list(range(64))
    again = list(shards.iter_batches(8, seed=1, block_tokens=4, mix_blocks=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = torch.cat([b[:, 0] for b in shards.iter_batches(8, seed=2, block_tokens=4, mix_blocks=3)])
    assert not torch.equal(seen.float(), other)
    resumed = list(shards.iter_batches(8, seed=1, start_batch=5, block_tokens=4, mix_blocks=3))
    assert all(torch.equal(a, b) for a, b in zip(batches[5:], resumed, strict=True))


def test_exclude_bos(tmp_path):
    shards = _write_set(tmp_path)
    seen = torch.cat([b[:, 0] for b in shards.iter_batches(7, exclude_bos=True)]).long().tolist()
    assert len(seen) == 56 and not {i for i in seen if i % CTX == 0}


def test_bfloat16_shards(tmp_path):
    shards = _write_set(tmp_path, dtype=torch.bfloat16)
    assert shards.dtype == torch.bfloat16
    assert torch.equal(
        shards.gather(torch.tensor([3, 9]))[:, 0], torch.tensor([3.0, 9.0], dtype=torch.bfloat16)
    )


def test_corrupt_shard_is_named(tmp_path):
    _write_set(tmp_path)
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.safetensors is corrupt"):
        ShardSet(tmp_path, verify=True)


def test_a_corrupt_shard_is_never_read(tmp_path):
    """Each shard is checked against the manifest before its first read, without verify=True."""
    shards = _write_set(tmp_path)
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # 64 bytes in the middle of the activations
    path.write_bytes(bytes(data))
    shards = ShardSet(tmp_path)
    assert shards.gather(torch.arange(16)).shape == (16, 4)  # shard 0 is intact and readable
    for read in (lambda: shards.gather(torch.tensor([40])), lambda: shards.sequence(3),
                 lambda: shards.tokens_at(torch.tensor([40])), lambda: shards.count_token(0)):  # fmt: skip
        with pytest.raises(ShardError, match="shard-00001.safetensors is corrupt.*re-run the harvest"):
            read()


def test_an_edited_manifest_checksum_is_noticed(tmp_path):
    _write_set(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard-00000.safetensors is corrupt"):
        ShardSet(tmp_path).gather(torch.tensor([0]))


def test_non_finite_activations_are_located(tmp_path):
    shards = _write_set(tmp_path)
    x = shards.gather(torch.arange(32, 48)).float()
    x[5, 2] = float("nan")
    with pytest.raises(ShardError, match=r"NaN or Inf .*shard-00001.safetensors \(window 4, position 5\)"):
        shards.check_finite(x, torch.arange(32, 48))


def test_truncated_and_missing_shards_are_named(tmp_path):
    _write_set(tmp_path)
    path = tmp_path / shard_name(2)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match="shard-00002.safetensors is truncated"):
        ShardSet(tmp_path)
    path.write_bytes(b"\x01")
    with pytest.raises(ShardError, match="shard-00002.safetensors is unreadable"):
        ShardSet(tmp_path)
    path.unlink()
    with pytest.raises(ShardError, match="shard-00002.safetensors listed in the manifest is missing"):
        ShardSet(tmp_path)


def test_unfinished_or_missing_directory(tmp_path):
    with pytest.raises(ShardError, match="does not exist; run the harvest"):
        ShardSet(tmp_path / "nothing")
    with pytest.raises(ShardError, match="harvest is unfinished"):
        ShardSet(tmp_path)
    write_manifest(tmp_path, _manifest())
    with pytest.raises(ShardError, match="holds no shards"):
        ShardSet(tmp_path)


def test_worker_manifests_merge(tmp_path):
    full = _write_set(tmp_path).manifest
    (tmp_path / "manifest.json").unlink()
    part0 = _manifest(shards=[full.shards[0], full.shards[2]])
    write_manifest(tmp_path, part0, worker_manifest_name(0, 2))
    assert merge_worker_manifests(tmp_path) is None
    write_manifest(tmp_path, _manifest(shards=[full.shards[1]]), worker_manifest_name(1, 2))
    assert merge_worker_manifests(tmp_path) == full
    assert ShardSet(tmp_path).n_tokens == 64  # the reader unifies worker manifests itself
    write_manifest(tmp_path, _manifest(d_model=9, shards=[full.shards[1]]), worker_manifest_name(1, 2))
    with pytest.raises(ShardError, match="other settings"):
        merge_worker_manifests(tmp_path)


def test_disk_full_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(fd, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "write", full_disk)
    with pytest.raises(DiskFullError, match="disk full while writing .*x.bin"):
        atomic_write(tmp_path / "x.bin", b"0" * 100_000)
    assert list(tmp_path.iterdir()) == []


def test_writer_threads_write_the_same_files_as_one(tmp_path):
    """Shards written by 3 threads (landing in any order) are the bytes one thread writes."""
    written = {}
    for threads in (1, 3):
        writer = ShardWriter(threads=threads)
        for index in range(7):
            gen = torch.Generator().manual_seed(index)
            tokens = torch.randint(0, 100, (2, CTX), dtype=torch.int32, generator=gen)
            acts = torch.randn(2, CTX, D, generator=gen).to(torch.bfloat16)
            writer.submit(("h", index), tmp_path / str(threads) / shard_name(index), tokens, acts)
        writer.close()
        written[threads] = {key: record.sha256 for key, record in writer.records.items()}
        assert len(written[threads]) == 7
    assert written[1] == written[3]
    for index in range(7):
        one, three = (tmp_path / t / shard_name(index) for t in ("1", "3"))
        assert one.read_bytes() == three.read_bytes()


def test_a_failing_writer_thread_stops_the_harvest_with_its_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # a file where the shard's directory should be
    writer = ShardWriter(threads=2)
    tokens, acts = torch.zeros(1, CTX, dtype=torch.int32), torch.zeros(1, CTX, D)
    writer.submit(("h", 0), blocker / shard_name(0), tokens, acts)
    with pytest.raises(OSError):
        for index in range(1, 50):  # a later submit or close re-raises it
            writer.submit(("h", index), tmp_path / shard_name(index), tokens, acts)
        writer.close()
