"""`raymoe bench dispatch`: gRPC scatter/gather beside a bare echo floor; "ray" decode beside "local" and HF.

Part 1 times one layer's scatter/gather (GrpcExperts.forward: split by shard, serialise, one call per
replica touched, all in flight, gather, sum) against an echo of the same byte counts to the same
replica processes over the same channels: the floor any dispatch over gRPC pays. Its checkpoint has a
small intermediate size so that the expert math, reported beside it, does not hide the transport.
Then C callers send the same layer's messages at once (as C routers or micro-batches would), and the
replicas' Info says how many calls each run of expert math took (they merge concurrent calls of a layer).
Part 2 decodes the model-core benchmark checkpoint with the experts on Ray, in-process, and in HF, and says how
many of the machine's cores the Ray decode kept busy (router and replicas together), and how many the router
alone: what overlapping a micro-batch's calls with the other's attention can gain is bounded by the cores left
idle, and with cores left idle the step waits on the chain router -> replicas -> router, not on the machine.
It is bounded by the router's own work too: beside the share of dispatch time ping-pong hid, the most it could.
"""

import asyncio
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.harness import bench_checkpoint, best_of_each, cores_busy, percentile, with_threads
from checkpoint.args import ModelArgs
from checkpoint.hf import expert_names
from checkpoint.writer import save_checkpoint
from protos import expert_pb2


@dataclass
class DispatchBenchOptions:
    """The latency and decode runs."""

    hidden: list[int] = field(default_factory=lambda: [512, 4096], metadata={"help": "hidden sizes (latency runs)"})
    tokens: list[int] = field(default_factory=lambda: [1, 16, 64, 256], metadata={"help": "tokens per layer call"})
    intermediate: int = field(default=16, metadata={
        "help": "expert intermediate size of the latency checkpoint (small: it measures transport)"})
    iters: int = field(default=100, metadata={"help": "timed layer calls per (hidden, tokens)"})
    num_shards: int = field(default=8, metadata={"help": "expert shards of the latency runs"})
    callers: list[int] = field(default_factory=lambda: [1, 4], metadata={
        "help": "concurrent callers of one layer (routers or micro-batches) in the latency runs' second table"})
    decode_shards: list[int] = field(default_factory=lambda: [8, 2], metadata={
        "help": "expert shards of the ray decode runs, one run each (8: one expert per shard)"})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "decode batch sizes"})
    router_threads: int = field(default=1, metadata={
        "help": "torch threads of the router while decoding with experts on Ray (their math runs in the "
                "replicas; local and HF keep the process default)"})
    new_tokens: int = field(default=32, metadata={"help": "tokens generated per sequence"})
    prompt_len: int = field(default=16, metadata={"help": "prompt tokens per sequence"})
    repeats: int = field(default=3, metadata={"help": "timed decode runs (the best counts)"})
    skip_latency: bool = field(default=False, metadata={"help": "skip the per-layer latency runs"})
    skip_decode: bool = field(default=False, metadata={"help": "skip the decode runs"})


def latency_checkpoint(path: Path, hidden: int, intermediate: int, n_experts: int = 8) -> Path:
    """One MoE layer of random experts (the only tensors a replica reads) with a Mixtral config."""
    args = ModelArgs(dim=hidden, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=hidden // 8,
                     hidden_dim=intermediate, n_experts=n_experts, top_k=2, vocab_size=512)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(n_experts):
        w1, w2, w3 = expert_names(0, e)
        tensors[w1] = torch.randn(intermediate, hidden, generator=g) * 0.02
        tensors[w2] = torch.randn(hidden, intermediate, generator=g) * 0.02
        tensors[w3] = torch.randn(intermediate, hidden, generator=g) * 0.02
    save_checkpoint(path, args, tensors, "float32")
    return path


def echo_requests(msgs: list) -> list[expert_pb2.EchoRequest]:
    """Per Forward message of `msgs`, an Echo of the same bytes out and back."""
    # The output travels back with the hidden states' shape and dtype.
    return [expert_pb2.EchoRequest(payload=bytes(req.ByteSize()), reply_bytes=req.hidden.ByteSize())
            for _, _, _, req in msgs]


