"""`raymoe rebalance`: move hot (layer, expert) pairs to a placement that balances the routers' recent load,
live, without stopping decode.

1. Read what the routers routed to each (layer, expert) over a window, and the shards' replica counts.
2. Compute a balanced placement (cluster.eplb) with `redundant_experts` more copies per layer than experts,
   and a standby copy of every pair only one replica would serve, on another shard (routers send it nothing
   while a holder of the pair is up), so that losing any one replica stalls nothing.
3. Propose it: every replica loads the pairs the new placement gives its shard, beside those it serves,
   and lists the new version as ready. Routers still use the old placement meanwhile.
4. Once every replica is ready, commit: routers switch at their next view refresh (one placement per
   layer call, so a call never mixes two); replicas drop pairs only the old placement had a few
   seconds later, when no router sends them any more. A replica added later loads the active placement.

No replica restarts and no Serve redeploy: the Serve config (and a RayService) stays as it was, and the
placement lives in the directory and Ray's GCS key-value store.
"""

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from cluster.eplb import balanced_placement, imbalance, load_shifted, shard_loads, single_replica_pairs, standby_copies
from cluster.placement import PlacementPlan
from router.grpc_dispatch import placement_in_force

log = logging.getLogger(__name__)

SHIFT_WINDOW_S = 1.0  # the newest load a shift is judged on, and the first re-placement after one balances


@dataclass
class RebalanceOptions:
    """How to rebalance."""

    redundant_experts: int | None = field(default=None, metadata={
        "help": "copies per layer beyond one of each expert, given to the hottest (default: one per shard, at "
                "most what the shards can hold apart)"})
    min_copies: int = field(default=1, metadata={
        "help": "shards holding every (layer, expert) at least (2: when every replica of one shard is gone, routers "
                "send its pairs to their other holders; the copies this takes come on top of --redundant-experts)"})
    standby: bool = field(default=True, metadata={
        "help": "give every pair that only one replica serves a standby copy on another shard, which routers use "
                "only while the pair's holders are down (memory for a replica loss that stalls nothing)"})
    window_s: float = field(default=60.0, metadata={"help": "balance the tokens routed over this many seconds"})
    min_gain: float = field(default=0.0, metadata={
        "help": "switch only if the predicted imbalance drops by at least this much"})
    dry_run: bool = field(default=False, metadata={"help": "print the placement it would switch to, switch nothing"})
    timeout_s: float = field(default=120.0, metadata={"help": "give up if replicas are not ready within this"})


def current_placement(snapshot: dict) -> tuple[int, list[list[tuple[int, int]]], list[list[tuple[int, int]]], str]:
    """(version, pairs of each shard, standby pairs of each shard, plan_id) of an app's directory snapshot."""
    entries = [e for e in snapshot["replicas"] if e.get("state") != "draining"]
    if not entries:
        raise ValueError("the expert plane has no registered replica")
    plan_ids = {e.get("plan_id", "") for e in entries}
    if len(plan_ids) != 1:
        raise ValueError("the expert plane's replicas come from different deployments (an update is under way): "
                         "try again when it has finished")
    num_shards = entries[0]["num_shards"]
    version, pairs, standby = placement_in_force({"placement": snapshot["placement"], "replicas": entries})
    shards = [[tuple(p) for p in pairs.get(s, [])] for s in range(num_shards)]
    return version, shards, [[tuple(p) for p in standby.get(s, [])] for s in range(num_shards)], plan_ids.pop()


