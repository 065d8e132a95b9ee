"""Application-level Serve autoscaling for the expert shards.

Every expert shard is a Serve deployment named ``ExpertShard-<i>``; its replicas report ``busy`` (fraction of
wall time spent in expert math), ``queued`` (calls waiting) and ``tokens_per_s`` through
``record_autoscaling_stats``. Routing skew makes a few shards hot while others idle, so each shard is sized on
its own load, and an optional budget caps the shards' total so a burst on one shard cannot starve the cluster.

Busy alone misjudges a decode batch: every layer waits for its slowest shard, so the hot shard sets the step
time while its replicas may still look idle (call overheads, a shared CPU, a small batch) and the others idle
waiting for it. So routers also report the critical path: per layer, which shard answered last and how long the
layer waited; the directory sums it per shard over a few seconds into the GCS key-value store
(``ROUTER_LOAD_KEY``). While routers spend a good part of their time waiting (``ROUTER_WAIT_MIN``), a shard
that ends about its share of the waits (1 / shards) or more keeps its replicas, however idle they look; while
requests wait for a batch slot, no shard shrinks and one that ends more than its share grows. Growth waits for
requests to wait because more replicas only shorten a layer whose shard is short of compute: when a shard is
slow for its call overhead or its weight reads, its share stays high whatever its replica count.

``decide`` is the pure rule. ``ExpertPlanePolicy`` adapts Serve 2.60's application-level policy interface to it:
Serve resolves ``policy_function`` and, because it names a class, constructs it once with ``policy_kwargs``
(``_resolve_policy_callable``) and calls the instance every autoscaling tick. Serve then applies each
deployment's min/max bounds, scaling factors and upscale/downscale delays to what the policy returns.

Serve config (application level)::

    applications:
      - name: raymoe
        import_path: cluster.app:build_app
        autoscaling_policy:
          policy_function: cluster.autoscaling:ExpertPlanePolicy
          policy_kwargs: {target_busy: 0.6, max_total_replicas: 12, tolerance: 0.2}

This module imports only the standard library and ``ray.serve``: Serve pickles it by value into the controller,
so nothing else of the project has to be importable there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

logger = logging.getLogger(__name__)

DECISIONS_KEY = "raymoe/decisions/{app}"  # Ray's GCS key-value store: what `raymoe status` shows
ROUTER_LOAD_KEY = "raymoe/router-load/{app}"  # JSON {"time", "window_s", "critical_s": [per shard], "waiting"}
ROUTER_LOAD_MAX_AGE_S = 10.0  # an older report describes traffic that has stopped
ROUTER_WAIT_MIN = 0.25  # routers waiting on experts this share of the time (summed over routers) are under load
MAX_GROWTH = 2.0  # a shard at most doubles per decision on the critical-path signal: the next one re-measures
MAX_DECISIONS = 50
SHARD_PREFIX = "ExpertShard-"
BUSY_METRIC = "busy"
QUEUED_METRIC = "queued"

# ceil(2 * 0.9 / 0.6) would be 4 in floats (the quotient is 3.0000000000000004); a hair under an integer counts
# as that integer.
_CEIL_EPS = 1e-9


def log_decision(app: str, kind: str, detail: str) -> None:
    """Append {"time", "kind", "detail"} to the app's decision log in the GCS key-value store (JSON, the last
    MAX_DECISIONS kept). Best effort: a decision matters more than its record."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized, _internal_kv_put

        if not _internal_kv_initialized():
            return
        key = DECISIONS_KEY.format(app=app).encode()
        old = _internal_kv_get(key)
        log = json.loads(old) if old else []
        log.append({"time": time.time(), "kind": kind, "detail": detail})
        _internal_kv_put(key, json.dumps(log[-MAX_DECISIONS:]).encode(), overwrite=True)
    except Exception:
        logger.debug("could not log a %s decision of %s", kind, app, exc_info=True)


def decisions(app: str) -> list[dict]:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DECISIONS_KEY.format(app=app).encode())
    return json.loads(raw) if raw else []


