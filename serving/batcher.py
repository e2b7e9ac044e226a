"""``MicroBatcher``: one worker thread runs the model for many concurrent requests.

HTTP handlers never run the model on the event loop: they ``await`` a future that this
thread resolves. The thread takes the first waiting request, then everything else already
waiting (up to ``max_examples`` examples, optionally waiting ``max_wait_s`` for more), and
makes **one** model call for all of them. Under load the batch grows by itself (requests
arriving during one call form the next batch), so the model runs fewer, larger calls and
the GIL is not fought over by a thread pool.

Example::

    >>> import asyncio
    >>> b = MicroBatcher(lambda items: ([x * 2 for x in items], "v1"), size=lambda x: 1)
    >>> async def main():
    ...     return await asyncio.gather(*(b.submit(i) for i in range(3)))
    >>> asyncio.run(main())
    [(0, 'v1'), (2, 'v1'), (4, 'v1')]
    >>> b.close()
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from monolith_py.errors import UnavailableError
from monolith_py.observe.metrics import histogram

__all__ = ["MicroBatcher", "OverloadedError"]

T = TypeVar("T")
R = TypeVar("R")

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class OverloadedError(UnavailableError):
    """Too many examples are waiting; the request is refused (HTTP 503)."""


def _resolve(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():  # the client went away (cancelled)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class MicroBatcher(Generic[T, R]):
    """Runs ``run(items) -> (results, tag)`` on a worker thread over batches of items.

    Args:
        run: takes the items of a batch, returns one result per item and a tag (the model
            version) shared by the batch. An exception fails every item of the batch.
        size: examples in one item (counted against ``max_examples``).
        max_examples: most examples in one call (a larger single item still runs alone).
        max_wait_s: how long to wait for more items after the first (0: take only what
            is already waiting).
        max_queued: most examples waiting; beyond it :meth:`submit` raises
            :class:`OverloadedError`.
        inline: run the model on the event loop itself (one thread, no handoffs; the loop
            is busy during each model call) instead of on a worker thread.
        thread_init: called once on the thread that runs the model, before its first
            call (e.g. ``torch.set_num_threads``: OpenMP settings are per thread, and a
            new thread would otherwise spin up one OpenMP worker per core for every
            small op).
    """

    def __init__(self, run: Callable[[Sequence[T]], tuple[Sequence[R], str]], *,
                 size: Callable[[T], int], max_examples: int = 1024, max_wait_s: float = 0.0,
                 max_queued: int = 65536, inline: bool = False,
                 thread_init: Callable[[], None] | None = None) -> None:
        self._run = run
        self._size = size
        self._max = int(max_examples)
        self._wait = float(max_wait_s)
        self._max_queued = int(max_queued)
        self._queued = 0
        self._mu = threading.Lock()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._m_batch = histogram("monolith_serving_batch_examples",
                                  "Examples per model call.", buckets=_BATCH_BUCKETS)
        self._m_run = histogram("monolith_serving_model_seconds", "Time of one model call.")
        self._inline = bool(inline)
        self._init = thread_init
        self._pending: list[Any] = []
        self._scheduled = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="serving-batcher", daemon=True)
        if not self._inline:
            self._thread.start()

    def submit(self, item: T) -> asyncio.Future[tuple[R, str]]:
        """Queue ``item``; the returned future (of the running loop) gets
        ``(result, tag)``."""
        n = self._size(item)
        with self._mu:
            if self._closed:
                raise UnavailableError("the batcher is closed")
            if self._queued + n > self._max_queued and self._queued:
                raise OverloadedError(f"{self._queued} examples already waiting")
            self._queued += n
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[R, str]] = loop.create_future()
        if self._inline:
            self._pending.append((item, n, fut, loop))
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._drain, loop, 1)
        else:
            self._q.put((item, n, fut, loop))
        return fut

    def _drain(self, loop: asyncio.AbstractEventLoop, rounds: int) -> None:
        """Inline mode: run the waiting items on the event loop. Scheduled with
        ``call_soon`` by the first submit, it runs once every handler already made ready
        in this loop iteration has submitted (and waits ``rounds`` more iterations), so
        concurrent requests share one model call without any thread handoff."""
        if rounds > 0 and len(self._pending) < self._max:
            loop.call_soon(self._drain, loop, rounds - 1)
            return
        self._scheduled = False
        if self._init is not None:
            self._init()
            self._init = None
        while self._pending:
            batch: list[Any] = []
            total = 0
            while self._pending and (not batch or total + self._pending[0][1] <= self._max):
                nxt = self._pending.pop(0)
                batch.append(nxt)
                total += nxt[1]
            self._execute(batch, total, inline=True)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the queued items."""
        with self._mu:
            self._closed = True
        if not self._inline:
            self._q.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        if self._init is not None:
            self._init()
        carry = None
        while True:
            first = carry if carry is not None else self._q.get()
            carry = None
            if first is None:
                return
            batch = [first]
            total = first[1]
            deadline = time.perf_counter() + self._wait
            stop = False
            while total < self._max:
                try:
                    remaining = deadline - time.perf_counter()
                    nxt = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if total + nxt[1] > self._max:
                    carry = nxt
                    break
                batch.append(nxt)
                total += nxt[1]
            self._execute(batch, total)
            if stop:
                return

    def _execute(self, batch: list[Any], total: int, inline: bool = False) -> None:
        with self._mu:
            self._queued -= total
        self._m_batch.observe(total)
        t0 = time.perf_counter()
        results: Sequence[Any]
        try:
            results, tag = self._run([b[0] for b in batch])
            errs: list[BaseException | None] = [None] * len(batch)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            results, tag, errs = [None] * len(batch), "", [exc] * len(batch)
        self._m_run.observe(time.perf_counter() - t0)
        for (_, _, fut, loop), res, err in zip(batch, results, errs):
            if inline:
                _resolve(fut, None if err else (res, tag), err)
                continue
            try:
                loop.call_soon_threadsafe(_resolve, fut, None if err else (res, tag), err)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
