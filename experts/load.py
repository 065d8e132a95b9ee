"""Load measured where it happens: per (layer, expert) tokens and expert-math time of one replica.

The gRPC handlers record each call; Serve's autoscaler (`record_autoscaling_stats`), Prometheus and the
Info RPC read windowed figures. Time is bucketed per second, so a reading costs O(window), not O(calls).
"""

import threading
import time
from collections import deque
from dataclasses import dataclass

Pair = tuple[int, int]


@dataclass(frozen=True)
class LoadReport:
    busy: float  # fraction of the window's wall time spent in expert math
    queued: int  # Forward calls received and waiting for the expert math
    tokens_per_s: dict[Pair, float]  # over the window, per (layer, expert)
    pair_busy: dict[Pair, float]  # busy split over pairs by their share of routed tokens
    tokens: dict[Pair, int]  # since the replica started

    @property
    def total_tokens_per_s(self) -> float:
        return sum(self.tokens_per_s.values())


class LoadMeter:
    def __init__(self, pairs: list[Pair], window_s: float = 5.0, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self.started = clock()
        self.totals: dict[Pair, int] = dict.fromkeys(pairs, 0)
        # One bucket per whole second: (second, {pair: tokens}, {pair: busy seconds}, busy seconds)
        self.buckets: deque[tuple[int, dict[Pair, int], dict[Pair, float], float]] = deque()
        self.waiting = 0
        self.lock = threading.Lock()

    def arrived(self) -> None:
        with self.lock:
            self.waiting += 1

    def started_compute(self) -> None:
        with self.lock:
            self.waiting -= 1

    def record(self, layer: int, tokens_per_expert: dict[int, int], seconds: float) -> None:
        """One Forward call's expert math: tokens routed to each expert of `layer`, and its duration."""
        now = int(self.clock())
        total = sum(tokens_per_expert.values()) or 1
        with self.lock:
            if not self.buckets or self.buckets[-1][0] != now:
                self.buckets.append((now, {}, {}, 0.0))
                self._trim(now)
            sec, tokens, busy, all_busy = self.buckets[-1]
            for e, n in tokens_per_expert.items():
                pair = (layer, e)
                tokens[pair] = tokens.get(pair, 0) + n
                busy[pair] = busy.get(pair, 0.0) + seconds * n / total
                self.totals[pair] = self.totals.get(pair, 0) + n
            self.buckets[-1] = (sec, tokens, busy, all_busy + seconds)

    def _trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] <= now - self.window_s:
            self.buckets.popleft()

    def report(self) -> LoadReport:
        now = self.clock()
        with self.lock:
            self._trim(int(now))
            # A young replica's window is its age, so its first seconds are not diluted by time it did not exist.
            span = max(min(self.window_s, now - self.started), 1e-3)
            tokens: dict[Pair, int] = {}
            pair_busy: dict[Pair, float] = {}
            busy = 0.0
            for _, t, b, all_busy in self.buckets:
                for pair, n in t.items():
                    tokens[pair] = tokens.get(pair, 0) + n
                for pair, s in b.items():
                    pair_busy[pair] = pair_busy.get(pair, 0.0) + s
                busy += all_busy
            return LoadReport(busy / span, max(self.waiting, 0), {p: n / span for p, n in tokens.items()},
                              {p: s / span for p, s in pair_busy.items()}, dict(self.totals))
