import threading

import pytest

from pipeline.prefetch import prefetch


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
