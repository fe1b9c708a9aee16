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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.hooks import HookPoint, capture_activations
from pipeline.models import LoadedModel


class StreamError(PipelineError, ValueError):
    """The corpus cannot feed training as configured; the message says what to change."""


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
        """Activations {hook: [tokens, d_model]} of the given (window, positions) pieces, in order."""
        out: dict[str, list[torch.Tensor]] = {h.name: [] for h in self.hooks}
        bar = tqdm(total=len(pieces), unit="window", desc="activations", leave=False, disable=not self.progress)
        for start in range(0, len(pieces), self.forward_batch):
            group = pieces[start : start + self.forward_batch]
            ids = torch.stack([w for w, _ in group]).to(self.loaded.device, torch.long)
            acts = capture_activations(self.loaded.model, ids, self.hooks)
            for name, a in acts.items():  # a: [windows, context_length, d_model]
                out[name] += [a[i, p.to(a.device)].to(self.dtype) for i, (_, p) in enumerate(group)]
            bar.update(len(group))
        bar.close()
        return {name: torch.cat(parts) for name, parts in out.items()}

    def block(self, walk: WindowWalk, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Activations of tokens [lo, hi) of the training stream: {hook: [hi - lo, d_model]}."""
        return self.compute(walk.covering(lo, hi))

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """The first n training tokens' activations (for input scaling and the b_dec init)."""
        return self.block(WindowWalk(self), 0, n)

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
            order = torch.randperm(block_tokens, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))
            for i in range(offset, per_block):
                rows = order[i * batch_size : (i + 1) * batch_size]
                yield {name: a[rows.to(a.device)] for name, a in acts.items()}
            block, offset = block + 1, 0


class WindowWalk:
    """The training windows in order, each with its place in the stream of trained-on tokens; walks
    forward only (blocks are asked for in increasing order)."""

    def __init__(self, stream: ModelStream):
        self._stream = stream
        self._windows = stream.training_windows()
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