class DirectCalls:
    """The bench's own grpc.aio channels to the replicas a GrpcExperts sends a layer's messages to: Echo
    (the transport floor) and Forward (whose replies carry the replicas' compute time), made the way the
    dispatcher makes them (its TLS, token and message limit), all in flight at once."""

    def __init__(self, experts, replicas: list):
        from protos import expert_pb2_grpc

        self.loop = asyncio.new_event_loop()
        self.addresses = [r.address for r in replicas]
        self.metadata = experts.metadata

        async def connect():
            chans = {a: experts.open_channel(r) for a, r in {r.address: r for r in replicas}.items()}  # one per replica
            return chans, {a: expert_pb2_grpc.ExpertServiceStub(c) for a, c in chans.items()}
        self.channels, self.stubs = self.loop.run_until_complete(connect())

    def _all(self, method: str, requests: list):
        async def calls():
            return await asyncio.gather(*[getattr(self.stubs[a], method)(r, timeout=30, metadata=self.metadata)
                                          for a, r in zip(self.addresses, requests, strict=True)])
        return self.loop.run_until_complete(calls())

    def echo(self, requests: list[expert_pb2.EchoRequest]) -> None:
        self._all("Echo", requests)

    def compute_seconds(self, requests: list[expert_pb2.ForwardRequest]) -> float:
        """The slowest replica's expert math for these Forward requests."""
        return max(r.compute_ns for r in self._all("Forward", requests)) / 1e9

    def forward_copies(self, requests: list[expert_pb2.ForwardRequest], copies: int) -> None:
        """`copies` of every request in flight at once: as many callers sending the same layer."""
        async def calls():
            await asyncio.gather(*[self.stubs[a].Forward(r, timeout=30, metadata=self.metadata) for _ in range(copies)
                                   for a, r in zip(self.addresses, requests, strict=True)])
        self.loop.run_until_complete(calls())

    def merge_counts(self) -> tuple[int, int]:
        """(Forward calls, runs of expert math) since they started, summed over the replicas."""
        async def infos():
            return await asyncio.gather(*[
                self.stubs[a].Info(expert_pb2.InfoRequest(), timeout=30, metadata=self.metadata)
                for a in set(self.addresses)])
        got = self.loop.run_until_complete(infos())
        return sum(i.calls for i in got), sum(i.math_batches for i in got)

    def close(self) -> None:
        async def close_all():
            for c in self.channels.values():
                await c.close()
        self.loop.run_until_complete(close_all())
        self.loop.close()


def bench_latency(args: DispatchBenchOptions, tmp: Path) -> None:
    from checkpoint.reader import Checkpoint
    from cluster.expert_plane import ray_expert_backend
    from router.config import ExpertPlaneConfig

    print(f"\n== per-layer gRPC scatter/gather: {args.num_shards} shards x 1 replica, top-2 of 8 experts, "
          f"intermediate {args.intermediate}; floor: echo of the same bytes to the same replicas")
    print(f"{'hidden':>6} {'tokens':>6} {'replicas':>8} | {'dispatch p50':>12} {'p99':>8} | {'echo p50':>9} "
          f"{'p99':>8} | {'ratio p50':>9} {'p99':>6} | {'expert math':>11} {'ratio w/o math':>14}")
    concurrent: list[str] = []
    for hidden in args.hidden:
        ckpt = Checkpoint(latency_checkpoint(tmp / f"latency-{hidden}", hidden, args.intermediate))
        plane = ExpertPlaneConfig(num_shards=args.num_shards, expert_num_cpus=0.1)
        backend = ray_expert_backend(plane, ckpt, torch.float32)
        grpc_experts = backend.backend
        g = torch.Generator().manual_seed(0)
        try:
            for n in args.tokens:
                x = torch.randn(n, hidden, generator=g)
                top = torch.randn(n, 8, generator=g).topk(2)
                weights, ids = torch.softmax(top.values, -1), top.indices
                msgs = grpc_experts.requests(0, x, ids, weights)
                direct = DirectCalls(grpc_experts, [rep for _, rep, _, _ in msgs])
                echoes = echo_requests(msgs)
                fwd, echo, math = [], [], []
                try:
                    for i in range(args.iters + 5):
                        t = time.perf_counter()
                        backend.forward(0, x, ids, weights)
                        t1 = time.perf_counter()
                        direct.echo(echoes)
                        t2 = time.perf_counter()
                        if i >= 5:  # warm-up calls open channels and fault pages in
                            fwd.append(t1 - t)
                            echo.append(t2 - t1)
                            math.append(direct.compute_seconds([req for _, _, _, req in msgs]))
                finally:
                    direct.close()
                f50, f99, e50, e99 = (percentile(fwd, 50), percentile(fwd, 99), percentile(echo, 50),
                                      percentile(echo, 99))
                m50 = percentile(math, 50)
                print(f"{hidden:>6} {n:>6} {len(msgs):>8} | {f50 * 1e3:>10.3f}ms {f99 * 1e3:>6.3f}ms | "
                      f"{e50 * 1e3:>7.3f}ms {e99 * 1e3:>6.3f}ms | {f50 / e50:>8.2f}x {f99 / e99:>5.2f}x | "
                      f"{m50 * 1e3:>9.3f}ms {(f50 - m50) / e50:>13.2f}x")
                concurrent += bench_callers(args, hidden, n, grpc_experts, msgs)
        finally:
            backend.close()
    if args.callers:
        print(f"\n== C callers send the same layer's messages at once, to the same replicas ({args.iters} rounds "
              f"each); calls/batch: Forward calls per run of the replicas' expert math (1: none merged)")
        print(f"{'hidden':>6} {'tokens':>6} {'callers':>7} | {'round p50':>10} {'p99':>8} | {'tokens/s':>9} "
              f"{'vs 1 caller':>11} | {'calls/batch':>11}")
        for row in concurrent:
            print(row)