@dataclass(frozen=True)
class ShardLoad:
    """One shard's load as the policy sees it.

    current: replicas the ``busy`` mean was taken over (Serve's running replicas).
    min_replicas, max_replicas: bounds the decision is clamped to.
    busy: mean busy fraction over those replicas; None (or NaN) means no information, so the shard holds.
    queued: mean calls waiting per replica; only whether it is above zero matters.
    target_replicas: what Serve is already driving toward (its target, which can be above ``current`` while
        replicas start). A shard with nothing to change holds here, and a hot shard is never sized below it
        (nor a cold one above it), so replicas still starting are not cancelled. None means ``current``.
    critical: the share (0..1) of the routers' layer waits that this shard ended by answering last; None when
        routers reported nothing.
    """

    current: int
    min_replicas: int
    max_replicas: int
    busy: float | None
    queued: float = 0.0
    target_replicas: int | None = None
    critical: float | None = None

    def __post_init__(self) -> None:
        if self.current < 0:
            raise ValueError(f"current must be >= 0, got {self.current}")
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.target_replicas is not None and self.target_replicas < 0:
            raise ValueError(f"target_replicas must be >= 0, got {self.target_replicas}")

    @property
    def hold(self) -> int:
        """The replica count that means "no change"."""
        return self.current if self.target_replicas is None else self.target_replicas

    @property
    def known_busy(self) -> float | None:
        """busy, or None when it carries no information."""
        if self.busy is None or not math.isfinite(self.busy):
            return None
        return max(0.0, self.busy)

    @property
    def known_critical(self) -> float | None:
        if self.critical is None or not math.isfinite(self.critical):
            return None
        return min(1.0, max(0.0, self.critical))


def _check_params(target_busy: float, max_total_replicas: int | None, tolerance: float) -> None:
    if not (isinstance(target_busy, int | float) and math.isfinite(target_busy) and target_busy > 0):
        raise ValueError(f"target_busy must be a finite number > 0, got {target_busy!r}")
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if max_total_replicas is not None and (
        isinstance(max_total_replicas, bool) or not isinstance(max_total_replicas, int) or max_total_replicas < 0
    ):
        raise ValueError(f"max_total_replicas must be None or an int >= 0, got {max_total_replicas!r}")


def _desired(shard: ShardLoad, target_busy: float, tolerance: float, fair: float = 1.0,
             requests_waiting: bool = False) -> int:
    """One shard's replica count before the global budget, clamped to its bounds; fair: the critical share
    of a shard when all are balanced (1 / shards)."""
    busy = shard.known_busy
    hold = shard.hold
    if busy is None:
        desired = hold
    elif target_busy * (1 - tolerance) <= busy <= target_busy * (1 + tolerance):
        desired = hold  # inside the dead band: moving would only oscillate
    else:
        # Total work is current * busy replica-fractions; spread it so each replica runs at target_busy.
        desired = math.ceil(shard.current * busy / target_busy - _CEIL_EPS)
        # Never move against the signal: a hot shard keeps replicas that are still starting, a cold one does
        # not grow because Serve's target is momentarily above what is running.
        desired = max(desired, hold) if busy > target_busy else min(desired, hold)
    if busy is not None and busy > target_busy and shard.queued > 0:
        # Calls are waiting on a shard already past target: add capacity even if the proportional rule would not.
        desired = max(desired, shard.current + 1)
    critical = shard.known_critical
    if critical is not None:
        if critical > fair * (1 + tolerance) and requests_waiting:
            # Requests wait, and the batch waits on this shard more than on others: grow in proportion to the
            # replicas that made that share (running ones; those starting are not measured), at most doubling.
            growth = min(critical / fair, MAX_GROWTH)
            floor = hold + 1 if hold <= shard.current else hold  # one more, unless more are already starting
            desired = max(desired, math.ceil(shard.current * growth - _CEIL_EPS), floor)
        elif critical >= fair * (1 - tolerance) or shard.current < hold:
            # As often last as any: one replica fewer would make it the straggler. Or replicas still starting (a lost
            # one's replacement, most often): the share was measured without them, and re-placement moves load off
            # a shard while it is short, so it reads colder than it is; cutting the target now would cancel the
            # replacement, and the shard would end a replica short for good.
            desired = max(desired, hold)
        else:
            # Fewer replicas make it last more often, about in proportion: shrink only as far as it would still end
            # fewer waits than the band's low edge. Re-placement evens the shards out, so their shares scatter
            # around the fair one, and a shard a little under the edge that dropped half its replicas would only
            # read hot and grow back.
            keep = math.ceil(shard.current * critical / (fair * (1 - tolerance)) - _CEIL_EPS)
            desired = max(desired, min(keep, hold))
    if requests_waiting:
        desired = max(desired, hold)  # capacity is short somewhere: giving any back now would only add to the wait
    return max(shard.min_replicas, min(shard.max_replicas, desired))