def rebalance(app: str, o: RebalanceOptions) -> dict:
    """Plan and (unless o.dry_run) apply a balanced placement; returns what it did:
    {"version", "switched", "imbalance_before", "imbalance_after" (predicted on the window's tokens),
    "pairs_moved", "standby_loaded" (standby copies a replica lacked), "seconds", "shards", "standby"}."""
    # Imported here, not at the top: the CLI reads RebalanceOptions for --help without loading Ray and Serve.
    from cluster.autoscaling import log_decision
    from cluster.directory import DirectoryClient

    if o.min_copies < 1:
        raise ValueError(f"min_copies must be >= 1, got {o.min_copies}")
    directory = DirectoryClient(app)
    snapshot = directory.snapshot()
    version, shards, standby, _ = current_placement(snapshot)
    replicas = serving_counts(snapshot)
    idle = [s for s in range(len(shards)) if not replicas.get(s)]
    if idle:  # its pairs could not be made ready: wait for a replica (its arrival changes the count again)
        raise ValueError(f"shards {idle} have no serving replica")
    counts = directory.token_counts(o.window_s)
    if counts is None or not np.any(counts):
        raise ValueError(f"no tokens routed in the last {o.window_s:.0f}s: nothing to balance on")
    load = np.asarray(counts, dtype=np.float64)  # (L, E)
    n_layers, n_experts = load.shape
    G = len(shards)
    capacity = np.array([max(1, replicas[s]) for s in range(G)], dtype=np.float64)
    redundant = G if o.redundant_experts is None else o.redundant_experts
    redundant += n_experts * (min(o.min_copies, G) - 1)
    redundant = min(redundant, n_experts * (G - 1))  # at most one copy of a pair per shard
    new = balanced_placement(load, capacity, n_experts + redundant, min_copies=o.min_copies, current=shards)
    PlacementPlan.from_sets(new).validate(n_layers, n_experts)
    new_standby = standby_copies(new, capacity) if o.standby else [[] for _ in new]
    before = imbalance(shard_loads(load, shards, capacity))
    after = imbalance(shard_loads(load, new, capacity))
    moved = sum(len(set(n) - set(o_)) for n, o_ in zip(new, shards, strict=True))
    spares = sum(len(set(n) - set(o_) - set(s)) for n, o_, s in zip(new_standby, standby, shards, strict=True))
    held = Counter(p for pairs in shards for p in pairs)
    # Below min_copies, or a pair of one replica without a standby (a scale-down, a lost replica): switch whatever
    # the gain.
    short = (min(held.values(), default=0) < min(o.min_copies, G)
             or (o.standby and uncovered(shards, standby, capacity) > uncovered(new, new_standby, capacity)))
    result = {"version": version, "switched": False, "imbalance_before": before, "imbalance_after": after,
              "pairs_moved": moved, "standby_loaded": spares, "seconds": 0.0,
              "shards": [[list(p) for p in s] for s in new],
              "standby": [[list(p) for p in s] for s in new_standby]}
    same = moved == 0 and all(set(a) == set(b) for a, b in zip(new_standby, standby, strict=True))
    if o.dry_run or same or (before - after < o.min_gain and not short):
        return result
    target, seconds = switch_placement(app, result["shards"], o.timeout_s, result["standby"], capacity.tolist())
    result.update(version=target, switched=True, seconds=seconds)
    log_decision(app, "rebalance", f"placement v{target}: {moved} pairs moved, {spares} standby copies loaded, "
                                   f"predicted imbalance {before:.2f} -> {after:.2f}, replicas ready in {seconds:.1f}s")
    return result


def uncovered(shards: list[list], standby: list[list], capacity: np.ndarray) -> int:
    """Pairs that losing one replica would leave nowhere to go: served by a single replica, with no standby."""
    spare = {tuple(p) for pairs in standby for p in pairs}
    return sum(p not in spare for p in single_replica_pairs(shards, capacity))


def serving_counts(snapshot: dict) -> dict[int, int]:
    """shard -> its serving replicas, from a directory snapshot."""
    return dict(Counter(e["shard"] for e in snapshot["replicas"] if e.get("state") == "serving"))


def rebalance_loop(app: str, o: RebalanceOptions, every_s: float, stop: threading.Event, poll_s: float = 0.5,
                   first_s: float | None = None) -> None:
    """Rebalance every every_s (the first time first_s in, by default every_s); at once, and whatever the gain
    (round_options), when a shard's count of serving replicas changes: the placement in force spread the load over
    the old counts, so a shard that lost a replica (the autoscaler's, or a failure) now overloads those left, and
    one that gained a replica leaves it short of work; and at once when the load shifts: the experts' shares over
    the last SHIFT_WINDOW_S differ from those before beyond noise (cluster.eplb.load_shifted; a hot set that moved),
    checked every poll. Each looks at the load of o.window_s, or of the time since the loop started or the load
    last shifted if that is less (a shift's own rebalance at the last SHIFT_WINDOW_S). Runs until `stop` is set."""
    from cluster.directory import DirectoryClient

    directory = DirectoryClient(app)
    started = time.monotonic()
    regime = started  # since when the load has been as it is now
    counts, due = None, started + (every_s if first_s is None else first_s)
    while not stop.wait(poll_s):
        try:
            now = serving_counts(directory.snapshot())
        except Exception as e:  # the directory may be restarting: look again next poll
            log.info("no rebalance: %r", e)
            continue
        changed = counts is not None and now != counts
        counts = now
        t = time.monotonic()
        shifted = False
        if not changed and t < due:
            if t - regime < 2 * SHIFT_WINDOW_S:
                continue
            shifted = shift_seen(directory, min(o.window_s, t - regime))
            if not shifted:
                continue
            regime = t - SHIFT_WINDOW_S
        due = t + every_s
        why = " (replica counts changed)" if changed else " (the load shifted)" if shifted else ""
        try:
            r = rebalance(app, round_options(o, min(o.window_s, t - regime), changed))
            if r["switched"]:
                log.info("rebalanced to placement v%d%s: predicted imbalance %.2f -> %.2f", r["version"], why,
                         r["imbalance_before"], r["imbalance_after"])
        except (ValueError, TimeoutError) as e:  # no traffic, or a deployment under way: next round
            log.info("no rebalance: %s", e)
        except Exception:
            log.exception("rebalance failed")


