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

    def __init__(self, rebalance_interval_s: float | None, redundant_experts: int | None, *shards):
        self.shards = shards  # DeploymentHandles, kept so the shards belong to this application
        self._stop = threading.Event()
        if rebalance_interval_s:
            app = serve.get_replica_context().app_name
            threading.Thread(target=self._rebalance_loop, args=(app, rebalance_interval_s, redundant_experts),
                             name="rebalance", daemon=True).start()

    def _rebalance_loop(self, app: str, every_s: float, redundant: int | None) -> None:
        from cluster.rebalance import RebalanceOptions, rebalance

        o = RebalanceOptions(redundant_experts=redundant, window_s=every_s, min_gain=PERIODIC_MIN_GAIN)
        while not self._stop.wait(every_s):
            try:
                r = rebalance(app, o)
                if r["switched"]:
                    log.info("rebalanced to placement v%d: predicted imbalance %.2f -> %.2f", r["version"],
                             r["imbalance_before"], r["imbalance_after"])
            except (ValueError, TimeoutError) as e:  # no traffic, or a deployment under way: next round
                log.info("no rebalance: %s", e)
            except Exception:
                log.exception("rebalance failed")

    def __del__(self):
        self._stop.set()