def bench_callers(args: DispatchBenchOptions, hidden: int, n: int, grpc_experts, msgs: list) -> list[str]:
    """Per C in args.callers: rounds of C copies of the layer's Forward messages in flight at once."""
    rows, base = [], None
    direct = DirectCalls(grpc_experts, [rep for _, rep, _, _ in msgs])
    requests = [req for _, _, _, req in msgs]
    try:
        for c in args.callers:
            direct.forward_copies(requests, c)  # warm-up
            calls0, batches0 = direct.merge_counts()
            rounds = []
            for _ in range(args.iters):
                t = time.perf_counter()
                direct.forward_copies(requests, c)
                rounds.append(time.perf_counter() - t)
            calls, batches = direct.merge_counts()
            r50, r99 = percentile(rounds, 50), percentile(rounds, 99)
            tps = c * n / r50
            base = base or tps
            merged = f"{(calls - calls0) / (batches - batches0):>11.2f}" if batches > batches0 else f"{'-':>11}"
            rows.append(f"{hidden:>6} {n:>6} {c:>7} | {r50 * 1e3:>8.3f}ms {r99 * 1e3:>6.3f}ms | {tps:>9.0f} "
                        f"{tps / base:>10.2f}x | {merged}")
    finally:
        direct.close()
    return rows


def bench_decode(args: DispatchBenchOptions, tmp: Path) -> None:
    from transformers import MixtralForCausalLM

    from router import LLM, SamplingParams

    path = bench_checkpoint(tmp / "bench")
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = max(args.batch_sizes)
    default_threads = torch.get_num_threads()
    llms = {"local": LLM(path, expert_backend="local", max_num_seqs=seqs)}
    try:
        for shards in args.decode_shards:
            llms[f"ray/{shards}"] = LLM(path, expert_backend="ray", max_num_seqs=seqs, num_shards=shards,
                                        expert_num_cpus=0.1)
        n = args.new_tokens
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        rays = [k for k in llms if k != "local"]
        print(f"\n== decode throughput (tok/s), benchmark checkpoint (hidden 512, 4 layers, 8 experts), "
              f"{n} new tokens after {args.prompt_len}-token prompts; ray/S: experts in S shards x 1 replica"
              f" (router: {args.router_threads} torch thread(s)); local and HF: the faster of 1 and "
              f"{default_threads} threads (2-thread torch stalls when the CPUs are oversubscribed)")
        print(f"{'batch':>5} | " + " ".join(f"{k:>8}" for k in [*rays, "local", "HF"]) + " | "
              + " ".join(f"{k + ' vs local':>16} {'vs HF':>6}" for k in rays))
        with torch.inference_mode():
            for b in args.batch_sizes:
                prompts = torch.randint(0, hf.config.vocab_size, (b, args.prompt_len),
                                        generator=torch.Generator().manual_seed(b))
                batch = [{"prompt_token_ids": p} for p in prompts.tolist()]
                tokens = {k: [o.outputs[0].token_ids for o in llm.generate(batch, params)]
                          for k, llm in llms.items()}
                fns = {k: with_threads(args.router_threads,
                                       lambda llm=llm, batch=batch: with_ping_pong(llm, False, batch, params))
                       for k, llm in llms.items() if k != "local"}
                pp_wall = dict.fromkeys(rays, 0.0)  # seconds the ping-pong runs took, all together
                for k in rays:  # the same plane with ping-pong micro-batches
                    fns[f"{k} pp"] = with_threads(args.router_threads, timed(
                        pp_wall, k, lambda llm=llms[k], batch=batch: with_ping_pong(llm, True, batch, params)))
                for t in sorted({1, default_threads}):
                    fns[f"local@{t}"] = with_threads(t, lambda batch=batch: llms["local"].generate(batch,
                                                                                                  params))
                    fns[f"HF@{t}"] = with_threads(t, lambda p=prompts: hf.generate(
                        p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0))
                before = {k: dispatch_counters(llms[k]) for k in rays}
                best = best_of_each(fns, args.repeats)
                after = {k: dispatch_counters(llms[k]) for k in rays}
                hidden = {k: hidden_fraction(before[k], after[k]) for k in rays}
                most = {k: hidden_bound(before[k], after[k], pp_wall[k]) for k in rays}
                tps = {k: b * n / t for k, t in best.items()}
                for ref in ("local", "HF"):
                    tps[ref] = max(v for k, v in tps.items() if k.startswith(ref + "@"))
                busy = {k: cores_busy(fns[k]) for k in [*rays, *(f"{k} pp" for k in rays)]}
                same = all(tokens[k] == tokens["local"] for k in rays)
                print(f"{b:>5} | " + " ".join(f"{tps[k]:>8.1f}" for k in [*rays, "local", "HF"]) + " | "
                      + " ".join(f"{tps[k] / tps['local']:>15.2f}x {tps[k] / tps['HF']:>5.2f}x" for k in rays)
                      + " | " + " ".join(f"{k} ping-pong: {tps[k + ' pp'] / tps[k]:.2f}x, {hid(hidden[k], most[k])}; "
                                         f"cores busy {busy[k][0]:.2f} ({busy[k + ' pp'][0]:.2f} "
                                         f"ping-pong) of {os.cpu_count()}, the router's "
                                         f"{busy[k][1]:.2f} ({busy[k + ' pp'][1]:.2f})" for k in rays)
                      + ("" if same else "   (ray and local tokens differ!)"))
    finally:
        torch.set_num_threads(default_threads)
        for llm in llms.values():
            llm.shutdown()


