"""The expert-shard autoscaling policy: the pure rule, its Serve adapter on real AutoscalingContexts, and the
config path Serve's controller takes to load it. No Ray cluster is started."""

import math

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from cluster.autoscaling import ROUTER_WAIT_MIN, ExpertPlanePolicy, ShardLoad, critical_shares, decide

APP = "raymoe"
POLICY_PATH = "cluster.autoscaling:ExpertPlanePolicy"


def ctx(
    name: str,
    running: int,
    busy: list[float] | None = None,
    queued: list[float] | None = None,
    *,
    target: int | None = None,
    min_replicas: int = 1,
    max_replicas: int = 8,
    metrics: dict | None = None,
    upscale_delay_s: float = 0.0,
    downscale_delay_s: float = 0.0,
    app: str = APP,
) -> AutoscalingContext:
    """A real AutoscalingContext as the controller builds one: per-replica custom metrics keyed by ReplicaID."""
    dep = DeploymentID(name=name, app_name=app)
    replicas = [ReplicaID(unique_id=f"{name}-r{i}", deployment_id=dep) for i in range(running)]
    if metrics is None:
        metrics = {}
        if busy is not None:
            metrics["busy"] = dict(zip(replicas, busy, strict=True))
        if queued is not None:
            metrics["queued"] = dict(zip(replicas, queued, strict=True))
        metrics["tokens_per_s"] = {r: 100.0 for r in replicas}
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name=name,
        app_name=app,
        current_num_replicas=running,
        target_num_replicas=running if target is None else target,
        running_replicas=replicas,
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=min_replicas,
        capacity_adjusted_max_replicas=max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=1000.0,
        config=AutoscalingConfig(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            upscale_delay_s=upscale_delay_s,
            downscale_delay_s=downscale_delay_s,
        ),
    )


def contexts(*items: AutoscalingContext) -> dict[DeploymentID, AutoscalingContext]:
    return {c.deployment_id: c for c in items}


def by_name(decisions: dict[DeploymentID, int]) -> dict[str, int]:
    return {dep.name: n for dep, n in decisions.items()}


# ---- decide: the pure rule ----


def test_docstring_example():
    shards = {
        "A": ShardLoad(current=2, min_replicas=1, max_replicas=8, busy=0.9, queued=0),
        "B": ShardLoad(current=1, min_replicas=1, max_replicas=8, busy=1.2, queued=4),
        "C": ShardLoad(current=3, min_replicas=1, max_replicas=8, busy=0.1, queued=0),
        "D": ShardLoad(current=2, min_replicas=1, max_replicas=8, busy=0.6, queued=0),
    }
    assert decide(shards, 0.6, None) == {"A": 3, "B": 2, "C": 1, "D": 2}
    assert decide(shards, 0.6, 7) == {"A": 2, "B": 2, "C": 1, "D": 2}
    assert decide(shards, 0.6, 6) == {"A": 2, "B": 1, "C": 1, "D": 2}  # what serves is kept: nothing is spare
    assert decide(shards, 0.6, 8) == {"A": 3, "B": 2, "C": 1, "D": 2}  # budget not binding


def test_critical_path_docstring_example():
    shards = {
        "A": ShardLoad(2, 1, 8, busy=0.3, critical=0.70),
        "B": ShardLoad(2, 1, 8, busy=0.3, critical=0.25),
        "C": ShardLoad(2, 1, 8, busy=0.3, critical=0.05),
        "D": ShardLoad(2, 1, 8, busy=0.3, critical=0.0),
    }
    assert decide(shards, 0.6, 8) == {"A": 2, "B": 2, "C": 1, "D": 1}  # nothing waits: no growth, cold ones shrink
    assert decide(shards, 0.6, 8, requests_waiting=True) == {"A": 2, "B": 2, "C": 2, "D": 2}  # nothing spare
    assert decide(shards, 0.6, 10, requests_waiting=True) == {"A": 4, "B": 2, "C": 2, "D": 2}
    assert decide(shards, 0.6, None, requests_waiting=True) == {"A": 4, "B": 2, "C": 2, "D": 2}


