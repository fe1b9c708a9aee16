"""Training activations computed from the model while training (`train.source=model`): no shards.

The training stream is every corpus window after the stored ones (the stored windows hold the
held-out split, so nothing evaluated on is trained on), pass after pass, with BOS positions left
out. It is cut into blocks of `block_tokens` consecutive tokens; a block's windows go through the
truncated model together, and its tokens are served in an order shuffled by the block's own seed,
so every batch mixes tokens of ~block_tokens / context_length windows and memory stays bounded
(one block of activations: block_tokens x d_model in the storage dtype).

Under `torchrun`, process r takes blocks r, r + world, r + 2 world, ...: N processes compute N times
the activations. A training step fixes its block and its place in the block, so a resumed training
rebuilds exactly the batches an uninterrupted one would have drawn (the windows before the block are
tokenized again, not run through the model).

`model_stream` sets a training run's stream up: it stores the held-out split (harvesting it when
missing) and checks that the stored windows are the ones the stream would compute first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter

import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from pipeline.corpus import CorpusConfig, corpus_id, load_documents
from pipeline.errors import PipelineError
from pipeline.harvesting import HarvestConfig, corpus_windows, harvest_activations
from pipeline.hooks import HookPoint, capture_activations, validate_hooks
from pipeline.models import DTYPES, LoadedModel, ModelConfig, load_model
from pipeline.prefetch import prefetch
from pipeline.rundir import RunDir
from pipeline.shards import MANIFEST, ShardSet
from pipeline.splits import whole_windows
from pipeline.training import Dist, TrainConfig, TrainError

log = logging.getLogger(__name__)


class StreamError(PipelineError, ValueError):
    """The corpus cannot feed training as configured; the message says what to change."""


@dataclass
class StreamTimes:
    """Seconds a model stream spent, so that a training log says what bounds a train.source=model run."""

    forward: float = 0.0
    """computing blocks of activations (on CUDA, until the GPU finished them)"""
    waiting: float = 0.0
    """waiting for tokenized windows (the tokenizer thread behind the forward) and cutting them"""

    def summary(self, loop_seconds: float) -> str:
        """One line: the loop's seconds split into the forward, the wait for windows and the rest."""
        rest = max(loop_seconds - self.forward - self.waiting, 0.0)
        parts = [(self.forward, "computing activations"), (self.waiting, "waiting for tokenized windows"),
                 (rest, "in the SAE steps and the rest")]  # fmt: skip
        return f"the training loop's {loop_seconds:.1f} s: " + ", ".join(
            f"{seconds:.1f} s ({100 * seconds / max(loop_seconds, 1e-9):.0f} %) {what}" for seconds, what in parts
        )


