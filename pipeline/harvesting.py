"""Harvesting: stream a corpus through a model and store activations at hook points as shards
(the harvest stage, stages/harvest.py, is its command line; the train stage harvests the held-out
windows with it when it trains from the model).

Writes `<run_dir>/activations/<hook>/shard-*.safetensors` and `manifest.json` (see shards.py).
Crash-safe and resumable: re-running the same command after a kill keeps every complete shard whose
bytes match the checksum recorded when it was written and which holds the same tokens, and computes
only the rest; the result is byte-identical to an uninterrupted run. `num_workers` / `worker` split
the shards between processes (e.g. a SLURM array); each writes its own shards (under its own lock,
locks.py) and the last to finish writes the merged manifest.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.config import check_settings
from pipeline.corpus import (
    BOS_POLICIES,
    CorpusConfig,
    corpus_id,
    iter_texts,
    load_documents,
    pack_windows,
    special_token_ids,
    window_groups,
)
from pipeline.errors import PipelineError
from pipeline.faults import kill_point
from pipeline.fileio import file_sha256, free_bytes, human_bytes, stale_temporaries
from pipeline.hooks import HookPoint, capture_activations, validate_hooks
from pipeline.locks import exclusive
from pipeline.models import DTYPES, LoadedModel, ModelConfig, dtype_name, load_model, resolve_dtype
from pipeline.prefetch import prefetch
from pipeline.rundir import RunDir
from pipeline.shards import (
    MANIFEST,
    Manifest,
    ShardError,
    ShardRecord,
    ShardWriter,
    checksum_name,
    default_writer_threads,
    merge_worker_manifests,
    read_manifest,
    read_shard_header,
    read_shard_tokens,
    recorded_checksums,
    shard_name,
    token_bytes,
    worker_manifest_name,
    write_manifest,
)
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

STATE_FILE = "harvest-state.json"
STORAGE_DTYPES = ("auto", *DTYPES)


class HarvestError(PipelineError, ValueError):
    """The harvest cannot start or continue as configured; the message says how to fix it."""


@dataclass
class HarvestConfig:
    """What to harvest and how."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.9.resid_post"])
    """Hook points `blocks.<L>.<resid_pre|resid_mid|resid_post|attn_out|mlp_out>`, all in one pass."""
    tokens: int | None = None
    """Total tokens to harvest over all workers; null harvests the whole corpus."""
    context_length: int = 256
    """Tokens per window (sequence)."""
    bos_policy: str = "window"
    """window (BOS starts every window) | document (BOS starts every document) | none."""
    batch_size: int = 8
    """Windows per forward pass."""
    sequences_per_shard: int = 256
    """Windows per shard file; a shard is the unit of crash-safe progress."""
    dtype: str = "auto"
    """Storage dtype: float32 | bfloat16 | float16 | auto (bf16 on GPU, the model's dtype on CPU)."""
    num_workers: int = 1
    """Processes sharing this harvest (shard s belongs to worker s % num_workers)."""
    worker: int = 0
    """This process' index in 0..num_workers-1."""
    progress: bool = True
    """Show a progress bar with tokens/s."""

    def __post_init__(self) -> None:
        check_settings(
            self, "harvest", HarvestError,
            positive=("context_length", "batch_size", "sequences_per_shard", "num_workers", "tokens"),
            choices={"bos_policy": BOS_POLICIES, "dtype": STORAGE_DTYPES},
        )  # fmt: skip
        if not 0 <= self.worker < self.num_workers:
            raise HarvestError(
                f"harvest.worker={self.worker} must lie in 0..{self.num_workers - 1} (num_workers)"
            )
        if self.tokens is not None and self.tokens < self.context_length:
            raise HarvestError(
                f"harvest.tokens={self.tokens} is less than one window of context_length={self.context_length}"
            )


def storage_dtype(name: str, loaded: LoadedModel) -> torch.dtype:
    """`auto` stores bf16 on GPU and, on CPU, the model's own dtype (lossless: bf16 compute stays bf16)."""
    if name == "auto" and loaded.device.type != "cuda":
        return loaded.dtype
    return resolve_dtype(name, loaded.device)


def _identity(
    loaded: LoadedModel, corpus: CorpusConfig, cfg: HarvestConfig, hook: str, dtype: torch.dtype
) -> Manifest:
    return Manifest(
        model_id=loaded.model_id,
        weights_hash=loaded.weights_hash,
        hook=hook,
        d_model=loaded.d_model,
        dtype=dtype_name(dtype),
        context_length=cfg.context_length,
        tokenizer_id=loaded.tokenizer_id,
        bos_policy=cfg.bos_policy,
        bos_token_id=special_token_ids(loaded.tokenizer)[0] if cfg.bos_policy != "none" else None,
        corpus_id=corpus_id(corpus),
        sequences_per_shard=cfg.sequences_per_shard,
    )