def test_critical_growth_counts_running_replicas_only():
    # 2 running, 2 more starting (Serve's target 4): the share was measured on 2, so it asks for no more yet.
    hot = ShardLoad(2, 1, 16, busy=0.3, target_replicas=4, critical=0.9)
    assert decide({"hot": hot, "cold": ShardLoad(2, 1, 16, busy=0.3, critical=0.1)}, 0.6, None,
                  requests_waiting=True) == {"hot": 4, "cold": 2}
    # Once they serve, the same share doubles it again (at most).
    hot = ShardLoad(4, 1, 16, busy=0.3, critical=0.9)
    assert decide({"hot": hot, "cold": ShardLoad(2, 1, 16, busy=0.3, critical=0.1)}, 0.6, None,
                  requests_waiting=True)["hot"] == 8


def test_a_shard_ending_its_share_of_waits_keeps_its_replicas_though_idle():
    even = {n: ShardLoad(3, 1, 8, busy=0.1, critical=0.5) for n in ("a", "b")}
    assert decide(even, 0.6, None) == {"a": 3, "b": 3}
    assert decide({n: ShardLoad(3, 1, 8, busy=0.1) for n in ("a", "b")}, 0.6, None) == {"a": 1, "b": 1}


def test_a_shard_under_its_share_of_waits_shrinks_only_as_far_as_it_stays_under():
    # 8 shards (fair 0.125, band edge 0.1), all idle by busy: one just under the edge would end 0.18 of the waits
    # with one replica, past the band, so it keeps both; one far under sheds one.
    shards = {f"s{i}": ShardLoad(2, 1, 8, busy=0.1, critical=0.09) for i in range(7)}
    shards["cold"] = ShardLoad(2, 1, 8, busy=0.1, critical=0.04)
    assert decide(shards, 0.6, 16) == {**{f"s{i}": 2 for i in range(7)}, "cold": 1}
    # 4 shards (fair 0.25, edge 0.2): a 4-replica shard ending 0.15 would reach the edge at ceil(4 * 0.15 / 0.2) = 3.
    four = {"a": ShardLoad(4, 1, 8, busy=0.1, critical=0.15), **{n: ShardLoad(1, 1, 8, busy=0.1, critical=0.28)
                                                                  for n in ("b", "c", "d")}}
    assert decide(four, 0.6, None)["a"] == 3


def test_a_shard_whose_lost_replica_is_restarting_keeps_its_target_though_it_reads_cold():
    # Shard "hit" lost one of its 2 replicas; Serve is starting the replacement (target 2, 1 running) and re-placement
    # moved its load away meanwhile, so it ends few waits. Cutting it to 1 would cancel the replacement.
    shards = {f"s{i}": ShardLoad(2, 1, 8, busy=0.1, critical=0.14) for i in range(7)}
    shards["hit"] = ShardLoad(1, 1, 8, busy=0.1, target_replicas=2, critical=0.01)
    assert decide(shards, 0.6, 16)["hit"] == 2
    # Once the replacement serves, a share that stays that low sheds it.
    shards["hit"] = ShardLoad(2, 1, 8, busy=0.1, critical=0.01)
    assert decide(shards, 0.6, 16)["hit"] == 1


def test_critical_shares_need_routers_under_load():
    assert critical_shares([3.0, 1.0], 5.0) == [0.75, 0.25]
    assert critical_shares([0.2, 0.1], 5.0) is None  # waiting 6% of the window: a trickle, not decoding
    assert critical_shares([ROUTER_WAIT_MIN * 5.0, 0.0], 5.0) == [1.0, 0.0]
    assert critical_shares([], 5.0) is None and critical_shares([0.0, 0.0], 5.0) is None


