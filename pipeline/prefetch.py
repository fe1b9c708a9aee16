"""Read-ahead: run an iterator on a background thread, or in a worker process, so producing items
overlaps consuming them."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.errors import PipelineError


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Run `iterator` on a background thread, `size` items ahead (reads and tokenization overlap
    compute). An error in the iterator is raised where the item it failed on would have been.
    Closing the returned generator (or dropping it) stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

    def fill():
        try:
            for item in iterator:
                items.put(item)
                if stop.is_set():
                    break
            else:
                items.put(done)
        except BaseException as err:
            items.put(err)
            items.put(done)
        finally:
            if hasattr(iterator, "close"):  # a generator's own clean-up runs now, on this thread
                iterator.close()

    threading.Thread(target=fill, name="prefetch", daemon=True).start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not items.empty():  # unblock a filler waiting to put, so it sees `stop`
            items.get_nowait()


def prefetch_process(make: Callable[[], Iterator[torch.Tensor]], size: int = 2) -> Iterator[torch.Tensor]:
    """The tensors of `make()`, computed in a forked worker process `size` items ahead.

    For work that holds the interpreter lock, such as a tokenizer's Python: on a GPU the forward is
    thousands of short kernel launches from Python, each taking that lock again, and a thread
    tokenizing beside it slowed the launches down severalfold. A worker process shares no lock with
    them. A PipelineError in `make()` is raised here as it is (other errors come with the worker's
    traceback); closing the returned generator stops the worker. Where processes cannot be forked
    (Windows), a thread does the work."""
    if "fork" not in multiprocessing.get_all_start_methods():
        yield from prefetch(make(), size)
        return
    loader = DataLoader(_Produced(make), batch_size=None, num_workers=1, prefetch_factor=size,
                        multiprocessing_context="fork")  # fmt: skip
    items = iter(loader)
    try:
        for item in items:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        # now, not whenever the iterator is collected: an error's traceback can keep it alive, and a
        # process forked meanwhile would inherit it
        items._shutdown_workers()


class _Failure:
    """A user-facing error raised in the worker, handed to the consumer as an item."""

    def __init__(self, error: PipelineError):
        self.error = error


class _Produced(IterableDataset):
    def __init__(self, make: Callable[[], Iterator[torch.Tensor]]):
        self._make = make

    def __iter__(self):
        try:
            yield from self._make()
        except PipelineError as err:
            yield _Failure(err)
