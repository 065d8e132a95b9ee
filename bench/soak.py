"""`raymoe bench soak`: thousands of mixed requests at high concurrency against the server with Ray experts.

The server is deployed from the same settings `raymoe serve` uses (the Router ingress, its expert shards as
Serve deployments reached over gRPC), under an app name and route prefix of its own, and deleted afterwards.
The requests (bench/soak_requests.py) mix completions and chat, streamed or not, streams the client drops
mid-way, and invalid requests that must get their 4xx. Reported: unexpected outcomes (the target is 0),
the RSS of the router and of every expert replica at the end of the first and of the last `window` requests
and its growth (the target is under 5%), p50/p99 latency per kind, generated tokens per second.
"""

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.harness import percentile
from bench.soak_requests import Case, Outcome, plan, send
from checkpoint.bundled import BUNDLED_MODEL


@dataclass
class SoakBenchOptions:
    """The load, its mix and the server under it."""

    model: Path | None = field(default=None, metadata={
        "help": "checkpoint with a tokenizer and a chat template (default: the bundled one)"})
    requests: int = field(default=10_000, metadata={"help": "requests in all"})
    concurrency: int = field(default=64, metadata={"help": "requests in flight at once (and the router's batch)"})
    min_tokens: int = field(default=8, metadata={"help": "smallest max_tokens of a request"})
    max_tokens: int = field(default=32, metadata={"help": "largest max_tokens of a request (cancelled streams ask "
                                                          "for 4x, so that the drop comes mid-stream)"})
    stream_fraction: float = field(default=0.5, metadata={"help": "of the valid, uncancelled requests: streamed"})
    chat_fraction: float = field(default=0.5, metadata={"help": "of the valid requests: chat completions"})
    cancel_fraction: float = field(default=0.1, metadata={"help": "of all: streams dropped after their first text"})
    invalid_fraction: float = field(default=0.05, metadata={"help": "of all: invalid requests (expect their 4xx)"})
    window: int = field(default=1000, metadata={
        "help": "RSS is read when the first and the last this many requests have finished"})
    num_shards: int = field(default=2, metadata={"help": "expert shards (Serve deployments)"})
    expert_num_cpus: float = field(default=0.5, metadata={"help": "CPUs per expert replica"})
    router_num_cpus: float = field(default=1.0, metadata={"help": "CPUs of the router replica"})
    timeout_s: float = field(default=300.0, metadata={"help": "a request not done by then is unexpected"})
    seed: int = field(default=0, metadata={"help": "of the request mix"})
    out: Path | None = field(default=None, metadata={"help": "results (JSON)"})


def deploy_server(o: SoakBenchOptions, name: str, route_prefix: str) -> str:
    """Deploy the server as `raymoe serve` would, as app `name` at `route_prefix`; its base URL."""
    from cluster.deploy import deploy, http_port
    from cluster.serve_config import serve_config
    from router.config import EngineConfig, ExpertPlaneConfig
    from server.config import ServerConfig

    engine = EngineConfig(model=str(o.model or BUNDLED_MODEL), max_num_seqs=o.concurrency)
    plane = ExpertPlaneConfig(expert_backend="ray", num_shards=o.num_shards, expert_num_cpus=o.expert_num_cpus)
    server = ServerConfig(router_num_cpus=o.router_num_cpus, router_threads=max(1, int(o.router_num_cpus)))
    cfg = serve_config(engine, plane, server)
    cfg["applications"][0].update(name=name, route_prefix=route_prefix)
    deploy(cfg)
    return f"http://127.0.0.1:{http_port()}{route_prefix.rstrip('/')}"