def test_proportional_and_float_exact():
    # 2 * 0.9 / 0.6 is 3.0000000000000004 in floats; it must give 3, not 4.
    assert decide({"s": ShardLoad(2, 1, 8, busy=0.9)}, 0.6, None) == {"s": 3}
    assert decide({"s": ShardLoad(4, 1, 16, busy=1.0)}, 0.5, None) == {"s": 8}


def test_dead_band_edges_hold():
    for busy in (0.48, 0.6, 0.72):
        assert decide({"s": ShardLoad(3, 1, 8, busy=busy)}, 0.6, None) == {"s": 3}
    assert decide({"s": ShardLoad(3, 1, 8, busy=0.75)}, 0.6, None) == {"s": 4}
    assert decide({"s": ShardLoad(3, 1, 8, busy=0.45)}, 0.6, None) == {"s": 3}  # ceil(2.25): still 3


def test_queued_hot_shard_gets_one_more_even_in_band():
    assert decide({"s": ShardLoad(2, 1, 8, busy=0.65, queued=3)}, 0.6, None) == {"s": 3}
    # Queued but not above target: no push.
    assert decide({"s": ShardLoad(2, 1, 8, busy=0.55, queued=3)}, 0.6, None) == {"s": 2}


def test_bounds_clamp():
    assert decide({"s": ShardLoad(2, 1, 4, busy=3.0)}, 0.6, None) == {"s": 4}
    assert decide({"s": ShardLoad(5, 2, 8, busy=0.0)}, 0.6, None) == {"s": 2}
    assert decide({"s": ShardLoad(2, 0, 8, busy=0.0)}, 0.6, None) == {"s": 0}


def test_no_information_holds_at_target():
    assert decide({"s": ShardLoad(2, 1, 8, busy=None)}, 0.6, None) == {"s": 2}
    assert decide({"s": ShardLoad(2, 1, 8, busy=math.nan)}, 0.6, None) == {"s": 2}
    assert decide({"s": ShardLoad(2, 1, 8, busy=None, target_replicas=4)}, 0.6, None) == {"s": 4}


def test_never_moves_against_the_signal_while_replicas_start():
    # 2 running, Serve already driving to 4: a hot shard must not be cut back to 3.
    assert decide({"s": ShardLoad(2, 1, 8, busy=0.9, target_replicas=4)}, 0.6, None) == {"s": 4}
    # A cold shard is not grown to a target above what it needs.
    assert decide({"s": ShardLoad(2, 1, 8, busy=0.1, target_replicas=4)}, 0.6, None) == {"s": 1}


def test_budget_minimums_first_then_hottest():
    shards = {
        "cold": ShardLoad(4, 2, 8, busy=0.05),
        "hot": ShardLoad(2, 1, 8, busy=1.8),  # wants 6
        "warm": ShardLoad(2, 1, 8, busy=1.2),  # wants 4
    }
    assert decide(shards, 0.6, None) == {"cold": 2, "hot": 6, "warm": 4}
    got = decide(shards, 0.6, 7)
    assert sum(got.values()) == 7
    assert got["cold"] == 2  # its minimum, nothing more
    # 3 left after minimums (2+1+1); hot projects 3.6, then 1.8 vs warm 2.4, then 1.8 vs 1.2.
    assert got == {"cold": 2, "hot": 3, "warm": 2}


def test_budget_below_minimums_gives_minimums():
    shards = {"a": ShardLoad(2, 2, 8, busy=2.0), "b": ShardLoad(2, 2, 8, busy=2.0)}
    assert decide(shards, 0.6, 3) == {"a": 2, "b": 2}


def test_budget_ties_break_by_name():
    shards = {n: ShardLoad(1, 0, 8, busy=1.2) for n in ("z", "b", "m")}
    assert decide(shards, 0.6, 2) == {"b": 1, "m": 1, "z": 0}
    assert decide(shards, 0.6, 4) == {"b": 2, "m": 1, "z": 1}


