"""Which (layer, expert) pairs one replica holds, kept in step with its app's placement as it changes.

The registry gives the app's placement: the active record routers follow and, during a rebalance, a
target. A record is {"version", "plan_id", "shards": [pairs of shard 0, ...], "standby": [standby pairs of
shard 0, ...]} (a replica loads its standby pairs too; routers send them only while their holders are down); one
whose plan_id is not the deployed plan's (left from an earlier deployment) is ignored, and version 0 is the deployed
plan.
A replica loads a target's pairs beside what it serves and lists the version as ready, so that the
rebalancer can switch routers only once every replica can take the new placement; pairs no placement
wants any more are dropped DRAIN_VIEW_S after, when no router still on the old view sends them.

Example: shard 1 serves version 0, pairs [(0, 1), (1, 1)]. A target v1 gives it [(0, 1), (0, 3)]: it
reads (0, 3) only, holds all three, entry {"version": 0, "ready": [0, 1]}. v1 becomes active: entry
{"version": 1, "ready": [0, 1]}; 2.5 s later it drops (1, 1): {"version": 1, "ready": [1]}.
"""

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from checkpoint.reader import Checkpoint
from experts.ffn import ExpertSet

log = logging.getLogger(__name__)

Pair = tuple[int, int]
DRAIN_VIEW_S = 2.5  # > the routers' view refresh (0.5 s) with room: after it no router sends the old pairs
POLL_S = 0.5
LOAD_NICENESS = 10
LOAD_SPREAD_S = 0.5


class PlacementSource(Protocol):
    def placement(self, app: str) -> dict:
        """{"active": record | None, "target": record | None}."""


class Holdings:
    """Loads and drops one replica's experts as the placement moves; `on_change(experts, fields)` installs a
    new ExpertSet and the entry fields ("pairs", "version", "ready") to register."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, app: str, shard: int,
                 num_shards: int, plan_id: str, base_pairs: list[Pair], source: PlacementSource,
                 on_change: Callable[[ExpertSet, dict], None]):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.app, self.shard, self.num_shards, self.plan_id = app, shard, num_shards, plan_id
        self.base_pairs = sorted(base_pairs)
        self.source, self.on_change = source, on_change
        self.experts: ExpertSet | None = None
        self.versions: dict[int, list[Pair]] = {}  # version -> its pairs, all loaded
        self.retire: dict[int, float] = {}  # version no placement wants -> when to drop it
        self.serving = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _valid(self, record: dict | None) -> dict | None:
        if (record and record["plan_id"] == self.plan_id and len(record["shards"]) == self.num_shards
                and len(record.get("standby", record["shards"])) == self.num_shards):
            return record
        return None

    def _mine(self, record: dict) -> list[Pair]:
        """This shard's pairs of a record: those routed to it and those it keeps on standby."""
        standby = record.get("standby") or [[] for _ in record["shards"]]
        return sorted({(int(l), int(e)) for l, e in [*record["shards"][self.shard], *standby[self.shard]]})

    def wanted(self) -> tuple[int, dict[int, list[Pair]], list[Pair]]:
        """(active version, {version: the pairs this shard loads for it}, the pairs routed to it in the active
        version) of the placement now in the registry."""
        p = self.source.placement(self.app)
        active, target = self._valid(p["active"]), self._valid(p["target"])
        want = {active["version"]: self._mine(active)} if active else {0: self.base_pairs}
        if target:
            want[target["version"]] = self._mine(target)
        routed = sorted((int(l), int(e)) for l, e in active["shards"][self.shard]) if active else self.base_pairs
        return (active["version"] if active else 0), want, routed

    def sync(self) -> None:
        """Load what the placement wants and this replica lacks; drop what has been unwanted long enough."""
        active, want, routed = self.wanted()
        now = time.monotonic()
        for v in self.versions:
            if v not in want:
                self.retire.setdefault(v, now + DRAIN_VIEW_S)
        expired = {v for v, t in self.retire.items() if t <= now}
        missing = [v for v in want if v not in self.versions]
        if not missing and not expired and active == self.serving:
            return
        keep = {v: ps for v, ps in self.versions.items() if v not in expired}
        keep.update({v: want[v] for v in missing})
        if missing and self.versions:
            # Every replica sees a target within one poll: staggered, their loads do not all take the CPU from
            # serving at once.
            time.sleep(random.uniform(0.0, LOAD_SPREAD_S))
        if missing or expired:
            pairs = sorted({p for ps in keep.values() for p in ps})
            new = set(pairs) - set(self.experts.pairs if self.experts is not None else ())
            t = time.perf_counter()
            experts = ExpertSet.load(self.ckpt, pairs, self.dtype, reuse=self.experts, device=self.device)
            experts.warm_up(new)
            self.experts = experts
            if self.versions:
                log.info("shard %d: placement versions %s held (%d pairs, %d read in %.2fs), %s dropped",
                         self.shard, sorted(keep), len(pairs), len(new), time.perf_counter() - t, sorted(expired))
        self.versions = keep
        for v in expired:
            del self.retire[v]
        self.serving = active
        self.on_change(self.experts, {"pairs": [list(p) for p in routed], "version": active,
                                      "ready": sorted(self.versions)})

    def start(self) -> None:
        """Follow the placement on a thread of its own from now on."""
        self._thread = threading.Thread(target=self._loop, name="placement", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:  # Linux schedules threads on their own: loading new experts yields the CPU to serving calls
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)
        except (AttributeError, OSError):
            pass
        while not self._stop.wait(POLL_S):
            try:
                self.sync()
            except Exception as e:  # the registry may be restarting: the next poll tries again
                log.warning("shard %d could not follow the placement: %r", self.shard, e)

    def stop(self) -> None:
        self._stop.set()