def replica_rss(app: str) -> dict[str, tuple[int, int]]:
    """Deployment replica label (Router#0, ExpertShard-1#0, ...) -> (pid, RSS bytes) of every replica of `app`.

    Replicas are Ray actors whose class is "ServeReplica:<app>:<deployment>"; the expert plane's ingress holds no
    weights and takes no traffic, so it is left out.
    """
    from bench.leaks import alive_actors, rss_bytes

    prefix = f"ServeReplica:{app}:"
    found: dict[str, list[tuple[str, int]]] = {}
    for a in alive_actors().values():
        if a["class"].startswith(prefix) and not a["class"].endswith(":ExpertPlane"):
            found.setdefault(a["class"][len(prefix):], []).append((a["name"], a["pid"]))
    return {f"{dep}#{i}": (pid, rss_bytes(pid)) for dep, reps in sorted(found.items())
            for i, (_, pid) in enumerate(sorted(reps))}


async def drive(base: str, cases: list[Case], o: SoakBenchOptions, app: str, progress: bool
                ) -> tuple[list[Outcome], dict[str, dict[str, tuple[int, int]]], float]:
    """Send every case, `concurrency` at a time; (outcomes, RSS at the two marks, wall seconds)."""
    import aiohttp
    from tqdm import tqdm

    outcomes: list[Outcome] = []
    rss: dict[str, dict[str, tuple[int, int]]] = {}
    marks = {min(o.window, len(cases)): "first", len(cases): "last"}
    pending = iter(cases)
    bar = tqdm(total=len(cases), desc="soak", disable=not progress, smoothing=0.05)
    bad = 0

    async def worker(session) -> None:
        nonlocal bad
        for case in pending:  # one iterator shared by every worker: each case goes out once
            outcomes.append(out := await send(session, base, case, o.timeout_s))
            bar.update()
            bad += not out.ok
            if bad:
                bar.set_postfix(unexpected=bad, refresh=False)
            mark = marks.get(len(outcomes))
            if mark:
                rss[mark] = await asyncio.to_thread(replica_rss, app)

    # One connection per worker; a cancelled stream's connection is closed, and a fresh one replaces it.
    connector = aiohttp.TCPConnector(limit=o.concurrency)
    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(o.concurrency)))
    wall = time.perf_counter() - start
    bar.close()
    return outcomes, rss, wall


def summarize(outcomes: list[Outcome], rss: dict, wall: float, health: int | None) -> dict:
    kinds = sorted({x.kind for x in outcomes})
    per_kind = {}
    for k in kinds:
        xs = [x for x in outcomes if x.kind == k]
        ttft = [x.ttft for x in xs if x.ttft is not None]
        per_kind[k] = dict(requests=len(xs), ok=sum(x.ok for x in xs), unexpected=sum(not x.ok for x in xs),
                           p50_s=percentile([x.seconds for x in xs], 50),
                           p99_s=percentile([x.seconds for x in xs], 99),
                           ttft_p50_s=percentile(ttft, 50) if ttft else None,
                           ttft_p99_s=percentile(ttft, 99) if ttft else None)
    cancelled = sum(x.detail == "cancelled" for x in outcomes)
    memory = {}
    for label in sorted(set(rss.get("first", {})) | set(rss.get("last", {}))):
        (pid0, first), (pid1, last) = rss.get("first", {}).get(label, (0, 0)), rss.get("last", {}).get(label, (0, 0))
        same = pid0 == pid1 and first and last  # a replica restarted (or gone) has no growth to speak of
        memory[label] = dict(pid_first=pid0, pid_last=pid1, first_mb=first / 2**20, last_mb=last / 2**20,
                             growth_pct=100 * (last - first) / first if same else None)
    growths = [m["growth_pct"] for m in memory.values()]
    tokens = sum(x.tokens for x in outcomes)
    unexpected = [x for x in outcomes if not x.ok]
    restarted = [label for label, m in memory.items() if m["growth_pct"] is None]
    return dict(
        requests=len(outcomes), wall_s=wall, unexpected=len(unexpected) + (health != 200) + len(restarted),
        unexpected_examples=[asdict(x) for x in unexpected[:20]], health_after=health,
        replicas_restarted_or_gone=restarted, cancelled_mid_stream=cancelled, kinds=per_kind, rss=memory,
        max_rss_growth_pct=max((g for g in growths if g is not None), default=None),
        generated_tokens=tokens, tokens_per_s=tokens / wall if wall else 0.0)