def test_bad_parameters_raise():
    with pytest.raises(ValueError):
        decide({}, 0.0, None)
    with pytest.raises(ValueError):
        decide({}, 0.6, -1)
    with pytest.raises(ValueError):
        decide({}, 0.6, None, tolerance=-0.1)
    with pytest.raises(ValueError):
        ShardLoad(1, 3, 2, busy=0.5)
    with pytest.raises(ValueError):
        ExpertPlanePolicy(target_busy=0)


# ---- ExpertPlanePolicy on real AutoscalingContexts ----


def test_hot_shard_scales_up_proportionally():
    policy = ExpertPlanePolicy(target_busy=0.6)
    decisions, state = policy(contexts(ctx("ExpertShard-0", 2, busy=[0.8, 1.0], queued=[0.0, 0.0])))
    assert by_name(decisions) == {"ExpertShard-0": 3}  # ceil(2 * 0.9 / 0.6)
    (dep,) = decisions
    assert state[dep]["busy"] == pytest.approx(0.9)
    assert state[dep]["desired"] == 3 and state[dep]["wanted"] == 3 and state[dep]["current"] == 2


def test_idle_shard_scales_down_to_min():
    policy = ExpertPlanePolicy(target_busy=0.6)
    decisions, _ = policy(contexts(ctx("ExpertShard-1", 4, busy=[0.0, 0.01, 0.0, 0.0], min_replicas=1)))
    assert by_name(decisions) == {"ExpertShard-1": 1}


def test_within_tolerance_no_change():
    policy = ExpertPlanePolicy(target_busy=0.6, tolerance=0.2)
    decisions, _ = policy(contexts(ctx("ExpertShard-2", 3, busy=[0.55, 0.65, 0.62])))
    assert by_name(decisions) == {"ExpertShard-2": 3}


def test_queued_pushes_one_more():
    policy = ExpertPlanePolicy(target_busy=0.6)
    decisions, state = policy(contexts(ctx("ExpertShard-0", 2, busy=[0.65, 0.65], queued=[2.0, 0.0])))
    assert by_name(decisions) == {"ExpertShard-0": 3}
    assert state[next(iter(decisions))]["queued"] == pytest.approx(1.0)


def test_budget_caps_total_and_feeds_hottest_first():
    policy = ExpertPlanePolicy(target_busy=0.5, max_total_replicas=6)
    decisions, state = policy(
        contexts(
            ctx("ExpertShard-0", 2, busy=[1.0, 1.0]),  # wants 4, projected 2.0 at 1 replica
            ctx("ExpertShard-1", 2, busy=[0.75, 0.75]),  # wants 3, projected 1.5 at 1 replica
            ctx("ExpertShard-2", 2, busy=[0.1, 0.1]),  # wants 1
            ctx("ExpertShard-3", 1, busy=[0.5]),  # holds 1
        )
    )
    got = by_name(decisions)
    assert sum(got.values()) == 6
    # Minimums 4, then 2 left: shard 0 (2.0), then shard 1 (1.5) beats shard 0 (2.0/2 = 1.0).
    assert got == {"ExpertShard-0": 2, "ExpertShard-1": 2, "ExpertShard-2": 1, "ExpertShard-3": 1}
    wanted = {dep.name: s["wanted"] for dep, s in state.items()}
    assert wanted == {"ExpertShard-0": 4, "ExpertShard-1": 3, "ExpertShard-2": 1, "ExpertShard-3": 1}


def test_other_deployments_get_no_decision():
    policy = ExpertPlanePolicy(target_busy=0.6)
    router = ctx("Router", 2, busy=[5.0, 5.0], queued=[9.0, 9.0])
    plane = ctx("ExpertPlane", 1, busy=[5.0])
    shard = ctx("ExpertShard-0", 1, busy=[0.6])
    decisions, state = policy(contexts(router, plane, shard))
    assert set(decisions) == {shard.deployment_id}
    assert set(state) == {shard.deployment_id}


