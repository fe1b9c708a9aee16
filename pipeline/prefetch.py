"""Read-ahead: run an iterator on a background thread so producing items overlaps consuming them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator


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