def _pressure(shard: ShardLoad, target_busy: float, fair: float) -> float:
    """The shard's load relative to target, in replicas: busy replica-fractions over target_busy, or, when
    larger, its critical share over its fair share times its replicas. A shard without metrics sits at target."""
    busy = shard.known_busy
    work = shard.hold if busy is None else busy * shard.current / target_busy
    critical = shard.known_critical
    return work if critical is None else max(work, critical / fair * shard.hold)


def _apply_budget(
    shards: Mapping[str, ShardLoad], desired: dict[str, int], target_busy: float, max_total_replicas: int
) -> dict[str, int]:
    """Cut ``desired`` down to ``max_total_replicas`` in total, shards under the most pressure served first."""
    # What each shard keeps comes first: a replica stopped is capacity lost at once, while the one started
    # in its place serves only after its start-up, so growth is paid from replicas other shards give up.
    # A budget below that (lowered by hand) falls back to minimums, which Serve enforces whatever the policy
    # says; if the minimums alone exceed the budget, the minimums win.
    given = {name: max(shards[name].min_replicas, min(desired[name], shards[name].hold)) for name in desired}
    if sum(given.values()) > max_total_replicas:
        given = {name: shards[name].min_replicas for name in desired}
    left = max_total_replicas - sum(given.values())
    fair = 1.0 / max(1, len(shards))
    work = {name: _pressure(shards[name], target_busy, fair) for name in desired}

    def projected(name: str) -> float:
        if given[name] == 0:
            return math.inf if work[name] > 0 else 0.0
        return work[name] / given[name]

    while left > 0:
        wanting = [name for name in desired if given[name] < desired[name]]
        if not wanting:
            break
        # Highest projected pressure first; ties go to the smaller name so the outcome is reproducible.
        name = min(wanting, key=lambda n: (-projected(n), n))
        given[name] += 1
        left -= 1
    return given


def decide(
    shards: Mapping[str, ShardLoad],
    target_busy: float,
    max_total_replicas: int | None,
    tolerance: float = 0.2,
    requests_waiting: bool = False,
) -> dict[str, int]:
    """Replica counts for the expert shards, keyed like ``shards``.

    Per shard: when busy lies outside ``[target_busy * (1 - tolerance), target_busy * (1 + tolerance)]`` the
    shard wants ``ceil(current * busy / target_busy)`` replicas, otherwise it holds; a shard above target with
    calls queued wants at least ``current + 1``; a shard without metrics holds. With the routers' critical path
    (``critical``, the shard's share of layer waits, against a fair share of ``1 / len(shards)``): a shard at or
    above ``fair * (1 - tolerance)`` keeps what it has, one below it shrinks no further than
    ``ceil(current * critical / (fair * (1 - tolerance)))`` (where it would reach that edge), and not at all
    while some of its replicas are still starting (``current`` below its target); while
    ``requests_waiting``, one above
    ``fair * (1 + tolerance)`` wants ``ceil(current * min(critical / fair, 2))`` and at least one more than it
    has, and no shard shrinks. The result is clamped to ``[min_replicas, max_replicas]``.

    Budget: when the shards want more than ``max_total_replicas`` in total, every shard first keeps what it has
    (no more than it wants; only its minimum if keeping would exceed the budget), then the rest of the budget
    goes out one replica at a time to the shard with the highest projected pressure (``busy * current /
    target_busy``, or ``critical / fair * hold`` when larger, over the replicas given so far), never above what
    it wants. Ties go to the smaller name.

    Worked example, ``target_busy=0.6``, ``tolerance=0.2`` (dead band 0.48..0.72), every shard min 1, max 8::

        shard  current  busy  queued   wants
        A      2        0.9   0        ceil(2 * 0.9 / 0.6) = 3
        B      1        1.2   4        ceil(1 * 1.2 / 0.6) = 2  (queued and hot: at least 1 + 1 = 2)
        C      3        0.1   0        ceil(3 * 0.1 / 0.6) = 1
        D      2        0.6   0        2  (inside the dead band: holds)

    Without a budget the answer is A=3, B=2, C=1, D=2 (8 replicas). With ``max_total_replicas=7``: each keeps
    what it has up to what it wants, A=2, B=1, C=1, D=2 (6), leaving 1. Projected pressure is then A
    1.8 / 0.6 / 2 = 1.5 and B 1.2 / 0.6 / 1 = 2.0, so B gets it: A=2, B=2, C=1, D=2.

    Critical path, 4 shards (fair share 0.25, band 0.2..0.3), every busy 0.3, min 1, max 8::

        shard  hold  critical  wants, no request waiting      wants, requests waiting
        A      2     0.70      2 (keeps: ends most waits)     ceil(2 * min(0.70 / 0.25, 2)) = 4 (grows)
        B      2     0.25      2 (keeps: ends its share)      2
        C      2     0.05      ceil(2 * 0.3 / 0.6) = 1        2 (no shrinking while requests wait)
        D      2     0.00      1                              2

    Budget 8: 2, 2, 1, 1 with nothing waiting. With requests waiting the shards want 10: each keeps its 2 and
    none is spare, so A grows only once others give replicas up. With a budget of 10, A's pressure
    0.70 / 0.25 * 2 = 5.6 takes both spare replicas: A=4, B=2, C=2, D=2.

    Raises ValueError for a non-positive ``target_busy``, a negative ``tolerance`` or ``max_total_replicas``.
    """
    _check_params(target_busy, max_total_replicas, tolerance)
    fair = 1.0 / max(1, len(shards))
    desired = {name: _desired(shard, target_busy, tolerance, fair, requests_waiting)
               for name, shard in shards.items()}
    if max_total_replicas is None or sum(desired.values()) <= max_total_replicas:
        return desired
    return _apply_budget(shards, desired, target_busy, max_total_replicas)


