"""Real Ray nodes for the KubeRay tests, as `ray start` processes of their own, the way a KubeRay pod runs Ray.

Each cluster lives in a temp dir of its own, on free ports, and is torn down by killing only the processes it
started (their process groups, then any process whose command line names its temp dir). Never `ray stop`: that
kills every Ray on the machine, the test session's and other users' included.
"""

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cluster.deploy import free_port

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def http(method: str, url: str, body: dict | None = None, timeout: float = 30.0, token: str | None = None
         ) -> tuple[int, str]:
    """(status, body) of a JSON request; `token` is Ray's auth token, sent as KubeRay's operator sends it."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["x-ray-authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.5):
    """check()'s first truthy value; AssertionError naming `what` (and the last exception) after timeout_s."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            out = check()
            if out:
                return out
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not after {timeout_s:.0f}s" + (f" (last error: {last!r})" if last else ""))


def pids_in_group(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    out.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return out


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains `text` (a temp dir only this cluster uses)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                line = (d / "cmdline").read_bytes()
                if (text + "/").encode() in line or (text + "\0").encode() in line:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RayNodes:
    """A head (with the dashboard, as KubeRay's head pod runs it) and worker nodes, each a `ray start --block`
    in a process group of its own; `env` is every node's environment on top of this process's (a pod's env).

    Ray's token auth is on with a token of this cluster's own, as KubeRay's `authOptions: {mode: token}` sets
    it up (RAY_AUTH_MODE, RAY_AUTH_TOKEN in every pod); `api()` sends it as the operator does."""

    def __init__(self, env: dict[str, str] | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="rmk-", dir="/tmp")  # short: Ray's socket paths must fit
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = self.dashboard_port = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                "--min-worker-port=0", "--max-worker-port=0", f"--metrics-export-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", "--object-store-memory=100000000"]

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        with open(Path(self.temp_dir) / f"{name}.log", "ab") as log:
            p = subprocess.Popen([RAY, "start", "--block", *args, *self._ports()], env=self.env,
                                 cwd=self.temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start_head(self, num_cpus: int, num_gpus: int = 0, extra: list[str] | None = None,
                   gcs_port: int | None = None) -> None:
        self.gcs_port, self.dashboard_port = gcs_port or free_port(), free_port()
        self.head = self._start([
            "--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}", *(extra or [])],
            "head")
        wait_for("the head's dashboard", lambda: self.nodes(), 120)

    def start_worker(self, num_cpus: int, num_gpus: int = 0, resources: dict | None = None) -> tuple:
        """A worker node (a pod of a worker group); returns (its process, its node id) once it is alive."""
        before = {n["node_id"] for n in self.nodes()}
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        name = f"worker-{len(self.procs)}"
        p = self._start(args, name)
        try:
            node = wait_for("a new worker node", lambda: [n for n in self.nodes() if n["node_id"] not in before],
                            180)
        except AssertionError as e:
            raise AssertionError(f"{e}; `ray start` exited with {p.poll()}, its log ends:\n{self.log(name)}") from None
        return p, node[0]["node_id"]

    def log(self, name: str, chars: int = 3000) -> str:
        path = Path(self.temp_dir) / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, str]:
        """A call to the head's dashboard, authenticated as KubeRay's operator calls it."""
        return http(method, self.dashboard + path, body, timeout, self.token)

    def nodes(self, state: str = "ALIVE") -> list[dict]:
        """The cluster's nodes as the dashboard's state API lists them."""
        status, body = self.api("GET", "/api/v0/nodes?limit=100&detail=true", timeout=10)
        assert status == 200, body
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == state]

    def kill_raylet(self, proc: subprocess.Popen) -> None:
        """SIGKILL the raylet of the node `proc` started, as when its pod dies."""
        raylets = [p for p in pids_in_group(proc.pid) if "/raylet/raylet " in cmdline(p)]
        assert len(raylets) == 1, raylets
        os.kill(raylets[0], signal.SIGKILL)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pass
        mine = [pid for p in self.procs for pid in pids_in_group(p.pid)]
        mine += pids_naming(self.temp_dir)  # Ray's workers run in process groups of their own
        for pid in mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ray/autoscaler/_private/fake_multi_node/example.yaml, which AutoscalingCluster reads but Ray's wheel leaves out.
FAKE_MULTINODE_BASE = {
    "cluster_name": "fake_multinode", "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {}, "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1, "docker": {}, "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def autoscaling_cluster_class():
    """ray.cluster_utils.AutoscalingCluster, made safe for a machine that others run Ray on."""
    from ray.cluster_utils import AutoscalingCluster

    class FakeAutoscalingCluster(AutoscalingCluster):
        """Ray's fake multi-node autoscaling cluster: the head runs the same autoscaler (StandardAutoscaler in
        the head's monitor) as KubeRay's in-tree autoscaler, with FakeMultiNodeProvider "launching" worker nodes
        as local raylets. Unlike AutoscalingCluster.start/shutdown, never `ray stop --force` (it kills every
        Ray on the machine): the head is a RayNodes head (own temp dir, free GCS port, token auth, dashboard),
        and shutdown kills only this cluster's processes. The provider is named as an external module, since
        the fake_multinode type's defaults file is not in Ray's wheel."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            try:
                return super()._generate_config(head_resources, worker_node_types, autoscaler_v2, **config_kwargs)
            except FileNotFoundError:
                config = copy.deepcopy(FAKE_MULTINODE_BASE)
                config["available_node_types"] = copy.deepcopy(worker_node_types)
                config["available_node_types"]["ray.head.default"] = {
                    "resources": head_resources, "node_config": {}, "max_workers": 0}
                config.update(config_kwargs)
                return config

        def start(self, _system_config=None, override_env=None):
            # The data-plane token stands for the one every pod gets from the raymoe-secrets Secret.
            self.nodes = RayNodes(env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                       "RAYMOE_DATA_PLANE_TOKEN": "test-data-plane-token", **(override_env or {})})
            self.nodes.gcs_port = free_port()
            config = copy.deepcopy(self._config)
            config["provider"] = {**config["provider"], "type": "external", "module": FAKE_PROVIDER,
                                  "gcs_address": self.nodes.address}
            path = Path(self.nodes.temp_dir) / "autoscaling.json"
            path.write_text(json.dumps(config))
            head = dict(self._head_resources)
            cpus, gpus = head.pop("CPU", 1), head.pop("GPU", 0)
            extra = [f"--autoscaling-config={path}"]
            if head:
                extra.append(f"--resources={json.dumps(head)}")
            self.nodes.start_head(num_cpus=cpus, num_gpus=gpus, extra=extra, gcs_port=self.nodes.gcs_port)

        def shutdown(self):
            self.nodes.stop()

    return FakeAutoscalingCluster