def soak(o: SoakBenchOptions, name: str = "raymoe-soak", route_prefix: str = "/soak", progress: bool = False
         ) -> dict:
    """On a running Ray with Serve: deploy, send the mix, read the server's health, delete; the summary."""
    import urllib.request

    from cluster.ray_init import remove_apps

    if not 0 < o.window < o.requests:
        raise ValueError(f"window ({o.window}) must be between 0 and requests ({o.requests}): RSS is compared "
                         "between the first and the last window")
    cases = plan(o.requests, o.seed, (o.min_tokens, o.max_tokens), o.cancel_fraction, o.invalid_fraction,
                 o.stream_fraction, o.chat_fraction)
    try:
        base = deploy_server(o, name, route_prefix)
        outcomes, rss, wall = asyncio.run(drive(base, cases, o, name, progress))
        try:
            with urllib.request.urlopen(base + "/health", timeout=30) as r:
                health = r.status
        except OSError as e:  # HTTPError included: an unhealthy server after the soak is a finding
            health = getattr(e, "code", None)
    finally:
        remove_apps([name], started_serve=False, started_ray=False)
    return summarize(outcomes, rss, wall, health)


def report(r: dict) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.0f}"

    print(f"\n{'kind':<18}{'requests':>9}{'ok':>7}{'unexpected':>11}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'TTFT p50':>9}{'p99':>7}")
    for k, v in r["kinds"].items():
        print(f"{k:<18}{v['requests']:>9}{v['ok']:>7}{v['unexpected']:>11}{ms(v['p50_s']):>8}{ms(v['p99_s']):>8}"
              f"{ms(v['ttft_p50_s']):>9}{ms(v['ttft_p99_s']):>7}")
    print(f"\n{'process':<18}{'pid':>8}{'RSS first MiB':>14}{'last MiB':>9}{'growth':>8}")
    for label, m in r["rss"].items():
        g = "-" if m["growth_pct"] is None else f"{m['growth_pct']:+.1f}%"
        print(f"{label:<18}{m['pid_last']:>8}{m['first_mb']:>14.1f}{m['last_mb']:>9.1f}{g:>8}")
    growth = r["max_rss_growth_pct"]
    print(f"\n{r['requests']} requests in {r['wall_s']:.0f}s: {r['unexpected']} unexpected, "
          f"{r['cancelled_mid_stream']} cancelled mid-stream, {r['generated_tokens']} tokens "
          f"({r['tokens_per_s']:.0f}/s), health after: {r['health_after']}, largest RSS growth "
          f"{'-' if growth is None else f'{growth:+.1f}%'}")
    for x in r["unexpected_examples"][:5]:
        print(f"  unexpected: #{x['index']} {x['kind']} status {x['status']}: {x['detail']}")


def run(o: SoakBenchOptions) -> None:
    from cluster.deploy import free_port
    from cluster.ray_init import remove_apps, start_or_join_ray, start_serve

    # Logical CPUs are scheduling slots, as `raymoe serve` has them: the router and the shards fit beside each other.
    started_ray = start_or_join_ray(num_cpus=max(os.cpu_count() or 1, 16), log_to_driver=False)
    started_serve = start_serve({"host": "127.0.0.1", "port": free_port()})
    try:
        r = soak(o, progress=True)
    finally:
        remove_apps([], started_serve, started_ray)
    report(r)
    if o.out:
        o.out.parent.mkdir(parents=True, exist_ok=True)
        o.out.write_text(json.dumps({"options": {k: str(v) for k, v in vars(o).items()}, **r}, indent=1))
        print(f"results: {o.out}")