def _check_compatible(directory: Path, planned: Manifest) -> None:
    """Refuse to mix shards of another model, hook, d_model, dtype or corpus into this directory."""
    sources = [
        directory / MANIFEST,
        directory / STATE_FILE,
        *sorted(directory.glob("manifest.worker-*.json")),
    ]
    for path in sources:
        if not path.exists():
            continue
        detail = read_manifest(path).differences(planned.identity())
        if detail:
            raise HarvestError(
                f"{directory} already holds activations harvested with other settings ({detail}). "
                "Use another run_dir, or delete that directory to start over."
            )


def _claim(run: RunDir, dirs: dict[str, Path], planned: dict[str, Manifest]) -> None:
    """Record what this directory is being filled with, before its first shard lands."""
    for name, directory in dirs.items():
        if not (directory / STATE_FILE).exists():
            write_manifest(directory, planned[name], STATE_FILE)
            run.upload(directory / STATE_FILE)


def _remove_stale_temporaries(directory: Path, cfg: HarvestConfig, remote: bool) -> None:
    """Delete the temporary files a killed run of this worker left behind: its shards, their checksum
    files and its manifest (with one worker, every temporary file in the directory is its own). For
    a remote run also the shards it staged here: killed before or after their upload, the bucket
    says which are done, and the local copies would stay on the disk for good."""
    own_manifest = worker_manifest_name(cfg.worker, cfg.num_workers)
    for tmp, target in stale_temporaries(directory):
        if cfg.num_workers == 1 or _own_shard(target, cfg) or target == own_manifest:
            tmp.unlink(missing_ok=True)
    if remote:
        for staged in directory.glob("shard-*.safetensors"):
            if _own_shard(staged.name, cfg):
                staged.unlink()


def _own_shard(name: str, cfg: HarvestConfig) -> bool:
    return name.startswith("shard-") and int(name[6:11]) % cfg.num_workers == cfg.worker


def _completed_shard(
    run: RunDir, path: Path, tokens: torch.Tensor, d_model: int, dtype: torch.dtype, expected: str | None
) -> ShardRecord | None:
    """The record of an already written shard holding exactly these tokens and the bytes its writer
    recorded (sha256 `expected`), else None: the shard is then computed again."""
    if run.remote:
        return _completed_remote_shard(run, path, tokens, d_model, dtype, expected)
    if not path.exists():
        return None
    if expected is None:
        log.info(
            "%s has no recorded checksum (its writer was killed before recording it); recomputing it", path
        )
        return None
    if file_sha256(path) != expected:
        log.warning("%s does not hold the bytes recorded when it was written (corrupt); recomputing it", path)
        return None
    try:
        header = read_shard_header(path)
    except ShardError as err:
        log.warning("%s; rewriting it", err)
        return None
    return _same_shard(path, header, read_shard_tokens(path, header), tokens, d_model, dtype, expected)


def _same_shard(
    where, header: dict, stored: torch.Tensor, tokens: torch.Tensor, d_model: int, dtype: torch.dtype, sha: str
) -> ShardRecord | None:
    """The record of a shard whose header and tokens are those planned, else None (wrong shape or
    dtype: computed again); other tokens at the same place mean the corpus changed: an error."""
    acts = header["activations"]
    if acts.shape != (*tokens.shape, d_model) or acts.torch_dtype != dtype:
        return None
    if not torch.equal(stored, tokens):
        raise HarvestError(
            f"{where} holds other tokens than this corpus now yields for it: the corpus or its packing "
            "changed since it was written. Use another run_dir, or delete that directory to start over."
        )
    return ShardRecord(Path(str(where)).name, tokens.shape[0], sha)


def _completed_remote_shard(
    run: RunDir, path: Path, tokens: torch.Tensor, d_model: int, dtype: torch.dtype, expected: str | None
) -> ShardRecord | None:
    """As _completed_shard, for a shard on object storage: it counts as written when its checksum was
    recorded (after its upload finished) and its header and tokens, read by range, are those planned.
    Its bytes are checked against the checksum when a stage downloads it."""
    if expected is None or not run.remote.exists(path):
        return None
    try:
        header, stored = run.remote.shard_tokens(path)
    except ShardError as err:
        log.warning("%s; rewriting it", err)
        return None
    return _same_shard(run.remote.url_of(path), header, torch.from_numpy(stored.copy()), tokens, d_model, dtype, expected)