def test_missing_metrics_keep_current():
    policy = ExpertPlanePolicy(target_busy=0.6)
    cases = [
        ctx("ExpertShard-0", 3, metrics={}),  # nothing reported yet
        ctx("ExpertShard-1", 2, metrics={"tokens_per_s": {}}),  # other metrics only
        ctx("ExpertShard-2", 2, metrics={"busy": {}}),  # empty per-replica map
        ctx("ExpertShard-3", 0, target=2, metrics={}),  # replicas still starting: hold Serve's target
    ]
    none_metrics = ctx("ExpertShard-4", 2)
    none_metrics._aggregated_metrics_value = None  # the controller may hand over None
    nan_metrics = ctx("ExpertShard-5", 2, busy=[math.nan, math.nan])
    decisions, state = policy(contexts(*cases, none_metrics, nan_metrics))
    assert by_name(decisions) == {
        "ExpertShard-0": 3,
        "ExpertShard-1": 2,
        "ExpertShard-2": 2,
        "ExpertShard-3": 2,
        "ExpertShard-4": 2,
        "ExpertShard-5": 2,
    }
    assert all(s["busy"] is None for s in state.values())


def test_metric_read_failure_holds_instead_of_raising():
    def broken():
        raise RuntimeError("metrics store gone")

    policy = ExpertPlanePolicy(target_busy=0.6)
    bad = ctx("ExpertShard-0", 2, metrics={})
    bad._aggregated_metrics_value = broken  # lazy metrics, as Serve passes them
    decisions, _ = policy(contexts(bad, ctx("ExpertShard-1", 1, busy=[1.2])))
    assert by_name(decisions) == {"ExpertShard-0": 2, "ExpertShard-1": 2}


def test_bounds_respected():
    policy = ExpertPlanePolicy(target_busy=0.6)
    decisions, _ = policy(
        contexts(
            ctx("ExpertShard-0", 2, busy=[3.0, 3.0], max_replicas=4),  # wants 10
            ctx("ExpertShard-1", 4, busy=[0.0] * 4, min_replicas=2),  # wants 0
        )
    )
    assert by_name(decisions) == {"ExpertShard-0": 4, "ExpertShard-1": 2}


def test_stale_replica_metrics_ignored():
    c = ctx("ExpertShard-0", 2, busy=[0.6, 0.6])
    gone = ReplicaID(unique_id="gone", deployment_id=c.deployment_id)
    c.aggregated_metrics["busy"][gone] = 50.0  # a replica no longer running
    decisions, _ = ExpertPlanePolicy(target_busy=0.6)(contexts(c))
    assert by_name(decisions) == {"ExpertShard-0": 2}


# ---- the config path the controller takes ----

SHARD_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "initial_replicas": 1,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 5.0,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
}
POLICY_KWARGS = {"target_busy": 0.6, "max_total_replicas": 12}


def app_config() -> dict:
    return {
        "name": APP,
        "route_prefix": "/",
        "import_path": "cluster.app:build_app",
        "autoscaling_policy": {"policy_function": POLICY_PATH, "policy_kwargs": POLICY_KWARGS},
        "deployments": [{"name": "ExpertShard-0", "autoscaling_config": SHARD_AUTOSCALING}],
    }


def test_serve_schema_accepts_app_level_policy():
    app = ServeApplicationSchema.model_validate(app_config())
    assert app.autoscaling_policy == {"policy_function": POLICY_PATH, "policy_kwargs": POLICY_KWARGS}
    deploy = ServeDeploySchema.model_validate({"applications": [app_config()]})
    (parsed,) = deploy.applications
    assert parsed.autoscaling_policy["policy_function"] == POLICY_PATH
    assert parsed.deployments[0].autoscaling_config["max_replicas"] == 4
    # The controller rebuilds the policy from this dict exactly so.
    policy = AutoscalingPolicy(**parsed.autoscaling_policy)
    assert policy.policy_kwargs == POLICY_KWARGS and not policy.is_default_policy_function()


