"""The expert plane's ingress deployment, in a module of its own that imports little: its replica process
starts in a second instead of importing torch and the data plane it never uses."""

import logging
import threading

from ray import serve

log = logging.getLogger(__name__)

PERIODIC_MIN_GAIN = 0.1  # a periodic rebalance moves pairs only for a clear gain in predicted imbalance


@serve.deployment(name="ExpertPlane", ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=2)
class ExpertPlane:
    """Ingress of the expert plane: binds every ExpertShard deployment so that one app deploys them all, and
    rebalances the placement every `rebalance_interval_s` when that is set.

    Routers do not call through it: they speak gRPC to the replicas they find in the directory.
    """

    def __init__(self, rebalance_interval_s: float | None, redundant_experts: int | None, min_copies: int,
                 standby: bool, *shards):
        self.shards = shards  # DeploymentHandles, kept so the shards belong to this application
        self._stop = threading.Event()
        if rebalance_interval_s:
            app = serve.get_replica_context().app_name
            o = dict(redundant_experts=redundant_experts, min_copies=min_copies, standby=standby,
                     window_s=rebalance_interval_s, min_gain=PERIODIC_MIN_GAIN)
            threading.Thread(target=self._rebalance, args=(app, rebalance_interval_s, o), name="rebalance",
                             daemon=True).start()

    def _rebalance(self, app: str, every_s: float, options: dict) -> None:
        from cluster.rebalance import RebalanceOptions, rebalance_loop

        rebalance_loop(app, RebalanceOptions(**options), every_s, self._stop)

    def __del__(self):
        self._stop.set()
