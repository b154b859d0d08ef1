"""The serving queue's batching (lorafit.serve_batcher): which texts share a forward, when a
batch closes, and that a failing forward fails only its own requests."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lorafit.serve_batcher import Batcher, Item, QueueFull, pick_batch


def items(spec):
    """[(engine, tokens), ...] -> Items arriving in that order."""
    now = time.monotonic()
    return [Item(engine=e, tokens=t, payload=i, arrived=now + i * 1e-3) for i, (e, t) in enumerate(spec)]


def test_a_batch_is_the_oldest_and_its_engines_nearest_lengths_within_the_budget():
    pending = items([("a", 50), ("b", 10), ("a", 10), ("a", 60), ("a", 200), ("a", 55), ("a", 52)])
    batch = pick_batch(pending, max_batch_tokens=4 * 60)
    assert all(it.engine == "a" for it in batch) and pending[0] in batch
    assert sorted(it.tokens for it in batch) == [50, 52, 55, 60]  # 4 x 60 = 240: the 10 and the 200 wait
    assert len(batch) * max(it.tokens for it in batch) <= 240
    # the oldest goes even alone over the budget
    assert pick_batch(items([("a", 500), ("a", 10)]), max_batch_tokens=100)[0].tokens == 500


def run(coro):
    return asyncio.run(coro)


def test_every_text_gets_its_own_result_and_batches_fill_the_budget():
    seen = []

    def forward(batch):
        seen.append([it.payload for it in batch])
        assert threading.current_thread().name.startswith("lorafit-forward")
        assert len({it.engine for it in batch}) == 1
        return [(it.engine, it.payload * 10) for it in batch]

    async def main():
        b = Batcher(forward, max_batch_tokens=8 * 16, max_wait_ms=20)
        b.start()
        reqs = [[Item(engine=e, tokens=16, payload=k * 10 + j) for j in range(3)]
                for k, e in enumerate(["x", "y"] * 10)]
        results = await asyncio.gather(*(b.submit(r) for r in reqs))
        await b.stop()
        return reqs, results, b.batch_sizes

    reqs, results, sizes = run(main())
    for r, got in zip(reqs, results):
        assert got == [(it.engine, it.payload * 10) for it in r]
    assert sum(sizes) == 60 and max(sizes) <= 8 and len(sizes) < 60  # batched, within the budget


def test_a_lone_request_waits_at_most_about_max_wait():
    async def main():
        b = Batcher(lambda batch: [0] * len(batch), max_batch_tokens=10_000, max_wait_ms=30)
        b.start()
        start = time.monotonic()
        await b.submit([Item(engine="a", tokens=5, payload=0)])
        took = time.monotonic() - start
        await b.stop()
        return took

    assert 0.025 <= run(main()) < 1.0


def test_a_failing_forward_fails_its_own_requests_and_serving_goes_on():
    def forward(batch):
        if any(it.payload == "bad" for it in batch):
            raise RuntimeError("forward failed")
        return ["ok"] * len(batch)

    async def main():
        b = Batcher(forward, max_batch_tokens=10_000, max_wait_ms=5)
        b.start()
        with pytest.raises(RuntimeError, match="forward failed"):
            await b.submit([Item(engine="a", tokens=5, payload="bad")])
        good = await b.submit([Item(engine="a", tokens=5, payload="fine")])
        await b.stop()
        return good

    assert run(main()) == ["ok"]


def test_a_full_queue_refuses_at_once():
    async def main():
        release = threading.Event()
        b = Batcher(lambda batch: (release.wait(5), [0] * len(batch))[1], max_batch_tokens=10, max_wait_ms=1,
                    max_queue=3)
        b.start()
        first = asyncio.ensure_future(b.submit([Item(engine="a", tokens=10, payload=0)]))
        await asyncio.sleep(0.05)  # the first is in the forward; three more fill the queue
        waiting = asyncio.ensure_future(b.submit([Item(engine="a", tokens=10, payload=i) for i in range(3)]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="3 texts are waiting"):
            await b.submit([Item(engine="a", tokens=10, payload=9)])
        release.set()
        await first
        await waiting
        await b.stop()

    run(main())
