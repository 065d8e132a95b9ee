"""Replica-side coalescing: concurrent calls for one layer run as one batch on the replica's math thread.

One worker thread runs every batch, so the gRPC event loop only queues calls and hands out results: the
health service and Info answer while a batch computes. Calls are queued per key (the layer); a batch is
every call of the oldest key, taken when the worker is free. Different keys never merge.

When a batch closes (the window rule):
- one call waiting for its layer: at once, so a lone router never waits for company;
- several (they queued behind a busy worker, or arrived together): the batch stays open while calls of
  that layer keep coming at their recent pace, i.e. until one EWMA inter-arrival gap after the latest,
  at most CAP_S after it could have run. Only gaps under CAP_S feed the EWMA: the pauses between one
  step's burst and the next say nothing about the gaps within a burst.

A batch that raises is run again call by call, so that each caller gets its own result or its own error,
never one caused by another call's rows.
"""

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")  # what a caller submits
R = TypeVar("R")  # what it gets back

CAP_S = 0.002  # the longest a batch is held open for more calls
GAP_ALPHA = 0.25  # weight of the newest inter-arrival gap in its layer's EWMA


@dataclass
class CoalesceStats:
    calls: int = 0  # calls handed to the worker
    batches: int = 0  # worker runs; calls / batches is the merge factor
    max_calls: int = 0  # the largest batch
    windows: int = 0  # batches held open for more calls (the window was not zero)
    window_s: float = 0.0  # time those batches were held open, in all


@dataclass
class _Call(Generic[P]):
    payload: P
    future: asyncio.Future


@dataclass
class _Queue(Generic[P]):
    first: float  # arrival of its oldest call
    last: float  # arrival of its newest call
    calls: list[_Call[P]] = field(default_factory=list)
    held: bool = False  # a window has kept it open


class Coalescer(Generic[P, R]):
    """`await submit(key, payload)` gets payload's item of `run(key, payloads)`, run on the worker thread.

    run(key, payloads) -> one result per payload, in order. Everything but `run` happens on the calling
    event loop (submit must always be awaited from the same loop).
    """

    def __init__(self, run: Callable[[Hashable, list[P]], list[R]], cap_s: float = CAP_S,
                 alpha: float = GAP_ALPHA, clock: Callable[[], float] = time.monotonic):
        self.run, self.cap_s, self.alpha, self.clock = run, cap_s, alpha, clock
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-math")
        self.queues: dict[Hashable, _Queue[P]] = {}  # insertion order: the oldest key first
        self.last_arrival: dict[Hashable, float] = {}
        self.gap: dict[Hashable, float] = {}  # key -> EWMA of its inter-arrival gaps under cap_s
        self.waiting = 0  # calls queued and not yet handed to the worker (read by other threads)
        self.busy = False
        self.free_since = clock()
        self.timer: asyncio.TimerHandle | None = None
        self.stats = CoalesceStats()

    async def submit(self, key: Hashable, payload: P) -> R:
        loop = asyncio.get_running_loop()
        now = self.clock()
        last = self.last_arrival.get(key)
        self.last_arrival[key] = now
        if last is not None and now - last < self.cap_s:
            g = now - last
            self.gap[key] = g if key not in self.gap else self.gap[key] + self.alpha * (g - self.gap[key])
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = _Queue(first=now, last=now)
        q.last = now
        call = _Call(payload, loop.create_future())
        q.calls.append(call)
        self.waiting += 1
        try:
            if self.timer is None:
                self._dispatch()
            return await call.future
        finally:
            if not call.future.done():  # the caller went away (cancelled) while its call waited: drop it
                call.future.cancel()

    def window(self, key: Hashable) -> float:
        """How long the batch of `key` stays open after its newest call (0: it closes now)."""
        q = self.queues[key]
        if sum(not c.future.done() for c in q.calls) <= 1:
            return 0.0
        g = self.gap.get(key)
        return g if g is not None and g < self.cap_s else 0.0

    def _dispatch(self) -> None:
        self.timer = None
        if self.busy or not self.queues:
            return
        key, q = next(iter(self.queues.items()))
        now = self.clock()
        ready = max(q.first, self.free_since)  # when it could first have run
        close = min(q.last + self.window(key), ready + self.cap_s)
        if close > now:
            q.held = True
            self.timer = asyncio.get_running_loop().call_later(close - now, self._dispatch)
            return
        del self.queues[key]
        self.waiting -= len(q.calls)
        calls = [c for c in q.calls if not c.future.done()]  # a cancelled caller's math is not run
        if not calls:
            self._dispatch()
            return
        s = self.stats
        s.calls, s.batches, s.max_calls = s.calls + len(calls), s.batches + 1, max(s.max_calls, len(calls))
        if q.held:
            s.windows, s.window_s = s.windows + 1, s.window_s + (now - ready)
        self.busy = True
        done = asyncio.get_running_loop().run_in_executor(self.worker, self._work, key,
                                                          [c.payload for c in calls])
        done.add_done_callback(lambda f: self._finished(calls, f))

    def _work(self, key: Hashable, payloads: list[P]) -> list[R | BaseException]:
        """On the worker thread: the batch, or on failure each call alone (the error is then its own)."""
        try:
            results = self.run(key, payloads)
            if len(results) != len(payloads):
                raise RuntimeError(f"run returned {len(results)} results for {len(payloads)} calls")
            return results
        except Exception as e:
            if len(payloads) == 1:
                return [e]
            log.warning("a batch of %d calls for %r failed (%r); running them one by one", len(payloads), key, e)
        alone: list[R | BaseException] = []
        for p in payloads:
            try:
                alone.append(self.run(key, [p])[0])
            except Exception as e:
                alone.append(e)
        return alone

    def _finished(self, calls: list[_Call[P]], done: asyncio.Future) -> None:
        self.busy, self.free_since = False, self.clock()
        try:
            results = done.result()
        except BaseException as e:  # the worker itself failed (shut down): every caller hears of it
            results = [e] * len(calls)
        for c, r in zip(calls, results, strict=True):
            if c.future.done():  # its caller is gone
                continue
            if isinstance(r, BaseException):
                c.future.set_exception(r)
            else:
                c.future.set_result(r)
        if self.timer is None:
            self._dispatch()

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
