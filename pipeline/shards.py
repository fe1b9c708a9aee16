"""Activation shards on disk: the manifest, a background shard writer, and a memory-mapped reader.

One directory per hook (`activations/<hook>/`) holds
    shard-00000.safetensors   tokens int32 [n_seq, context_length],
                              activations [n_seq, context_length, d_model] (fp32 / bf16 / fp16)
    shard-00000.sha256        the shard's sha256, written right after it (until a manifest lists it)
    manifest.json             written last, atomically; lists every shard with n_sequences and sha256
Shard index s always holds windows [s * sequences_per_shard, ...) of the packed corpus, so shards
written by several worker processes (each with its own `manifest.worker-i-of-n.json`) form the
same set a single process would write.

Every file is written to a temporary name, fsynced and renamed: a crash leaves complete shards and
at most a stray temporary file, never a truncated shard under a final name. A reader checks each
shard's sha256 against the manifest before it first reads from it, so a corrupt byte is never used.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write, file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}
_ST_DTYPES = {
    "F32": (np.float32, torch.float32),
    "BF16": (np.uint16, torch.bfloat16),
    "F16": (np.float16, torch.float16),
    "I32": (np.int32, torch.int32),
}


class ShardError(PipelineError, RuntimeError):
    """A shard or manifest is missing, corrupt, truncated or inconsistent; the message names it."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def worker_manifest_name(worker: int, num_workers: int) -> str:
    return f"manifest.worker-{worker}-of-{num_workers}.json"


def checksum_name(shard: str) -> str:
    """The file holding a shard's sha256 from its writing until a manifest lists it."""
    return shard.replace(".safetensors", ".sha256")


@dataclass
class ShardRecord:
    name: str
    n_sequences: int
    sha256: str