def forward_shard(
    loaded: LoadedModel,
    hooks: list[HookPoint],
    tokens: torch.Tensor,
    batch_size: int,
    dtype: torch.dtype,
    on_batch: Callable[[int], None] = lambda n: None,
) -> dict[str, torch.Tensor]:
    """Run one shard's windows through the truncated model: {hook: [n_seq, context_length, d_model]}."""
    n_seq, context_length = tokens.shape
    # on CUDA: page-locked memory, so copies run asynchronously, beside the next batch's forward
    pinned = loaded.device.type == "cuda"
    out = {
        h.name: torch.empty(n_seq, context_length, loaded.d_model, dtype=dtype, pin_memory=pinned) for h in hooks
    }
    copies = HostCopies()
    with torch.inference_mode():
        for start in range(0, n_seq, batch_size):
            ids = tokens[start : start + batch_size].to(loaded.device, dtype=torch.long, non_blocking=pinned)
            for name, acts in capture_activations(loaded.model, ids, hooks).items():
                copies.copy(out[name][start : start + len(ids)], acts.to(dtype))
            on_batch(ids.numel())
    copies.wait()
    return out


class HostCopies:
    """Copies from the GPU into page-locked host memory on a side stream per device, so they overlap
    the compute stream's next kernels instead of queueing between them; CPU sources copy at once."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def copy(self, host: torch.Tensor, source: torch.Tensor) -> None:
        if source.device.type != "cuda":
            host.copy_(source)
            return
        if source.device not in self._streams:
            self._streams[source.device] = torch.cuda.Stream(source.device)
        stream = self._streams[source.device]
        stream.wait_stream(torch.cuda.current_stream(source.device))  # the kernels computing `source`
        with torch.cuda.stream(stream):
            host.copy_(source, non_blocking=True)
        source.record_stream(stream)  # its memory is not reused before the copy has read it

    def wait(self) -> None:
        """Until every copy has landed."""
        for stream in self._streams.values():
            stream.synchronize()


def corpus_windows(
    loaded: LoadedModel, corpus_cfg: CorpusConfig, cfg: HarvestConfig, documents=None
) -> Iterator[torch.Tensor]:
    """The corpus packed into windows, as many as `cfg.tokens` asks for (whole windows; all when None).
    `documents`: the corpus' documents already loaded (load_documents), for passes after the first."""
    documents = load_documents(corpus_cfg) if documents is None else documents
    windows = pack_windows(
        iter_texts(documents, corpus_cfg.text_field),
        loaded.tokenizer,
        cfg.context_length,
        cfg.bos_policy,
    )
    if cfg.tokens is not None:
        windows = itertools.islice(windows, cfg.tokens // cfg.context_length)
    return windows


def _prepare(
    loaded: LoadedModel, corpus_cfg: CorpusConfig, cfg: HarvestConfig, run: RunDir
) -> tuple[list[HookPoint], torch.dtype, dict[str, Path], dict[str, Manifest]]:
    """Check the settings against the model and the directories; (hooks, storage dtype, directory and
    planned manifest of each hook)."""
    hooks = validate_hooks(loaded.model, list(cfg.hooks))
    if loaded.max_context is not None and cfg.context_length > loaded.max_context:
        raise HarvestError(
            f"harvest.context_length={cfg.context_length} exceeds the model's limit of {loaded.max_context} "
            "positions; choose harvest.context_length <= that"
        )
    dtype = storage_dtype(cfg.dtype, loaded)
    dirs = {h.name: run.activations(h.name) for h in hooks}
    planned = {h.name: _identity(loaded, corpus_cfg, cfg, h.name, dtype) for h in hooks}
    for name, directory in dirs.items():
        _check_compatible(directory, planned[name])
    if run.remote:
        _state_remote_size(cfg, loaded.d_model, dtype, run, len(dirs))
    else:
        check_disk_space(cfg, loaded.d_model, dtype, list(dirs.values()))
    return hooks, dtype, dirs, planned


def check_disk_space(cfg: HarvestConfig, d_model: int, dtype: torch.dtype, dirs: list[Path]) -> None:
    """State the disk this worker's shards need and refuse to start when the run directory's disk has
    less free space (shards already there count as written)."""
    if cfg.tokens is None:
        log.info("harvest.tokens=null: the disk needed grows with the corpus (%s per token and hook)",
                 human_bytes(token_bytes(d_model, dtype.itemsize)))  # fmt: skip
        return
    tokens = -(-cfg.tokens // cfg.num_workers)
    per_hook = tokens * token_bytes(d_model, dtype.itemsize)
    written = sum(p.stat().st_size for d in dirs for p in d.glob("shard-*.safetensors"))
    needed = per_hook * len(dirs) - written
    free = free_bytes(dirs[0])
    size = f"{tokens} tokens x d_model {d_model} x {dtype.itemsize} bytes x {len(dirs)} hook{'s' * (len(dirs) > 1)}"
    there = f", {human_bytes(written)} of it already written" if written else ""
    log.info("harvest writes %s (%s%s); %s free at %s", human_bytes(per_hook * len(dirs)), size, there,
             human_bytes(free), dirs[0])  # fmt: skip
    if needed > free:
        raise HarvestError(
            f"harvest needs {human_bytes(needed)} more at {dirs[0]} ({size}) but the disk has "
            f"{human_bytes(free)} free: {human_bytes(needed - free)} missing. Harvest fewer tokens "
            "(harvest.tokens), choose a run_dir on "
            "a larger disk, or train straight from the model without storing activations (train.source=model)."
        )


def _state_remote_size(cfg: HarvestConfig, d_model: int, dtype: torch.dtype, run: RunDir, hooks: int) -> None:
    """Say what goes to object storage and the little that passes through the local disk (the shards
    being written and uploaded); refuse to start when even that does not fit."""
    per_token = token_bytes(d_model, dtype.itemsize)
    staged = cfg.sequences_per_shard * cfg.context_length * per_token * hooks * (default_writer_threads() + 2)
    free = free_bytes(run.root)
    total = "a size growing with the corpus" if cfg.tokens is None else human_bytes(cfg.tokens * per_token * hooks)
    log.info("harvest writes %s to %s; at most %s at a time passes through %s (%s free)",
             total, run.location, human_bytes(staged), run.root, human_bytes(free))  # fmt: skip
    if staged > free:
        raise HarvestError(
            f"harvest stages up to {human_bytes(staged)} of shards at {run.root} before uploading them, "
            f"but that disk has {human_bytes(free)} free; set SAE_PIPELINE_CACHE to a larger disk or lower "
            "harvest.sequences_per_shard"
        )


def _write_shards(
    run: RunDir,
    loaded: LoadedModel,
    hooks: list[HookPoint],
    dirs: dict[str, Path],
    planned: dict[str, Manifest],
    windows: Iterator[torch.Tensor],
    cfg: HarvestConfig,
    dtype: torch.dtype,
) -> tuple[dict[str, dict[int, ShardRecord]], int]:
    """Compute and write this worker's shards, keeping those already complete; ({hook: {shard index:
    record}}, number of shards kept)."""
    records: dict[str, dict[int, ShardRecord]] = {name: {} for name in dirs}
    checksums = {name: recorded_checksums(directory) for name, directory in dirs.items()}
    writer = ShardWriter(then=_uploader(run))
    resumed = 0
    total = cfg.tokens // cfg.num_workers if cfg.tokens else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress)
    # tokenization runs ahead on a thread, overlapping the forward and the writers
    shards = prefetch(window_groups(windows, cfg.sequences_per_shard))
    try:
        for index, tokens in enumerate(shards):
            if index % cfg.num_workers != cfg.worker:
                continue
            kill_point("harvest.shard", index)
            name = shard_name(index)
            done = {
                n: _completed_shard(run, d / name, tokens, loaded.d_model, dtype, checksums[n].get(name))
                for n, d in dirs.items()
            }
            if all(done.values()):
                for name, record in done.items():
                    records[name][index] = record
                resumed += 1
                bar.update(tokens.numel())
                continue
            acts = forward_shard(loaded, hooks, tokens, cfg.batch_size, dtype, bar.update)
            _claim(run, dirs, planned)
            for name, directory in dirs.items():
                writer.submit((name, index), directory / shard_name(index), tokens, acts[name])
    finally:
        shards.close()
        bar.close()
        writer.close()
    for (name, index), record in writer.records.items():
        records[name][index] = record
    return records, resumed


def _uploader(run: RunDir) -> Callable[[Path], None] | None:
    """For a remote run: after a shard is written, upload it, then its checksum file (so a recorded
    checksum means a whole shard), and free the local disk of it."""
    if run.remote is None:
        return None

    def upload(path: Path) -> None:
        run.upload(path)
        run.upload(path.with_name(checksum_name(path.name)))
        path.unlink()

    return upload


def harvest_activations(
    model_cfg: ModelConfig,
    corpus_cfg: CorpusConfig,
    cfg: HarvestConfig,
    run_dir: str | Path | RunDir,
    loaded: LoadedModel | None = None,
    wandb_cfg: WandbConfig | None = None,
) -> dict[str, Manifest]:
    """Harvest (or resume, or extend) activations into `<run_dir>/activations/<hook>/`.

    Returns each hook's manifest: the merged one, or this worker's part while other workers of a
    sharded harvest are still running. `loaded` reuses an already loaded model; with `wandb_cfg`,
    a W&B run of the run directory's group records what was harvested and how fast.
    """
    run = RunDir.open(run_dir)
    loaded = loaded or load_model(model_cfg)
    hooks, dtype, dirs, planned = _prepare(loaded, corpus_cfg, cfg, run)
    started = time.perf_counter()
    with contextlib.ExitStack() as locks:
        for directory in dirs.values():
            part = f"worker-{cfg.worker}-of-{cfg.num_workers}"
            locks.enter_context(exclusive(directory, f"the activations in {directory} ({part})", part))
            directory.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(directory, cfg, run.remote is not None)
        windows = corpus_windows(loaded, corpus_cfg, cfg)
        records, resumed = _write_shards(run, loaded, hooks, dirs, planned, windows, cfg, dtype)
        manifests = {name: _finish(run, dirs[name], planned[name], records[name], cfg) for name in dirs}
    elapsed = time.perf_counter() - started
    shards = next(iter(records.values()))  # {index: record} of the first hook (every hook has the same shards)
    n_tokens = sum(r.n_sequences for r in shards.values()) * cfg.context_length
    done = " (all already there: checksums and tokens checked, nothing computed)" if resumed == len(shards) else (
        f" ({resumed} shards resumed)")
    log.info("harvested %d tokens at %d hook%s in %.1fs%s into %s", n_tokens, len(hooks), "s" * (len(hooks) > 1),
             elapsed, done, ", ".join(map(str, dirs.values())))  # fmt: skip
    if run.remote:
        log.info("uploaded to %s", run.location)
    if wandb_cfg is not None:
        _log_harvest(wandb_cfg, run, cfg, manifests, n_tokens, elapsed, resumed)
    return manifests


def _log_harvest(
    wandb_cfg: WandbConfig, run: RunDir, cfg: HarvestConfig, manifests: dict[str, Manifest], n_tokens: int,
    seconds: float, resumed: int,
) -> None:  # fmt: skip
    tracker = Tracker(wandb_cfg, run.root, "harvest", {"harvest": asdict(cfg)}, group=run.location,
                      detail=f"worker {cfg.worker} of {cfg.num_workers}" if cfg.num_workers > 1 else "")  # fmt: skip
    speed = {"seconds": round(seconds, 1), "tokens_per_second": round(n_tokens / max(seconds, 1e-9)), "shards_resumed": resumed}
    tracker.summary({"tokens": n_tokens, **speed})
    tracker.table("activations", [{"hook": hook, "tokens": m.n_tokens, "shards": len(m.shards), "dtype": m.dtype,
                                   "d_model": m.d_model, **speed} for hook, m in manifests.items()])  # fmt: skip
    tracker.finish()


def _finish(
    run: RunDir, directory: Path, planned: Manifest, records: dict[int, ShardRecord], cfg: HarvestConfig
) -> Manifest:
    """Write this worker's manifest (and the merged one once every worker is done)."""
    manifest = Manifest(**{**planned.identity(), "shards": [records[i] for i in sorted(records)]})
    if cfg.num_workers > 1:
        part = worker_manifest_name(cfg.worker, cfg.num_workers)
        write_manifest(directory, manifest, part)
        run.upload(directory / part)
        _remove_checksum_files(run, directory, records)
        run.refresh(directory)  # the other workers' manifests
        merged = merge_worker_manifests(directory)
        if merged is None:
            log.info("%s: waiting for the other workers; the last to finish writes %s", directory, MANIFEST)
            return manifest
        manifest = merged
    existing = directory / MANIFEST
    if (
        not existing.exists() or existing.read_text() != manifest.to_json() or run.remote
    ):  # a finished re-run changes nothing
        write_manifest(directory, manifest)
        run.upload(existing)
    _remove_checksum_files(run, directory, records)
    run.remove(directory / STATE_FILE)
    return manifest


def _remove_checksum_files(run: RunDir, directory: Path, records: dict[int, ShardRecord]) -> None:
    """A manifest now lists these shards with their checksums: their checksum files are done."""
    for record in records.values():
        run.remove(directory / checksum_name(record.name))