def round_options(o: RebalanceOptions, window_s: float, counts_changed: bool) -> RebalanceOptions:
    """The options of one round of rebalance_loop: o on the load of window_s, and after a change of replica counts
    whatever the gain. The predicted imbalance is the busiest replica's excess over the mean, which a replica
    gained hardly moves: it lowers the mean by what it leaves idle, a few hundredths with a dozen replicas, under
    a periodic round's min_gain. Left out, that replica would idle on its share of the old placement, read cold
    to the autoscaler, and be removed again."""
    return replace(o, window_s=window_s, min_gain=0.0 if counts_changed else o.min_gain)


def shift_seen(directory, window_s: float) -> bool:
    """Whether the routers' load over the last SHIFT_WINDOW_S differs from the rest of the last window_s."""
    try:
        recent, whole = directory.token_counts(SHIFT_WINDOW_S), directory.token_counts(window_s)
    except Exception as e:  # the directory may be restarting: no shift seen this time
        log.info("no shift check: %r", e)
        return False
    if recent is None or whole is None:
        return False
    recent = np.asarray(recent, dtype=np.float64)
    return load_shifted(np.asarray(whole, dtype=np.float64) - recent, recent)


def switch_placement(app: str, shards: list[list], timeout_s: float = 120.0, standby: list[list] | None = None,
                     capacity: list[float] | None = None) -> tuple[int, float]:
    """Make `shards` (pairs of each shard, and `standby`, each shard's standby pairs) the app's placement, live:
    propose, wait until every replica holds its new pairs, commit. `capacity`: the replicas per shard it was
    planned for, by which routers weigh a pair's copies while a shard has more or fewer. -> (the new version,
    seconds it took)."""
    from cluster.directory import DirectoryClient

    directory = DirectoryClient(app)
    snapshot = directory.snapshot()
    version, _, _, plan_id = current_placement(snapshot)
    target = version + 1
    active = snapshot["placement"]
    if active and active["version"] >= target:  # a stale record of an earlier deployment: go past it
        target = active["version"] + 1
    t0 = time.monotonic()
    directory.propose({"version": target, "plan_id": plan_id, "shards": [[list(p) for p in s] for s in shards],
                       "standby": [[list(p) for p in s] for s in (standby or [[] for _ in shards])],
                       "capacity": capacity, "time": time.time()})
    try:
        wait_ready(directory, target, len(shards), timeout_s)
    except BaseException:
        directory.abort(target)
        raise
    directory.commit(target)
    return target, time.monotonic() - t0


def wait_ready(directory, version: int, num_shards: int, timeout_s: float) -> None:
    """Until every serving replica lists `version` as ready and every shard has one."""
    deadline = time.monotonic() + timeout_s
    while True:
        entries = [e for e in directory.snapshot()["replicas"] if e.get("state") == "serving"]
        ready = {e["shard"] for e in entries if version in e.get("ready", ())}
        if ready == set(range(num_shards)) and all(version in e.get("ready", ()) for e in entries):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"placement v{version}: shards {sorted(set(range(num_shards)) - ready)} not ready "
                               f"after {timeout_s:.0f}s")
        time.sleep(0.1)


def format_result(r: dict) -> str:
    head = (f"placement v{r['version']}: switched in {r['seconds']:.1f}s" if r["switched"]
            else "placement unchanged (dry run, or nothing to gain)")
    lines = [head, f"predicted per-replica imbalance (max - mean) / mean: {r['imbalance_before']:.2f} -> "
                   f"{r['imbalance_after']:.2f}; {r['pairs_moved']} (shard, pair) copies new, "
                   f"{r['standby_loaded']} standby copies new"]
    for s, pairs in enumerate(r["shards"]):
        spare = f"  (standby {describe_pairs(r['standby'][s])})" if r["standby"][s] else ""
        lines.append(f"  shard {s}: {describe_pairs(pairs)}{spare}")
    return "\n".join(lines)


def describe_pairs(pairs: list) -> str:
    """[[0, 1], [0, 5], [1, 2]] -> 'L0: 1,5  L1: 2'."""
    by_layer: dict[int, list[int]] = {}
    for l, e in pairs:
        by_layer.setdefault(l, []).append(e)
    return "  ".join(f"L{l}: {','.join(map(str, sorted(es)))}" for l, es in sorted(by_layer.items()))
