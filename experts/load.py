"""Load measured where it happens: per (layer, expert) tokens and expert-math time of one replica.

The gRPC handlers record each call; Serve's autoscaler (`record_autoscaling_stats`), Prometheus and the
Info RPC read windowed figures. Time is bucketed per second, so a reading costs O(window), not O(calls).
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Pair = tuple[int, int]


@dataclass(frozen=True)
class LoadReport:
    busy: float  # fraction of the window's wall time spent in expert math
    queued: int  # Forward calls received and waiting for the expert math
    tokens_per_s: dict[Pair, float]  # over the window, per (layer, expert)
    pair_busy: dict[Pair, float]  # busy split over pairs by their share of routed tokens
    tokens: dict[Pair, int]  # since the replica started
    calls_per_batch: float = 0.0  # Forward calls per expert-math run over the window (>1: calls merged)

    @property
    def total_tokens_per_s(self) -> float:
        return sum(self.tokens_per_s.values())


@dataclass
class _Bucket:
    second: int
    tokens: dict[Pair, int] = field(default_factory=dict)
    pair_busy: dict[Pair, float] = field(default_factory=dict)  # busy seconds
    busy: float = 0.0  # seconds
    calls: int = 0
    batches: int = 0


class LoadMeter:
    """queued(): the calls waiting for the math now (the replica's queue counts them; any thread may ask)."""

    def __init__(self, pairs: list[Pair], window_s: float = 5.0, clock=time.monotonic,
                 queued: Callable[[], int] = lambda: 0):
        self.window_s, self.clock, self.queued = window_s, clock, queued
        self.started = clock()
        self.totals: dict[Pair, int] = dict.fromkeys(pairs, 0)
        self.calls = self.batches = 0  # since the replica started
        self.expert_matmuls = 0  # since the replica started (the rows they ran: sum of totals)
        self.buckets: deque[_Bucket] = deque()  # one per whole second
        self.lock = threading.Lock()

    def record(self, layer: int, tokens_per_expert: dict[int, int], seconds: float, calls: int = 1) -> None:
        """One run of expert math for `calls` Forward calls of `layer`: tokens routed to each expert, duration."""
        now = int(self.clock())
        total = sum(tokens_per_expert.values()) or 1
        with self.lock:
            if not self.buckets or self.buckets[-1].second != now:
                self.buckets.append(_Bucket(now))
                self._trim(now)
            b = self.buckets[-1]
            for e, n in tokens_per_expert.items():
                pair = (layer, e)
                b.tokens[pair] = b.tokens.get(pair, 0) + n
                b.pair_busy[pair] = b.pair_busy.get(pair, 0.0) + seconds * n / total
                self.totals[pair] = self.totals.get(pair, 0) + n
            b.busy += seconds
            b.calls += calls
            b.batches += 1
            self.calls += calls
            self.batches += 1
            self.expert_matmuls += sum(1 for n in tokens_per_expert.values() if n)

    def _trim(self, now: float) -> None:
        while self.buckets and self.buckets[0].second <= now - self.window_s:
            self.buckets.popleft()

    def report(self) -> LoadReport:
        now = self.clock()
        queued = self.queued()
        with self.lock:
            self._trim(int(now))
            # A young replica's window is its age, so its first seconds are not diluted by time it did not exist.
            span = max(min(self.window_s, now - self.started), 1e-3)
            tokens: dict[Pair, int] = {}
            pair_busy: dict[Pair, float] = {}
            busy, calls, batches = 0.0, 0, 0
            for b in self.buckets:
                for pair, n in b.tokens.items():
                    tokens[pair] = tokens.get(pair, 0) + n
                for pair, s in b.pair_busy.items():
                    pair_busy[pair] = pair_busy.get(pair, 0.0) + s
                busy, calls, batches = busy + b.busy, calls + b.calls, batches + b.batches
            return LoadReport(busy / span, max(queued, 0), {p: n / span for p, n in tokens.items()},
                              {p: s / span for p, s in pair_busy.items()}, dict(self.totals),
                              calls / batches if batches else 0.0)
