"""What a process holds that it could leak, seen from inside it: threads, listening ports, gRPC channels, child
processes, open files, the Ray actors and Serve apps alive; and the RSS of other processes (Ray actors').

psutil comes with Ray (vendored under ray/thirdparty_files, which `import ray` puts on sys.path), so these
helpers import ray first and add no dependency.
"""

import gc
import threading
from dataclasses import dataclass, field


def _psutil():
    import importlib

    import ray  # noqa: F401 (puts Ray's vendored psutil on sys.path, so it must come first)

    return importlib.import_module("psutil")


def alive_actors() -> dict[str, dict]:
    """Actor id -> {"class", "name", "pid"} of every ALIVE actor of the connected cluster ({} without Ray).

    Read from the GCS actor table: `ray.util.state.list_actors` needs the dashboard, which raymoe's local Ray
    runs without (cluster.ray_init).
    """
    import ray

    if not ray.is_initialized():
        return {}
    from ray._private.state import actors

    return {aid: {"class": a["ActorClassName"], "name": a["Name"], "pid": a["Pid"]}
            for aid, a in actors(actor_state_name="ALIVE").items()}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 if it is gone)."""
    psutil = _psutil()
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def serve_apps() -> set[str]:
    """The Serve applications of the connected cluster (none without Ray or Serve)."""
    import ray

    if not ray.is_initialized():
        return set()
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        return set()
    return set(serve.status().applications)


def grpc_channels() -> int:
    """gRPC channel objects (sync and asyncio) alive in this process, after a collection."""
    import grpc

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, grpc.Channel | grpc.aio.Channel))


@dataclass
class Snapshot:
    threads: set[threading.Thread]
    listening: set[tuple[str, int]]  # (address, port) this process listens on
    channels: int
    children: set[int]  # pids of child processes while no Ray runs here
    actors: dict[str, dict] = field(default_factory=dict)
    apps: set[str] = field(default_factory=set)
    fds: int = 0
    rss: int = 0


def snapshot() -> Snapshot:
    import ray

    psutil = _psutil()
    me = psutil.Process()
    conns = me.net_connections(kind="inet")
    return Snapshot(
        threads={t for t in threading.enumerate() if t.is_alive()},
        listening={(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN},
        channels=grpc_channels(),
        # A Ray started here has its raylet and worker pool below this process: only without Ray do children
        # say something (an LLM that started Ray must have stopped all of it).
        children=set() if ray.is_initialized() else {p.pid for p in me.children(recursive=True)},
        actors=alive_actors(), apps=serve_apps(), fds=me.num_fds(), rss=me.memory_info().rss)


def leaks(before: Snapshot, after: Snapshot, allowed_actors: set[str] = frozenset()) -> list[str]:
    """What `after` holds that `before` did not, as readable lines (empty: nothing leaked).

    allowed_actors: actor names that may appear (the cluster's replica directory, detached and shared by every
    plane by design). Open files and RSS are not judged here: Ray's own shutdown keeps a few descriptors.
    """
    out = []
    threads = after.threads - before.threads
    if threads:
        out.append(f"threads: {sorted(t.name for t in threads)}")
    if after.listening - before.listening:
        out.append(f"listening ports: {sorted(after.listening - before.listening)}")
    if after.channels > before.channels:
        out.append(f"gRPC channels: {after.channels - before.channels} more")
    children = after.children - before.children
    if children:
        out.append(f"child processes: {sorted(children)}")
    actors = [f"{a['class']}({a['name']})" for aid, a in after.actors.items()
              if aid not in before.actors and a["name"] not in allowed_actors]
    if actors:
        out.append(f"actors: {sorted(actors)}")
    if after.apps - before.apps:
        out.append(f"Serve apps: {sorted(after.apps - before.apps)}")
    return out


def connections_to(addresses: set[str]) -> list[str]:
    """This process's inet sockets to any of `addresses` ("host:port"), as "host:port" (empty: none open)."""
    psutil = _psutil()
    return sorted(f"{c.raddr.ip}:{c.raddr.port}" for c in psutil.Process().net_connections(kind="inet")
                  if c.raddr and f"{c.raddr.ip}:{c.raddr.port}" in addresses)
