"""Application-level Serve autoscaling for the expert shards.

Every expert shard is a Serve deployment named ``ExpertShard-<i>``; its replicas report ``busy`` (fraction of
wall time spent in expert math), ``queued`` (calls waiting) and ``tokens_per_s`` through
``record_autoscaling_stats``. Routing skew makes a few shards hot while others idle, so each shard is sized on
its own load, and an optional budget caps the shards' total so a burst on one shard cannot starve the cluster.

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
    """

    current: int
    min_replicas: int
    max_replicas: int
    busy: float | None
    queued: float = 0.0
    target_replicas: int | None = None

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


def _check_params(target_busy: float, max_total_replicas: int | None, tolerance: float) -> None:
    if not (isinstance(target_busy, int | float) and math.isfinite(target_busy) and target_busy > 0):
        raise ValueError(f"target_busy must be a finite number > 0, got {target_busy!r}")
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if max_total_replicas is not None and (
        isinstance(max_total_replicas, bool) or not isinstance(max_total_replicas, int) or max_total_replicas < 0
    ):
        raise ValueError(f"max_total_replicas must be None or an int >= 0, got {max_total_replicas!r}")


def _desired(shard: ShardLoad, target_busy: float, tolerance: float) -> int:
    """One shard's replica count before the global budget, clamped to its bounds."""
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
    return max(shard.min_replicas, min(shard.max_replicas, desired))


def _work(shard: ShardLoad, target_busy: float) -> float:
    """Busy replica-fractions the shard carries; a shard without metrics is assumed to sit at target."""
    busy = shard.known_busy
    return target_busy * shard.hold if busy is None else busy * shard.current


def _apply_budget(
    shards: Mapping[str, ShardLoad], desired: dict[str, int], target_busy: float, max_total_replicas: int
) -> dict[str, int]:
    """Cut ``desired`` down to ``max_total_replicas`` in total, hottest shards served first."""
    # Minimums first: Serve enforces them whatever the policy says, so they are spent before anything else.
    # If the minimums alone exceed the budget, the minimums win.
    given = {name: shards[name].min_replicas for name in desired}
    left = max_total_replicas - sum(given.values())
    work = {name: _work(shards[name], target_busy) for name in desired}

    def projected(name: str) -> float:
        if given[name] == 0:
            return math.inf if work[name] > 0 else 0.0
        return work[name] / given[name]

    while left > 0:
        wanting = [name for name in desired if given[name] < desired[name]]
        if not wanting:
            break
        # Highest projected busy first; ties go to the smaller name so the outcome is reproducible.
        name = min(wanting, key=lambda n: (-projected(n), n))
        given[name] += 1
        left -= 1
    return given


def decide(
    shards: Mapping[str, ShardLoad],
    target_busy: float,
    max_total_replicas: int | None,
    tolerance: float = 0.2,
) -> dict[str, int]:
    """Replica counts for the expert shards, keyed like ``shards``.

    Per shard: when busy lies outside ``[target_busy * (1 - tolerance), target_busy * (1 + tolerance)]`` the
    shard wants ``ceil(current * busy / target_busy)`` replicas, otherwise it holds; a shard above target with
    calls queued wants at least ``current + 1``; a shard without metrics holds; the result is clamped to
    ``[min_replicas, max_replicas]``.

    Budget: when the shards want more than ``max_total_replicas`` in total, every shard first gets its
    minimum, then the rest of the budget goes out one replica at a time to the shard with the highest projected
    busy (``busy * current / replicas given so far``), never above what it wants. Ties go to the smaller name.

    Worked example, ``target_busy=0.6``, ``tolerance=0.2`` (dead band 0.48..0.72), every shard min 1, max 8::

        shard  current  busy  queued   wants
        A      2        0.9   0        ceil(2 * 0.9 / 0.6) = 3
        B      1        1.2   4        ceil(1 * 1.2 / 0.6) = 2  (queued and hot: at least 1 + 1 = 2)
        C      3        0.1   0        ceil(3 * 0.1 / 0.6) = 1
        D      2        0.6   0        2  (inside the dead band: holds)

    Without a budget the answer is A=3, B=2, C=1, D=2 (8 replicas). With ``max_total_replicas=6``: minimums
    A=B=C=D=1 use 4, leaving 2. Projected busy is then A 1.8/1 = 1.8, B 1.2/1 = 1.2, D 1.2/1 = 1.2 (C already
    has what it wants). The first replica goes to A (now 1.8/2 = 0.9); B and D tie at 1.2 and B wins by name.
    Result: A=2, B=2, C=1, D=1.

    Raises ValueError for a non-positive ``target_busy``, a negative ``tolerance`` or ``max_total_replicas``.
    """
    _check_params(target_busy, max_total_replicas, tolerance)
    desired = {name: _desired(shard, target_busy, tolerance) for name, shard in shards.items()}
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


def _shard_load(ctx: AutoscalingContext) -> tuple[ShardLoad, float | None, float | None]:
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
        busy = None  # nothing running: any leftover numbers describe replicas that are gone
    load = ShardLoad(
        current=current,
        min_replicas=low,
        max_replicas=high,
        busy=busy,
        queued=queued if queued is not None and queued > 0 else 0.0,
        target_replicas=target,
    )
    return load, busy, queued


class ExpertPlanePolicy:
    """Serve application-level autoscaling policy for the ``ExpertShard-<i>`` deployments.

    Serve constructs it once with the application's ``policy_kwargs`` and calls it every tick with the contexts
    of the application's autoscaling deployments. Only deployments whose name starts with ``ExpertShard-`` get a
    decision; any other deployment (``Router``, ``ExpertPlane``) gets none, so Serve leaves it where it is.
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
        self._logged: dict[str, int] = {}  # the last decision logged per shard, so a held wish is logged once

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
        for dep_id, ctx in contexts.items():
            name = ctx.deployment_name or dep_id.name
            if not name.startswith(self.shard_prefix):
                continue
            loads[name], busy, queued = _shard_load(ctx)
            observed[name] = (busy, queued)
            ids[name] = dep_id
        result = decide(loads, self.target_busy, self.max_total_replicas, self.tolerance)
        for name, replicas in result.items():
            if replicas != loads[name].hold and self._logged.get(name) != replicas:
                self._logged[name] = replicas
                log_decision(contexts[ids[name]].app_name or ids[name].app_name, "autoscale",
                             f"{name}: {loads[name].hold} -> {replicas} replicas (busy {observed[name][0]})")
        decisions: dict[DeploymentID, int] = {}
        state: dict[DeploymentID, dict[str, Any]] = {}
        for name, replicas in result.items():
            load = loads[name]
            busy, queued = observed[name]
            decisions[ids[name]] = replicas
            state[ids[name]] = {
                "busy": busy,
                "queued": queued,
                "current": load.current,
                "target": load.hold,
                "wanted": _desired(load, self.target_busy, self.tolerance),
                "desired": replicas,
            }
        return decisions, state