@dataclass
class ModelStream:
    """Where training activations come from when they are computed, not read."""

    loaded: LoadedModel
    windows: Callable[[], Iterator[torch.Tensor]]
    """A fresh pass over the corpus windows (int [context_length] each), the stored ones included."""
    first_window: int
    """Windows before this one are stored (the held-out split among them): never trained on."""
    hooks: list[HookPoint]
    dtype: torch.dtype
    """Activations are rounded to this dtype, as harvest would store them."""
    forward_batch: int
    """Windows per forward pass."""
    bos_token_id: int | None
    """Positions holding this token are left out (None: none are)."""
    progress: bool = False
    """Show a progress bar while a block's windows go through the model (training waits meanwhile)."""
    read_ahead: int = 1024
    """Windows tokenized ahead on a thread (a block's worth overlaps the previous block's forward)."""
    norm_limits: dict[str, float] | None = None
    """train.exclude_outliers: positions whose activation norm exceeds its hook's limit at any hook
    are left out (None: none are)."""
    times: StreamTimes = field(default_factory=StreamTimes)
    """Where the blocks' time went (the training loop resets it when it starts, and logs it at its end)."""

    def training_windows(self) -> Iterator[torch.Tensor]:
        """The windows trained on, pass after pass over the corpus."""
        while True:
            seen = 0
            for index, window in enumerate(self.windows()):
                seen = index + 1
                if index >= self.first_window:
                    yield window
            if seen <= self.first_window:
                raise StreamError(
                    f"the corpus yields {seen} windows and the {self.first_window} stored ones (the held-out "
                    "split) are all of them: nothing is left to train on. Use a larger corpus, or fewer "
                    "held-out tokens (holdout_tokens)."
                )

    def positions(self, window: torch.Tensor) -> torch.Tensor:
        """The positions of a window that are trained on."""
        if self.bos_token_id is None:
            return torch.arange(len(window))
        return torch.nonzero(window != self.bos_token_id).flatten()

    @torch.inference_mode()
    def compute(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Activations {hook: [tokens, d_model]} of the given (window, positions) pieces, in order,
        written into one preallocated tensor per hook (memory: the block, once)."""
        n = sum(len(positions) for _, positions in pieces)
        d_model, device = self.loaded.d_model, self.loaded.device
        out = {h.name: torch.empty(n, d_model, dtype=self.dtype, device=device) for h in self.hooks}
        bar = tqdm(total=len(pieces), unit="window", desc="activations", leave=False, disable=not self.progress)
        row = 0
        for start in range(0, len(pieces), self.forward_batch):
            group = pieces[start : start + self.forward_batch]
            ids = torch.stack([w for w, _ in group]).to(device, torch.long)
            context = ids.shape[1]
            # the kept positions of the whole group as rows of [windows * context]: one gather per hook
            rows = torch.cat([i * context + positions for i, (_, positions) in enumerate(group)]).to(device)
            acts = capture_activations(self.loaded.model, ids, self.hooks)  # {hook: [windows, ctx, d_model]}
            for name, a in acts.items():  # rows moves again only where device_map put a hook elsewhere
                out[name][row : row + len(rows)] = a.flatten(0, 1).index_select(0, rows.to(a.device))
            row += len(rows)
            bar.update(len(group))
        bar.close()
        return out

    def block(self, walk: WindowWalk, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Activations of tokens [lo, hi) of the training stream: {hook: [hi - lo, d_model]} (timed)."""
        start = perf_counter()
        pieces = walk.covering(lo, hi)
        computing = perf_counter()
        acts = self.compute(pieces)
        if self.loaded.device.type == "cuda":  # the kernels were only queued: the forward ends when they do
            torch.cuda.synchronize(self.loaded.device)
        self.times.waiting += computing - start
        self.times.forward += perf_counter() - computing
        return acts

    def kept_rows(self, acts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The rows of a block {hook: [n, d_model]} below every hook's norm limit (None: all are kept)."""
        if self.norm_limits is None:
            return None
        keep = torch.ones(len(next(iter(acts.values()))), dtype=torch.bool)
        for name, a in acts.items():
            keep &= (a.float().norm(dim=-1) <= self.norm_limits[name]).cpu()
        if not keep.any():
            raise StreamError(
                f"every position of a block of {len(keep)} tokens is above the norm limits {self.norm_limits} "
                "(train.exclude_outliers x the median of the stored windows); raise train.exclude_outliers"
            )
        return torch.nonzero(keep).flatten()

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """The first n training tokens' activations, outliers left out (for input scaling and the b_dec init)."""
        acts = self.block(WindowWalk(self), 0, n)
        kept = self.kept_rows(acts)
        return acts if kept is None else {name: a[kept.to(a.device)] for name, a in acts.items()}

    def batches(
        self, batch_size: int, block_tokens: int, seed: int, start_step: int, rank: int = 0, world: int = 1
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This process' batches {hook: [batch_size, d_model]} from step `start_step` on; block_tokens is
        a multiple of batch_size."""
        per_block = block_tokens // batch_size
        block, offset = divmod(start_step, per_block)
        walk = WindowWalk(self)
        while True:
            index = block * world + rank
            acts = self.block(walk, index * block_tokens, (index + 1) * block_tokens)
            kept = self.kept_rows(acts)
            if kept is not None:
                log.info("stream block %d: %.2f%% of its positions are above the norm limits and left out",
                         index, 100 * (1 - len(kept) / block_tokens))  # fmt: skip
            order = block_order(block_tokens, kept, seed * 1_000_003 + index)
            orders = {name: order.to(a.device) for name, a in acts.items()}  # one upload a block, not a batch
            for i in range(offset, per_block):
                yield {name: a[orders[name][i * batch_size : (i + 1) * batch_size]] for name, a in acts.items()}
            del acts  # before the next block is computed: one block in memory at a time
            block, offset = block + 1, 0


def block_order(block_tokens: int, kept: torch.Tensor | None, seed: int) -> torch.Tensor:
    """The order a block's rows are served in: a permutation of them all, or of the `kept` ones
    repeated from its start until it is block_tokens long. So every block serves the same number of
    batches and a step fixes its block whatever was left out (with train.exclude_outliers at 2, ~1 %
    of a block's tokens are drawn twice in their place)."""
    gen = torch.Generator().manual_seed(seed)
    if kept is None:
        return torch.randperm(block_tokens, generator=gen)
    order = kept[torch.randperm(len(kept), generator=gen)]
    return order.repeat(math.ceil(block_tokens / len(order)))[:block_tokens]


class WindowWalk:
    """The training windows in order, each with its place in the stream of trained-on tokens; walks
    forward only (blocks are asked for in increasing order)."""

    def __init__(self, stream: ModelStream):
        self._stream = stream
        # tokenized on a thread, a block's worth ahead, while the previous block goes through the model
        self._windows = prefetch(stream.training_windows(), size=stream.read_ahead)
        self._start = 0  # trained-on tokens before the current window
        self._current: tuple[torch.Tensor, torch.Tensor] | None = None  # (window, its positions)

    def covering(self, lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(window, positions) pieces holding exactly tokens [lo, hi) of the stream, in order."""
        if lo < self._start:
            raise ValueError(f"tokens from {lo} were asked for after the walk passed {self._start}")
        pieces = []
        while True:
            if self._current is None:
                window = next(self._windows)
                self._current = (window, self._stream.positions(window))
            window, positions = self._current
            end = self._start + len(positions)
            if end > lo:
                pieces.append((window, positions[max(lo - self._start, 0) : hi - self._start]))
            if end > hi:  # the rest of this window starts the next block
                return pieces
            self._start, self._current = end, None
            if end == hi:
                return pieces


# ---------------------------------------------------------------- a run's stream


@dataclass
class ModelSource:
    """What `train.source=model` computes activations with: the model, the corpus, and the harvest
    settings that cut it into windows (and store the held-out split)."""

    model: ModelConfig
    corpus: CorpusConfig
    harvest: HarvestConfig


def check_stored(directory: Path, stored: ShardSet, loaded, source: ModelSource) -> None:
    """The stored (held-out) windows must be the ones the model stream would compute first."""
    expected = {
        "weights_hash": loaded.weights_hash,
        "corpus_id": corpus_id(source.corpus),
        "context_length": source.harvest.context_length,
        "bos_policy": source.harvest.bos_policy,
    }
    detail = stored.manifest.differences(expected, found_as="stored")
    if detail:
        raise TrainError(
            f"{directory} holds activations of other settings than train.source=model streams ({detail}); "
            "the held-out split must come from the same model and corpus windows. Use another run_dir, or "
            "the settings the activations were harvested with."
        )


def stored_for(stored: dict[str, ShardSet], hook: str) -> ShardSet:
    """`hook`'s stored activations, or the first hook's where `hook` has none (when no dictionary is
    at train.hook): every hook's hold the same windows of the same model."""
    return stored[hook] if hook in stored else next(iter(stored.values()))


def store_heldout(
    cfg: TrainConfig, source: ModelSource, run: RunDir, hooks: list[str], loaded, dist: Dist
) -> dict[str, ShardSet]:
    """Each hook's stored activations, harvesting the held-out windows where none are stored (process
    0 does, the others wait); all must hold the same windows, the first the model stream computes.
    A hook added to a run that stores others gets the windows they hold (a full harvest's too)."""
    present = {h: run.shards(h) for h in hooks if (run.activations(h) / MANIFEST).exists()}
    _check_stored_set(present, run, loaded, source)  # before harvesting anything more
    missing = [h for h in hooks if h not in present]
    if missing and dist.rank == 0:
        ctx = source.harvest.context_length
        windows, per_shard = whole_windows(cfg.holdout_tokens, ctx), source.harvest.sequences_per_shard
        if present:  # one stream feeds every hook: a new one gets the windows the others hold, in their shards
            held = next(iter(present.values())).manifest
            windows, per_shard = held.n_sequences, held.sequences_per_shard
        log.info("storing the held-out split (%d tokens) at %s; training tokens come from the model", windows * ctx,
                 ", ".join(missing))  # fmt: skip
        only_heldout = replace(source.harvest, hooks=missing, tokens=windows * ctx, sequences_per_shard=per_shard,
                               num_workers=1, worker=0)  # fmt: skip
        harvest_activations(source.model, source.corpus, only_heldout, run, loaded=loaded)
    if dist.enabled:
        torch_dist.barrier()
    stored = {h: present[h] if h in present else run.shards(h) for h in hooks}  # each opened once
    _check_stored_set(stored, run, loaded, source)
    return stored


def _check_stored_set(stored: dict[str, ShardSet], run: RunDir, loaded, source: ModelSource) -> None:
    """Every hook's stored activations come from what the stream computes, and hold the same windows."""
    for h, shards in stored.items():
        check_stored(run.activations(h), shards, loaded, source)
    windows = {h: shards.manifest.n_sequences for h, shards in stored.items()}
    if len(set(windows.values())) > 1:
        raise TrainError(
            f"the stored activations hold different numbers of windows per hook ({windows}); one stream feeds "
            "them all, so they must match. Harvest them together, or train these hooks in another run_dir."
        )


def model_stream(
    cfg: TrainConfig, source: ModelSource | None, run: RunDir, hooks: list[str], dist: Dist
) -> tuple[ModelStream, dict[str, ShardSet]]:
    """The model-computed training stream of every hook, and their stored (held-out) activations."""
    if source is None:
        raise TrainError("train.source=model needs the model, corpus and harvest settings (source=ModelSource)")
    if cfg.holdout_tokens == 0:
        raise TrainError("train.source=model stores only the held-out split, so holdout_tokens must be > 0")
    loaded = load_model(source.model)
    points = validate_hooks(loaded.model, list(dict.fromkeys(hooks)))
    stored = store_heldout(cfg, source, run, [p.name for p in points], loaded, dist)
    manifest = stored_for(stored, cfg.hook).manifest
    every_window = replace(source.harvest, tokens=None)
    documents = load_documents(source.corpus)  # once: each pass over the corpus only packs them again
    stream = ModelStream(
        loaded=loaded,
        windows=lambda: corpus_windows(loaded, source.corpus, every_window, documents),
        first_window=manifest.n_sequences,
        hooks=points,
        dtype=DTYPES[manifest.dtype],
        forward_batch=source.harvest.batch_size,
        bos_token_id=manifest.bos_token_id if cfg.exclude_bos else None,
        progress=cfg.progress and dist.rank == 0,
        read_ahead=cfg.buffer_tokens // source.harvest.context_length + source.harvest.batch_size,
        norm_limits=None if cfg.exclude_outliers is None else _norm_limits(stored, cfg.exclude_outliers, cfg.exclude_bos),
    )
    return stream, stored


def _norm_limits(stored: dict[str, ShardSet], multiple: float, exclude_bos: bool) -> dict[str, float]:
    """train.exclude_outliers' limit at each hook: `multiple` x the median activation norm over the
    stored windows (the training windows' norms are known only once the model computed them)."""
    limits = {}
    for hook, shards in stored.items():
        norms, counted = shards.position_norms(shards.n_tokens, exclude_bos)
        limits[hook] = multiple * float(norms[counted].median())
    log.info("train.exclude_outliers=%g: positions with an activation norm above %s are left out", multiple,
             ", ".join(f"{limit:.1f} at {hook}" for hook, limit in limits.items()))  # fmt: skip
    return limits
