import os
import threading

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.prefetch import prefetch, prefetch_process


def test_items_arrive_in_order():
    assert list(prefetch(iter(range(100)), size=3)) == list(range(100))


def test_an_error_in_the_iterator_is_raised_where_its_item_would_be():
    def numbers():
        yield 1
        yield 2
        raise ValueError("corpus broken")

    got = []
    with pytest.raises(ValueError, match="corpus broken"):
        for item in prefetch(numbers()):
            got.append(item)
    assert got == [1, 2]


def test_closing_the_consumer_stops_the_reading_thread():
    produced = []
    finished = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                produced.append(n)
                yield n
                n += 1
        finally:
            finished.set()

    items = prefetch(endless(), size=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()
    assert finished.wait(timeout=10)  # the thread left the iterator instead of blocking forever
    assert len(produced) <= 5 + 2 + 2  # it read at most a queue's worth beyond what was taken


def test_a_worker_process_yields_the_tensors_in_order():
    items = prefetch_process(lambda: (torch.full((3,), i) for i in range(50)), size=3)
    assert [int(t[0]) for t in items] == list(range(50))


class CorpusBroken(PipelineError, ValueError):
    pass


def test_a_pipeline_error_in_the_worker_is_raised_as_it_is():
    def tensors():
        yield torch.zeros(1)
        raise CorpusBroken("the corpus holds 3 tokens")

    got = []
    with pytest.raises(CorpusBroken, match="^the corpus holds 3 tokens$"):
        for item in prefetch_process(tensors):
            got.append(item)
    assert len(got) == 1


def test_closing_the_consumer_stops_the_worker_process():
    def endless():
        while True:
            yield torch.tensor([os.getpid()])

    items = prefetch_process(endless, size=2)
    worker = int(next(items)[0])
    assert worker != os.getpid()
    items.close()
    with pytest.raises(ProcessLookupError):  # ended and reaped, not left running
        os.kill(worker, 0)