def _mean_metric(ctx: AutoscalingContext, metric: str) -> float | None:
    """Mean of one custom metric over the running replicas that reported a usable value; None if none did."""
    metrics = ctx.aggregated_metrics  # lazy in Serve: computing it may fail; the caller treats that as no data
    if not metrics:
        return None
    per_replica = metrics.get(metric)
    if not per_replica:
        return None
    running = set(ctx.running_replicas or ())
    values = []
    for replica_id, value in per_replica.items():
        if running and replica_id not in running:
            continue  # a replica that has stopped says nothing about the ones still serving
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        values.append(float(value))
    return sum(values) / len(values) if values else None


def router_load(app: str, now: float | None = None) -> dict | None:
    """The app's routers' critical path as the directory last wrote it: {"critical_s": [per shard], "waiting",
    "time", "window_s"}, or None when there is none or it is older than ROUTER_LOAD_MAX_AGE_S."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(ROUTER_LOAD_KEY.format(app=app).encode())
    if not raw:
        return None
    load = json.loads(raw)
    if (now if now is not None else time.time()) - load.get("time", 0.0) > ROUTER_LOAD_MAX_AGE_S:
        return None
    return load


def critical_shares(critical_s: list[float], window_s: float) -> list[float] | None:
    """Each shard's share of the routers' layer waits over window_s, or None when the routers spent less than
    ROUTER_WAIT_MIN of it waiting: a trickle of calls says nothing about which shard holds decoding back."""
    total = sum(critical_s)
    return [x / total for x in critical_s] if total > 0 and total >= ROUTER_WAIT_MIN * window_s else None


def router_shares(load: dict | None) -> dict[int, float]:
    """shard -> its critical share, from a ``router_load`` record; empty while routers are not under load."""
    return dict(enumerate((critical_shares(load["critical_s"], load["window_s"]) if load else None) or []))


def _shard_load(ctx: AutoscalingContext, critical: float | None = None
                ) -> tuple[ShardLoad, float | None, float | None]:
    """The ShardLoad for one context, plus the raw busy and queued it was built from (for policy_state)."""
    try:
        busy = _mean_metric(ctx, BUSY_METRIC)
        queued = _mean_metric(ctx, QUEUED_METRIC)
    except Exception:  # a broken metric read must not take down the controller's loop
        logger.warning("Could not read autoscaling metrics for %s; holding it.", ctx.deployment_name, exc_info=True)
        busy, queued = None, None
    current = max(0, int(ctx.current_num_replicas or 0))
    target = max(0, int(ctx.target_num_replicas if ctx.target_num_replicas is not None else current))
    low = max(0, int(ctx.capacity_adjusted_min_replicas or 0))
    high = max(low, int(ctx.capacity_adjusted_max_replicas if ctx.capacity_adjusted_max_replicas is not None else low))
    if current == 0:
        busy = critical = None  # nothing running: any leftover numbers describe replicas that are gone
    load = ShardLoad(
        current=current,
        min_replicas=low,
        max_replicas=high,
        busy=busy,
        queued=queued if queued is not None and queued > 0 else 0.0,
        target_replicas=target,
        critical=critical,
    )
    return load, busy, queued


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


class ExpertPlanePolicy:
    """Serve application-level autoscaling policy for the ``ExpertShard-<i>`` deployments.

    Serve constructs it once with the application's ``policy_kwargs`` and calls it every tick with the contexts
    of the application's autoscaling deployments, and reads the routers' critical path (``router_load``) from the
    GCS key-value store. Only deployments whose name starts with ``ExpertShard-`` get a decision; any other
    deployment (``Router``, ``ExpertPlane``) gets none, so Serve leaves it where it is.
    A shard whose metrics are missing holds at Serve's current target.

    Returns ``(decisions, policy_state)``: ``decisions[id]`` is the replica count from ``decide``, and
    ``policy_state[id]`` records the inputs and result (``busy``, ``queued``, ``current``, ``target``,
    ``wanted`` before the budget, ``desired`` after it) so they can be inspected in Serve's state.
    It never raises once constructed; on an unexpected error it logs and returns no decisions (nothing moves).
    """

    def __init__(
        self,
        target_busy: float = 0.6,
        max_total_replicas: int | None = None,
        tolerance: float = 0.2,
        shard_prefix: str = SHARD_PREFIX,
    ) -> None:
        # Checked here so a bad config fails when Serve registers the policy, not on every tick.
        _check_params(target_busy, max_total_replicas, tolerance)
        if not shard_prefix:
            raise ValueError("shard_prefix must be non-empty; an empty prefix would scale every deployment")
        self.target_busy = float(target_busy)
        self.max_total_replicas = max_total_replicas
        self.tolerance = float(tolerance)
        self.shard_prefix = shard_prefix
        # Per shard: the target Serve drove at the last tick, and the count this policy asked for since (with why)
        # until Serve moves its target: the log holds what Serve applied, not each tick's wish, which its
        # upscale and downscale delays absorb while the wish flickers.
        self._target: dict[str, int] = {}
        self._asked: dict[str, tuple[int, str]] = {}

    def __call__(
        self, contexts: Mapping[DeploymentID, AutoscalingContext]
    ) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict[str, Any]]]:
        try:
            return self._decide(contexts)
        except Exception:  # Serve's controller runs this; holding beats crashing its loop
            logger.exception("ExpertPlanePolicy failed; leaving every expert shard at its current target.")
            return {}, {}

    def _decide(
        self, contexts: Mapping[DeploymentID, AutoscalingContext]
    ) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict[str, Any]]]:
        ids: dict[str, DeploymentID] = {}
        loads: dict[str, ShardLoad] = {}
        observed: dict[str, tuple[float | None, float | None]] = {}
        apps = {ctx.app_name or dep_id.app_name for dep_id, ctx in contexts.items()}
        router = router_load(apps.pop()) if len(apps) == 1 else None
        shares = router_shares(router)
        for dep_id, ctx in contexts.items():
            name = ctx.deployment_name or dep_id.name
            if not name.startswith(self.shard_prefix):
                continue
            index = name[len(self.shard_prefix):]
            critical = shares.get(int(index)) if index.isdigit() else None
            loads[name], busy, queued = _shard_load(ctx, critical)
            observed[name] = (busy, queued)
            ids[name] = dep_id
        waiting = bool(router and router.get("waiting", 0) > 0)
        result = decide(loads, self.target_busy, self.max_total_replicas, self.tolerance, waiting)
        fair = 1.0 / max(1, len(loads))
        for name, replicas in result.items():
            hold, before = loads[name].hold, self._target.get(name)
            asked = self._asked.get(name)
            if asked and before is not None and hold != before and (asked[0] - before) * (hold - before) > 0:
                log_decision(contexts[ids[name]].app_name or ids[name].app_name, "autoscale",
                             f"{name}: {before} -> {hold} replicas ({asked[1]})")
            self._target[name] = hold
            if replicas == hold:
                self._asked.pop(name, None)
            else:
                self._asked[name] = (replicas, f"busy {_fmt(observed[name][0])}, critical share "
                                               f"{_fmt(loads[name].critical)}, waiting {int(waiting)}")
        decisions: dict[DeploymentID, int] = {}
        state: dict[DeploymentID, dict[str, Any]] = {}
        for name, replicas in result.items():
            load = loads[name]
            busy, queued = observed[name]
            decisions[ids[name]] = replicas
            state[ids[name]] = {
                "busy": busy,
                "queued": queued,
                "critical": load.critical,
                "requests_waiting": waiting,
                "current": load.current,
                "target": load.hold,
                "wanted": _desired(load, self.target_busy, self.tolerance, fair, waiting),
                "desired": replicas,
            }
        return decisions, state