def test_controller_resolves_class_with_kwargs_and_calls_it():
    policy_cfg = AutoscalingPolicy(policy_function=POLICY_PATH, policy_kwargs=POLICY_KWARGS)
    # Round-trip through the serialized definition, as the controller receives it (pickled by value).
    policy_cfg = AutoscalingPolicy(
        _serialized_policy_def=policy_cfg.get_serialized_policy_def(),
        policy_function=policy_cfg.policy_function,
        policy_kwargs=policy_cfg.policy_kwargs,
    )
    resolved = _resolve_policy_callable(policy_cfg)
    assert callable(resolved) and not isinstance(resolved, type)
    assert resolved.target_busy == 0.6 and resolved.max_total_replicas == 12

    ctxs = contexts(
        ctx("Router", 1, busy=[9.0]),
        ctx("ExpertShard-0", 2, busy=[1.2, 1.2], max_replicas=8),  # wants 4
        ctx("ExpertShard-1", 2, busy=[0.1, 0.1]),  # wants 1
    )
    decisions, state = resolved(ctxs)
    assert by_name(decisions) == {"ExpertShard-0": 4, "ExpertShard-1": 1}
    assert all(isinstance(s, dict) for s in state.values())

    # Wrapped as ApplicationAutoscalingState.register wraps it: bounds and (zero) delays pass the decision through,
    # the non-shard deployment still gets none, and Serve's own delay keys join our state.
    wrapped = _apply_app_level_autoscaling_config(resolved)
    final, final_state = wrapped(ctxs)
    assert by_name(final) == {"ExpertShard-0": 4, "ExpertShard-1": 1}
    shard0 = next(d for d in final if d.name == "ExpertShard-0")
    assert final_state[shard0]["desired"] == 4 and final_state[shard0]["busy"] == pytest.approx(1.2)


def test_wrapped_policy_respects_serve_upscale_delay():
    resolved = _resolve_policy_callable(AutoscalingPolicy(policy_function=POLICY_PATH, policy_kwargs=POLICY_KWARGS))
    wrapped = _apply_app_level_autoscaling_config(resolved)
    hot = ctx("ExpertShard-0", 2, busy=[1.2, 1.2], upscale_delay_s=60.0)
    final, _ = wrapped(contexts(hot))
    assert by_name(final) == {"ExpertShard-0": 2}  # Serve holds until the delay has passed


def test_the_log_holds_the_scalings_serve_applied_not_each_wish(ray_session):
    """The decision log says what Serve did with the policy's answers: a wish that flickers off before Serve's delay
    has passed is not a decision (the log would fill with "2 -> 1" that never happened); a target Serve moved the
    way the policy asked is one, logged once, with the load that asked for it; a target moved by hand is not the
    policy's."""
    from cluster.autoscaling import decisions

    app = "log-applied"
    policy = ExpertPlanePolicy(target_busy=0.6)

    def tick(busy: float, target: int) -> None:
        policy(contexts(ctx("ExpertShard-0", 2, busy=[busy, busy], target=target, app=app)))

    for busy, target in [(0.1, 2), (0.6, 2), (0.1, 2), (0.6, 2),  # a wish to shrink, flickering: Serve holds
                         (0.9, 2), (0.9, 2), (0.9, 3), (0.6, 3),  # a wish to grow that Serve applies after a tick
                         (0.6, 4)]:  # someone scaled the shard by hand: not the policy's decision
        tick(busy, target)
    logged = [d["detail"] for d in decisions(app) if d["kind"] == "autoscale"]
    assert logged == ["ExpertShard-0: 2 -> 3 replicas (busy 0.90, critical share n/a, waiting 0)"], logged
