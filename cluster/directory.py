"""The directory of live expert replicas: a named Ray actor that replicas register with and routers read.

Entries are keyed by Serve application name, so two expert planes in one Ray cluster never mix.
Snapshots travel as msgpack (compact records, no tensors).
"""

import time

import msgpack
import ray

NAMESPACE = "raymoe"
DIRECTORY_NAME = "raymoe-directory"


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    def __init__(self):
        self.apps: dict[str, dict[str, dict]] = {}  # app -> replica_id -> entry
        self.version = 0  # bumps on every change, so readers can tell a stale view

    def register(self, entry: dict) -> None:
        replicas = self.apps.setdefault(entry["app"], {})
        if replicas.get(entry["replica_id"]) != entry:
            replicas[entry["replica_id"]] = entry
            self.version += 1

    def deregister(self, app: str, replica_id: str) -> None:
        if self.apps.get(app, {}).pop(replica_id, None) is not None:
            self.version += 1

    def report_dead(self, app: str, address: str) -> None:
        """A router could not reach `address`: drop it until its replica registers again."""
        replicas = self.apps.get(app, {})
        for rid in [r for r, e in replicas.items() if e["address"] == address]:
            del replicas[rid]
            self.version += 1

    def remove_app(self, app: str) -> None:
        if self.apps.pop(app, None) is not None:
            self.version += 1

    def snapshot(self, app: str) -> bytes:
        """msgpack of {"version": int, "replicas": [entry, ...]} for one app."""
        return msgpack.packb({"version": self.version, "replicas": list(self.apps.get(app, {}).values())})

    def app_names(self) -> list[str]:
        return sorted(app for app, replicas in self.apps.items() if replicas)


def get_directory():
    """The cluster's directory actor, created on first use; it outlives whoever created it."""
    return ReplicaDirectory.options(name=DIRECTORY_NAME, namespace=NAMESPACE, get_if_exists=True,
                                    lifetime="detached").remote()


class DirectoryClient:
    """A picklable way to the directory, handed to replicas (as their `Registry`) and routers.

    Holds no actor handle, so it can travel inside Serve deployment arguments and config-built apps.
    """

    def __init__(self, app: str | None = None):
        self.app = app
        self._actor = None

    def __getstate__(self):
        return {"app": self.app}

    def __setstate__(self, state):
        self.app, self._actor = state["app"], None

    @property
    def actor(self):
        if self._actor is None:
            self._actor = get_directory()
        return self._actor

    # --- Registry (replica side) --------------------------------------------------------------

    def register(self, entry: dict) -> None:
        ray.get(self.actor.register.remote(entry), timeout=60)

    def deregister(self, app: str, replica_id: str) -> None:
        ray.get(self.actor.deregister.remote(app, replica_id), timeout=5)

    # --- ReplicaSource (router side) ----------------------------------------------------------

    def replicas(self) -> list[dict]:
        return msgpack.unpackb(ray.get(self.actor.snapshot.remote(self.app)))["replicas"]

    def report_dead(self, address: str) -> None:
        self.actor.report_dead.remote(self.app, address)  # fire and forget: the caller has moved on

    def remove_app(self) -> None:
        ray.get(self.actor.remove_app.remote(self.app))

    def app_names(self) -> list[str]:
        return ray.get(self.actor.app_names.remote())

    def wait_for_shards(self, timeout_s: float, poll_s: float = 0.2) -> list[dict]:
        """Entries once every shard of the plan has a registered replica; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            entries = self.replicas()
            if entries:
                want = set(range(entries[0]["num_shards"]))
                missing = want - {e["shard"] for e in entries}
                if not missing:
                    return entries
            else:
                missing = "all"
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert plane {self.app!r}: no live replica for shards {missing} "
                                   f"after {timeout_s:.0f}s")
            time.sleep(poll_s)