def with_ping_pong(llm, on: bool, batch: list, params) -> None:
    """Generate with ping-pong on (two micro-batches per step) or off (one batch, each layer's calls waited out)."""
    llm.engine.ping_pong = on
    try:
        llm.generate(batch, params)
    finally:
        llm.engine.ping_pong = False


def dispatch_counters(llm) -> tuple[float, float]:
    """(seconds expert calls were in flight on the call thread, seconds the engine waited on them)."""
    return getattr(llm.experts.backend, "async_call_s", 0.0), llm.engine.model.exposed_wait_s


def hidden_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Of the dispatch time of ping-pong steps since `before`, the share the engine spent computing, not waiting."""
    calls, waited = after[0] - before[0], after[1] - before[1]
    return 1 - waited / calls if calls > 0 else float("nan")


def hidden_bound(before: tuple[float, float], after: tuple[float, float], wall_s: float) -> float:
    """The most of that dispatch time the engine could have hidden: the time it did not wait (its own attention,
    gate and sampling, wall_s of ping-pong runs less the waits), over the time calls were in flight (one at a time,
    on the call thread). Work cannot hide more than itself: where this is low, the router has too little of it."""
    calls, waited = after[0] - before[0], after[1] - before[1]
    return min(1.0, (wall_s - waited) / calls) if calls > 0 else float("nan")


def hid(hidden: float, most: float) -> str:
    if math.isnan(hidden):  # no step had two micro-batches (one sequence)
        return "nothing split"
    return f"{hidden:.0%} of dispatch hidden (at most {most:.0%})"


def timed(total: dict[str, float], key: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, adding the seconds each run takes to total[key]."""
    def run() -> object:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            total[key] += time.perf_counter() - t
    return run


def run(args: DispatchBenchOptions) -> None:
    import ray

    from cluster.ray_init import start_or_join_ray, start_serve

    torch.manual_seed(0)
    started_ray = start_or_join_ray()
    started_serve = start_serve()
    print(f"ray {ray.__version__}, driver torch threads {torch.get_num_threads()}, "
          f"cluster CPUs {ray.cluster_resources().get('CPU')}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if not args.skip_latency:
                bench_latency(args, Path(tmp))
            if not args.skip_decode:
                bench_decode(args, Path(tmp))
    finally:
        if started_serve:
            from ray import serve

            serve.shutdown()
        if started_ray:
            ray.shutdown()