@dataclass
class Manifest:
    """What a shard directory holds and where it came from (see DESIGN.md)."""

    model_id: str
    weights_hash: str
    hook: str
    d_model: int
    dtype: str
    context_length: int
    tokenizer_id: str
    bos_policy: str
    bos_token_id: int | None
    corpus_id: str
    sequences_per_shard: int
    shards: list[ShardRecord] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def n_sequences(self) -> int:
        return sum(s.n_sequences for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return self.n_sequences * self.context_length

    def identity(self) -> dict:
        """The fields that must agree before shards can be appended or resumed."""
        ident = asdict(self)
        del ident["shards"]
        return ident

    def differences(self, expected: dict, found_as: str = "existing") -> str:
        """The identity fields that differ from `expected`, for a message ("" when none do):
        `hook: existing 'a', now 'b'; ...`."""
        ident = self.identity()
        return "; ".join(
            f"{k}: {found_as} {ident.get(k)!r}, now {v!r}" for k, v in expected.items() if ident.get(k) != v
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["n_sequences"] = self.n_sequences
        data["n_tokens"] = self.n_tokens
        return json.dumps(data, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        data = dict(data)
        data.pop("n_sequences", None)
        data.pop("n_tokens", None)
        data["shards"] = [ShardRecord(**s) for s in data.get("shards", [])]
        return cls(**data)


def write_manifest(directory: Path, manifest: Manifest, name: str = MANIFEST) -> None:
    atomic_write(directory / name, manifest.to_json().encode())


def read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ShardError(f"unreadable manifest {path}: {err}") from err


def merge_worker_manifests(directory: Path) -> Manifest | None:
    """Unify the manifests of a sharded harvest; None while some worker has not finished."""
    parts = sorted(directory.glob("manifest.worker-*-of-*.json"))
    if not parts:
        return None
    manifests = [read_manifest(p) for p in parts]
    num_workers = int(parts[0].name.split("-of-")[1].removesuffix(".json"))
    expected = {worker_manifest_name(w, num_workers) for w in range(num_workers)}
    if not expected.issubset({p.name for p in parts}):
        return None
    first = manifests[0]
    for other, part in zip(manifests[1:], parts[1:], strict=True):
        if other.identity() != first.identity():
            raise ShardError(
                f"{part} was harvested with other settings than {parts[0]}; they cannot be merged"
            )
    shards = sorted((s for m in manifests for s in m.shards), key=lambda s: s.name)
    names = [s.name for s in shards]
    if names != [shard_name(i) for i in range(len(names))]:
        raise ShardError(f"worker manifests in {directory} leave gaps in the shard sequence: {names}")
    return Manifest(**{**first.identity(), "shards": shards})


def recorded_checksums(directory: Path) -> dict[str, str]:
    """The sha256 of every shard as its writer recorded it: in the manifests, and (newer) in the
    checksum files of shards no manifest lists yet. A shard missing here was never finished."""
    known = {}
    for path in [directory / MANIFEST, *sorted(directory.glob("manifest.worker-*-of-*.json"))]:
        if path.exists():
            known.update({record.name: record.sha256 for record in read_manifest(path).shards})
    for path in directory.glob("shard-*.sha256"):
        known[path.name.replace(".sha256", ".safetensors")] = path.read_text().strip()
    return known


def token_bytes(d_model: int, itemsize: int) -> int:
    """Bytes one stored position takes in a shard: its activations and its int32 token id."""
    return d_model * itemsize + 4


def write_shard(path: Path, tokens: torch.Tensor, activations: torch.Tensor) -> ShardRecord:
    """Write one shard as a safetensors file straight from the tensors' memory (deterministic bytes),
    then its checksum file."""
    tensors = {"activations": activations.contiguous(), "tokens": tokens.contiguous()}
    header, offset = {"__metadata__": {"format_version": str(FORMAT_VERSION)}}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _ST_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data buffer to 8 bytes
    buffers = [t.view(torch.uint8).numpy() if t.numel() else b"" for t in tensors.values()]
    sha = atomic_write(path, struct.pack("<Q", len(text)), text, *buffers)
    atomic_write(path.with_name(checksum_name(path.name)), sha.encode())
    return ShardRecord(path.name, tokens.shape[0], sha)


class ShardWriter:
    """Writes shards on background threads so hashing and disk I/O overlap the model forward.

    Each thread writes whole shards (a shard's sha256 is one sequential pass, so several shards are
    hashed at once: on a GPU the forward produces activations faster than one core hashes them).
    `submit` blocks while `threads + 1` shards wait (bounded memory). An error in a thread is
    re-raised by the next `submit` or by `close`; shards may land in any order. `then(path)` runs on
    the writing thread after each shard and its checksum file are written (e.g. to upload them).
    """

    def __init__(self, threads: int | None = None, then: Callable[[Path], None] | None = None):
        self.threads = threads or default_writer_threads()
        self._then = then
        self.records: dict[tuple[str, int], ShardRecord] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=self.threads + 1)
        self._error: BaseException | None = None
        self._workers = [
            threading.Thread(target=self._run, name=f"shard-writer-{i}", daemon=True) for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            key, path, tokens, activations = job
            if self._error is None:
                try:
                    record = write_shard(path, tokens, activations)
                    if self._then is not None:
                        self._then(path)
                    self.records[key] = record
                except BaseException as err:  # handed to the main thread
                    self._error = self._error or err

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(
        self, key: tuple[str, int], path: Path, tokens: torch.Tensor, activations: torch.Tensor
    ) -> None:
        self._raise_pending()
        self._queue.put((key, path, tokens, activations))

    def close(self) -> None:
        """Wait for every queued shard; raise the first write error, if any."""
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join()
        self._raise_pending()


def default_writer_threads() -> int:
    """Shard writers: up to 8, one core left to the forward and the tokenizer. On one H100 a 1B model's
    forward makes ~1.4 GB/s of bf16 activations and one writer hashed and wrote ~0.3 GB/s: 4 writers
    kept up with 0.83 of the forward, 8 with all of it."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# ---------------------------------------------------------------- reading


@dataclass
class _TensorInfo:
    np_dtype: type
    torch_dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file
    end: int  # of its last byte + 1 in the data buffer


def parse_shard_header(text: bytes, header_len: int, path: Path | str) -> dict[str, _TensorInfo]:
    """The tensors a safetensors header (`text`, the `header_len` bytes after the length) describes."""
    try:
        header = json.loads(text)
    except ValueError as err:
        raise ShardError(f"shard {path} is unreadable or corrupt ({err}); delete it and re-run harvest") from err
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _ST_DTYPES:
            raise ShardError(f"shard {path}: unsupported dtype {meta['dtype']} for {name!r}")
        np_dtype, torch_dtype = _ST_DTYPES[meta["dtype"]]
        start, stop = meta["data_offsets"]
        infos[name] = _TensorInfo(np_dtype, torch_dtype, tuple(meta["shape"]), 8 + header_len + start, stop)
    return infos


def read_shard_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse a safetensors header and check the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than file")
            text = f.read(header_len)
    except (OSError, ValueError, struct.error) as err:
        raise ShardError(
            f"shard {path} is unreadable or corrupt ({err}); delete it and re-run harvest"
        ) from err
    infos = parse_shard_header(text, header_len, path)
    end = max((info.end for info in infos.values()), default=0)
    if 8 + header_len + end != size or {"tokens", "activations"} - infos.keys():
        raise ShardError(
            f"shard {path} is truncated or incomplete ({size} bytes, header expects {8 + header_len + end}); "
            "delete it and re-run harvest to rewrite it"
        )
    return infos


def _memmap(path: Path, info: _TensorInfo) -> np.ndarray:
    return np.memmap(path, dtype=info.np_dtype, mode="r", offset=info.offset, shape=info.shape)


def read_shard_tokens(path: Path, header: dict[str, _TensorInfo] | None = None) -> torch.Tensor:
    """The int32 [n_seq, context_length] tokens of one shard (`header`: its already parsed header)."""
    info = (header or read_shard_header(path))["tokens"]
    return torch.from_numpy(np.array(_memmap(path, info)))


_WINDOW_FIELDS = ("model_id", "weights_hash", "context_length", "tokenizer_id", "bos_policy", "bos_token_id",
                  "corpus_id", "sequences_per_shard")  # fmt: skip


def check_same_windows(a: ShardSet, b: ShardSet) -> None:
    """Raise ShardError unless `a` and `b` hold the activations of the same token windows, shard by shard
    (two hooks of one harvest), so that one token index means the same token in both."""
    ident_a, ident_b = a.manifest.identity(), b.manifest.identity()
    differ = [f"{k}: {ident_a[k]!r} vs {ident_b[k]!r}" for k in _WINDOW_FIELDS if ident_a[k] != ident_b[k]]
    counts = ([r.n_sequences for r in a.manifest.shards], [r.n_sequences for r in b.manifest.shards])
    if counts[0] != counts[1]:
        differ.append("their shards hold different numbers of windows")
    if differ:
        raise ShardError(
            f"{a.directory} and {b.directory} do not hold the same token windows ({'; '.join(differ)}); "
            f"harvest both hooks in one run: harvest.hooks=[{a.manifest.hook},{b.manifest.hook}]"
        )


class ShardSet:
    """Memory-mapped view of a shard directory: random access and shuffled training batches.

    Nothing is loaded up front: activations are read through the OS page cache as batches touch
    them, so a shard set much larger than RAM trains with bounded memory. Each shard's sha256 is
    checked against the manifest before the first read from it (one sequential pass over the file);
    `verify=True` checks every shard at once. With a `cache` (remote.ShardCache: the shards sit on
    object storage), shards are mapped as the cache downloads them and unmapped once it drops them.
    """

    def __init__(self, directory: str | Path, verify: bool = False, cache=None):
        self.directory = Path(directory)
        self._cache = cache
        self.manifest = self._load_manifest()
        if not self.manifest.shards:
            raise ShardError(f"{self.directory} holds no shards; run the harvest stage first")
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (activations, tokens)
        self._torch_dtype = getattr(torch, self.manifest.dtype)
        if cache is None:
            for shard, record in enumerate(self.manifest.shards):
                path = self.directory / record.name
                if not path.exists():
                    raise ShardError(
                        f"shard {path} listed in the manifest is missing; re-run harvest to rewrite it"
                    )
                self._maps[shard] = self._map(path, record)
        self._checked = [cache is not None] * len(self.manifest.shards)  # a cache checks as it downloads
        seq_counts = torch.tensor([r.n_sequences for r in self.manifest.shards])
        # first global token index of each shard
        self._starts = (
            torch.cumsum(seq_counts * self.manifest.context_length, 0)
            - seq_counts * self.manifest.context_length
        )
        if verify:
            self.verify()

    def _map(self, path: Path, record: ShardRecord) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps (activations, tokens) of one shard file, its header checked against the manifest."""
        infos = read_shard_header(path)
        acts = infos["activations"]
        expected = (record.n_sequences, self.manifest.context_length, self.manifest.d_model)
        if acts.shape != expected:
            raise ShardError(f"shard {path} has activations of shape {acts.shape}, manifest says {expected}")
        self._torch_dtype = acts.torch_dtype
        return _memmap(path, acts), _memmap(path, infos["tokens"])

    def _arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(activations, tokens) of a shard, its bytes checked against the manifest."""
        if self._cache is None:
            self._check(shard)
        elif shard not in self._maps:
            record = self.manifest.shards[shard]
            self._maps[shard] = self._cache.open(record, lambda path: self._map(path, record))
            resident = self._cache.resident()
            for gone in [s for s in self._maps if self.manifest.shards[s].name not in resident]:
                del self._maps[gone]  # its file was evicted: let the disk space go
        return self._maps[shard]

    def _shard_tokens(self, shard: int) -> np.ndarray:
        """A shard's tokens [n_seq, context_length]; from a remote shard not downloaded, by a range read."""
        if self._cache is not None and shard not in self._maps:
            return self._cache.tokens(self.manifest.shards[shard])
        return self._arrays(shard)[1]

    def position_chunks(self, start: int, stop: int, size: int, exclude_bos: bool) -> Iterator[torch.Tensor]:
        """The token indices of [start, stop) in order, `size` at a time (fewer where BOS positions are
        left out, with `exclude_bos`; chunks left empty are skipped)."""
        bos = self.manifest.bos_token_id if exclude_bos else None
        for lo in range(start, stop, size):
            idx = torch.arange(lo, min(lo + size, stop))
            if bos is not None:
                idx = idx[self.tokens_at(idx) != bos]
            if len(idx):
                yield idx

    def position_norms(self, stop: int, exclude_bos: bool, block: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(activation norm of every position in [0, stop): float32 [stop], which of them count:
        bool [stop], False at BOS with `exclude_bos`), in one pass over those activations in order;
        the median of the counted norms is what outlier limits multiply."""
        norms = torch.cat(
            [self.gather(torch.arange(lo, min(lo + block, stop))).float().norm(dim=-1) for lo in range(0, stop, block)]
            or [torch.empty(0)]
        )
        bos = self.manifest.bos_token_id
        counted = torch.ones(stop, dtype=torch.bool)
        if exclude_bos and bos is not None:
            counted = self.tokens_at(torch.arange(stop)) != bos
        return norms, counted

    def shuffle_blocks(self, shuffle_shards: int | None) -> tuple[int, int]:
        """(block_tokens, mix_blocks) of iter_batches for `shuffle_shards` whole shards mixed at a time;
        None: blocks of 4096 tokens, 256 at a time, so every batch spreads over the whole range."""
        if shuffle_shards is None:
            return 4096, 256
        return self.manifest.sequences_per_shard * self.manifest.context_length, shuffle_shards

    def default_shuffle_shards(self, readers: int = 1) -> int | None:
        """None on local disk; on object storage, the shards of a group such that two groups (the one
        read and the next, read ahead) of each of `readers` shard sets sharing the cache fit in it."""
        if self._cache is None:
            return None
        itemsize = torch.empty(0, dtype=self._torch_dtype).element_size()
        shard_bytes = self.manifest.sequences_per_shard * self.manifest.context_length * token_bytes(self.d_model, itemsize)
        return max(1, self._cache.shards_held(shard_bytes) // (2 * readers))

    def prefetch_range(self, start: int, stop: int) -> None:
        """Start downloading the remote shards holding global token indices [start, stop)."""
        if self._cache is not None and start < stop:
            first, last = (int(torch.searchsorted(self._starts, t, right=True)) - 1 for t in (start, stop - 1))
            self._cache.prefetch(self.manifest.shards[first : last + 1])

    def _load_manifest(self) -> Manifest:
        path = self.directory / MANIFEST
        if path.exists():
            return read_manifest(path)
        merged = merge_worker_manifests(self.directory)
        if merged is not None:
            return merged
        if not self.directory.exists():
            raise ShardError(
                f"activation directory {self.directory} does not exist; run the harvest stage first"
            )
        raise ShardError(
            f"{self.directory} has no {MANIFEST}: the harvest is unfinished (or some workers have not "
            "finished); re-run the same harvest command to complete it"
        )

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def dtype(self) -> torch.dtype:
        return self._torch_dtype

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; raise ShardError naming the first bad one."""
        for shard in range(len(self.manifest.shards)):
            self._check(shard)

    def _check(self, shard: int) -> None:
        """Make sure shard `shard` holds the bytes the manifest vouches for, once per ShardSet."""
        if self._checked[shard]:
            return
        record = self.manifest.shards[shard]
        path = self.directory / record.name
        if file_sha256(path) != record.sha256:
            raise ShardError(
                f"shard {path} is corrupt: its sha256 does not match the manifest; re-run the harvest "
                "command, which recomputes it"
            )
        self._checked[shard] = True

    def check_finite(self, x: torch.Tensor, token_indices: torch.Tensor) -> None:
        """Stop at the first NaN / Inf of activations x [tokens, d_model] as `gather(token_indices)`
        returned them (in sorted index order)."""
        bad = ~torch.isfinite(x).all(-1)
        if bad.any():
            where = self.locate(int(token_indices.sort().values[int(bad.nonzero()[0, 0])]))
            raise ShardError(
                f"NaN or Inf in the stored activations at {where}; delete that shard and re-run the harvest command"
            )

    def locate(self, token_index: int) -> str:
        """Where a global token index is stored: shard file, window and position, for messages."""
        ctx = self.manifest.context_length
        shard = int(torch.searchsorted(self._starts, token_index, right=True)) - 1
        window, position = divmod(token_index, ctx)
        return f"{self.directory / self.manifest.shards[shard].name} (window {window}, position {position})"

    def _as_torch(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.require(array, requirements=["C", "W"]))
        return tensor.view(torch.bfloat16) if self._torch_dtype == torch.bfloat16 else tensor

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [context_length], activations [context_length, d_model]) of one stored window."""
        shard = int(torch.searchsorted(self._starts, index * self.manifest.context_length, right=True)) - 1
        acts, tokens = self._arrays(shard)
        if self._cache is not None:  # windows are read in order: fetch the next shards meanwhile
            ahead = self.manifest.shards[shard + 1 : shard + 1 + self._cache.read_ahead]
            self._cache.prefetch(ahead)
        local = index - int(self._starts[shard]) // self.manifest.context_length
        return torch.from_numpy(np.array(tokens[local])), self._as_torch(acts[local])

    def _by_shard(self, token_indices: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
        """(shard, mask into token_indices, indices local to that shard's flattened tokens)."""
        shard_of = torch.searchsorted(self._starts, token_indices, right=True) - 1
        for shard in torch.unique(shard_of).tolist():
            mask = shard_of == shard
            yield shard, mask, (token_indices[mask] - self._starts[shard]).numpy()

    def count_token(self, token: int, start: int = 0, stop: int | None = None) -> int:
        """How many positions in the global token range [start, stop) hold `token`."""
        stop = self.n_tokens if stop is None else stop
        count = 0
        for shard, record in enumerate(self.manifest.shards):
            lo = int(self._starts[shard])
            a, b = max(start, lo) - lo, min(stop, lo + record.n_sequences * self.manifest.context_length) - lo
            if a < b:
                tokens = self._shard_tokens(shard)
                count += int(np.count_nonzero(tokens.reshape(-1)[a:b] == token))
        return count

    def tokens_at(self, token_indices: torch.Tensor) -> torch.Tensor:
        """Token ids (int64) at global token indices."""
        out = torch.empty(len(token_indices), dtype=torch.int64)
        for shard, mask, local in self._by_shard(token_indices):
            out[mask] = torch.from_numpy(self._arrays(shard)[1].reshape(-1)[local].astype(np.int64))
        return out

    def gather(self, token_indices: torch.Tensor) -> torch.Tensor:
        """Activations [n, d_model] at global token indices, in the order given (read in sorted order,
        for locality)."""
        token_indices, order = torch.sort(token_indices)
        out = torch.empty(len(token_indices), self.d_model, dtype=self._torch_dtype)
        for shard, mask, local in self._by_shard(token_indices):
            out[order[mask]] = self._as_torch(self._arrays(shard)[0].reshape(-1, self.d_model)[local])
        return out

    def token_order(
        self,
        seed: int,
        block_tokens: int = 4096,
        mix_blocks: int = 256,
        start: int = 0,
        stop: int | None = None,
        companions: tuple[ShardSet, ...] = (),
    ) -> Iterator[torch.Tensor]:
        """Chunks of a pseudo-random permutation of the token indices in [start, stop), bounded memory.

        The index range is cut into blocks of `block_tokens`; block order is permuted, then
        `mix_blocks` blocks at a time are merged and permuted token by token. Each chunk is a random
        sample spread over the whole range, and reads stay local enough for the page cache.
        `companions`: shard sets of the same windows (other hooks) read at the same indices; on
        object storage, their shards are downloaded along.
        """
        gen = torch.Generator().manual_seed(seed)
        stop = self.n_tokens if stop is None else stop
        blocks = torch.randperm((stop - start + block_tokens - 1) // block_tokens, generator=gen)
        for i in range(0, len(blocks), mix_blocks):
            for shards in (self, *companions):
                if shards._cache is not None:  # remote: download this group's and the next one's shards
                    for block in blocks[i : i + 2 * mix_blocks].tolist():
                        shards.prefetch_range(start + block * block_tokens, min(stop, start + (block + 1) * block_tokens))
            idx = (
                start + blocks[i : i + mix_blocks, None] * block_tokens + torch.arange(block_tokens)
            ).flatten()
            idx = idx[idx < stop]
            yield idx[torch.randperm(len(idx), generator=gen)]

    def iter_batches(self, batch_size: int, **order) -> Iterator[torch.Tensor]:
        """One shuffled epoch of activation batches [batch_size, d_model] in the stored dtype, at the
        token indices `batch_positions(batch_size, **order)` gives."""
        return map(self.gather, self.batch_positions(batch_size, **order))

    def batch_positions(
        self,
        batch_size: int,
        seed: int = 0,
        exclude_bos: bool = False,
        start_batch: int = 0,
        block_tokens: int = 4096,
        mix_blocks: int = 256,
        start: int = 0,
        stop: int | None = None,
        keep: torch.Tensor | None = None,
        companions: tuple[ShardSet, ...] = (),
    ) -> Iterator[torch.Tensor]:
        """The token indices [batch_size] of one shuffled epoch of batches (see token_order).

        Deterministic for `seed`; `start_batch` skips ahead (for resuming). The last incomplete batch
        is dropped. With `exclude_bos`, positions holding the BOS token are left out, and with `keep`
        (bool over the token indices [0, stop)) those where it is False. Only token indices in
        [start, stop) are used (e.g. a training split).
        """
        bos = self.manifest.bos_token_id
        carry = torch.empty(0, dtype=torch.long)
        produced = 0
        for chunk in self.token_order(seed, block_tokens, mix_blocks, start, stop, companions):
            if exclude_bos and bos is not None:
                chunk = chunk[self.tokens_at(chunk) != bos]
            if keep is not None:
                chunk = chunk[keep[chunk]]
            chunk = torch.cat([carry, chunk])
            n_full = len(chunk) // batch_size
            for b in range(n_full):
                if produced >= start_batch:
                    yield chunk[b * batch_size : (b + 1) * batch_size]
                produced += 1
            carry = chunk[n_full * batch_size :]
