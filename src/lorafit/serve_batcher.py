"""Dynamic batching for `lorafit serve`: requests wait in one queue; a batch closes when its
padded tokens would pass a budget or its oldest text has waited long enough.

Each text is an `Item` for one engine (a served group or a model of its own); a batch holds
items of one engine, so one forward serves it. Which items: the oldest pending item's
engine, and of that engine's pending items a run of neighbours in length around the oldest
one (length-bucketed, as training batches are), as many as fit `max_batch_tokens` when
padded to the longest. The forward runs in one worker thread, so the event loop keeps
accepting requests; a forward that raises fails its own items only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(Exception):
    """More texts are waiting than the server takes; the client should retry later."""


@dataclass
class Item:
    engine: Hashable
    """Which model serves it; a batch holds items of one engine."""
    tokens: int
    """Its token count (after truncation): what padding is counted in."""
    payload: object
    """What the engine's forward needs (token ids, the run's name, ...)."""
    arrived: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None


def pick_batch(pending: list[Item], max_batch_tokens: int) -> list[Item]:
    """The next batch: the oldest item, and of its engine's items those nearest it in length
    while `len(batch) * longest <= max_batch_tokens` (the oldest always goes, even alone
    over the budget)."""
    oldest = min(pending, key=lambda it: it.arrived)
    mine = sorted((it for it in pending if it.engine == oldest.engine), key=lambda it: (it.tokens, it.arrived))
    i = mine.index(oldest)
    lo = hi = i  # the window mine[lo:hi + 1] grows toward the closer length on either side

    def fits(a: int, b: int) -> bool:
        return (b - a + 1) * mine[b].tokens <= max_batch_tokens

    while True:
        left = lo > 0 and fits(lo - 1, hi)
        right = hi + 1 < len(mine) and fits(lo, hi + 1)
        if not (left or right):
            break
        if left and (not right or oldest.tokens - mine[lo - 1].tokens <= mine[hi + 1].tokens - oldest.tokens):
            lo -= 1
        else:
            hi += 1
    return mine[lo:hi + 1]


class Batcher:
    """The queue, the batching policy and the worker thread.

    `forward(items) -> results` runs one batch (all of one engine) and returns one result
    per item, in order; it runs in a worker thread.
    """

    def __init__(self, forward: Callable[[list[Item]], list], *, max_batch_tokens: int = 16384,
                 max_wait_ms: float = 5.0, max_queue: int = 1024) -> None:
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.pending: list[Item] = []
        self.batch_sizes: deque[int] = deque(maxlen=100_000)
        """Sizes of the latest batches run."""
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafit-forward")
        """The one thread forwards run in; whatever changes the models runs there too."""
        self.on_batch: Callable[[int], None] | None = None
        """Called with each batch's size (metrics)."""

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Run what is queued, then stop."""
        while self.pending:
            await asyncio.sleep(self.max_wait)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    async def submit(self, items: list[Item]) -> list:
        """Queue `items` and wait for their results (an item whose batch failed raises its error).

        Raises:
            QueueFull: the queue holds `max_queue` texts already.
        """
        if len(self.pending) + len(items) > self.max_queue:
            raise QueueFull(f"{len(self.pending)} texts are waiting (at most {self.max_queue})")
        loop = asyncio.get_running_loop()
        for it in items:
            it.future = loop.create_future()
            self.pending.append(it)
        self._wake.set()
        return await asyncio.gather(*(it.future for it in items))

    def _ready(self) -> bool:
        """A batch closes when the oldest item has waited `max_wait`, or its engine's pending
        items fill the token budget."""
        oldest = min(self.pending, key=lambda it: it.arrived)
        if time.monotonic() - oldest.arrived >= self.max_wait:
            return True
        mine = [it for it in self.pending if it.engine == oldest.engine]
        return len(mine) * max(it.tokens for it in mine) >= self.max_batch_tokens

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._ready():
                left = min(it.arrived for it in self.pending) + self.max_wait - time.monotonic()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, left))
                except asyncio.TimeoutError:
                    pass
                continue
            batch = pick_batch(self.pending, self.max_batch_tokens)
            chosen = {id(it) for it in batch}
            self.pending = [it for it in self.pending if id(it) not in chosen]
            self.batch_sizes.append(len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self.pool, self.forward, batch)
            except Exception as exc:  # noqa: BLE001 - the batch's own requests get the error; serving goes on
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            for it, result in zip(batch, results):
                if not it.future.done():
                    it.future.set_result(result)
