"""`raymoe bench dispatch`: gRPC scatter/gather beside a bare echo floor; "ray" decode beside "local" and HF.

Part 1 times one layer's scatter/gather (GrpcExperts.forward: split by shard, serialise, one call per
replica touched, all in flight, gather, sum) against an echo of the same byte counts to the same
replica processes over the same channels: the floor any dispatch over gRPC pays. Its checkpoint has a
small intermediate size so that the expert math, reported beside it, does not hide the transport.
Part 2 decodes the model-core benchmark checkpoint with the experts on Ray, in-process, and in HF.
"""

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cluster.bench.common import bench_checkpoint
from protos import expert_pb2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 4096], help="hidden sizes (latency runs)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256], help="tokens per layer call")
    p.add_argument("--intermediate", type=int, default=16,
                   help="expert intermediate size of the latency checkpoint (small: it measures transport)")
    p.add_argument("--iters", type=int, default=100, help="timed layer calls per (hidden, tokens)")
    p.add_argument("--num-shards", type=int, default=8, help="expert shards of the latency runs")
    p.add_argument("--decode-shards", type=int, nargs="+", default=[8, 2],
                   help="expert shards of the ray decode runs, one run each (8: one expert per shard)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--router-threads", type=int, default=1,
                   help="torch threads of the router while decoding with experts on Ray (their math runs in "
                        "the replicas; local and HF keep the process default)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs (the best counts)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-decode", action="store_true")


def latency_checkpoint(path: Path, hidden: int, intermediate: int, n_experts: int = 8) -> Path:
    """One MoE layer of random experts (the only tensors a replica reads) with a Mixtral config."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=8,
               num_key_value_heads=2, num_local_experts=n_experts, num_experts_per_tok=2, vocab_size=512)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(n_experts):
        p = f"model.layers.0.block_sparse_moe.experts.{e}"
        tensors[f"{p}.w1.weight"] = torch.randn(intermediate, hidden, generator=g) * 0.02
        tensors[f"{p}.w2.weight"] = torch.randn(hidden, intermediate, generator=g) * 0.02
        tensors[f"{p}.w3.weight"] = torch.randn(intermediate, hidden, generator=g) * 0.02
    save_file(tensors, path / "model.safetensors")
    return path


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def echo_requests(msgs: list) -> list[tuple[int, expert_pb2.EchoRequest]]:
    """(shard, request) per message: the same bytes out, and back, as the Forward calls of `msgs`."""
    # The output travels back with the hidden states' shape and dtype.
    return [(shard, expert_pb2.EchoRequest(payload=bytes(req.ByteSize()), reply_bytes=req.hidden.ByteSize()))
            for shard, _, req in msgs]


def bench_latency(args, tmp: Path) -> None:
    from cluster.bringup import ray_expert_backend
    from experts.checkpoint import Checkpoint

    print(f"\n== per-layer gRPC scatter/gather: {args.num_shards} shards x 1 replica, top-2 of 8 experts, "
          f"intermediate {args.intermediate}; floor: echo of the same bytes to the same replicas")
    print(f"{'hidden':>6} {'tokens':>6} {'replicas':>8} | {'dispatch p50':>12} {'p99':>8} | {'echo p50':>9} "
          f"{'p99':>8} | {'ratio p50':>9} {'p99':>6} | {'expert math':>11} {'ratio w/o math':>14}")
    for hidden in args.hidden:
        ckpt = Checkpoint(latency_checkpoint(tmp / f"latency-{hidden}", hidden, args.intermediate))
        backend = ray_expert_backend(ckpt, torch.float32, num_shards=args.num_shards, num_cpus=0.1)
        grpc_experts = backend.backend
        g = torch.Generator().manual_seed(0)
        try:
            for n in args.tokens:
                x = torch.randn(n, hidden, generator=g)
                top = torch.randn(n, 8, generator=g).topk(2)
                weights, ids = torch.softmax(top.values, -1), top.indices
                msgs = grpc_experts.requests(0, x, ids, weights)
                echoes = echo_requests(msgs)
                fwd, echo, math = [], [], []
                for i in range(args.iters + 5):
                    t = time.perf_counter()
                    backend.forward(0, x, ids, weights)
                    t1 = time.perf_counter()
                    grpc_experts.echo(0, echoes)
                    t2 = time.perf_counter()
                    if i >= 5:  # warm-up calls open channels and fault pages in
                        fwd.append(t1 - t)
                        echo.append(t2 - t1)
                        math.append(grpc_experts.last_compute_ns / 1e9)
                f50, f99, e50, e99 = (percentile(fwd, 0.5), percentile(fwd, 0.99), percentile(echo, 0.5),
                                      percentile(echo, 0.99))
                m50 = percentile(math, 0.5)
                print(f"{hidden:>6} {n:>6} {len(msgs):>8} | {f50 * 1e3:>10.3f}ms {f99 * 1e3:>6.3f}ms | "
                      f"{e50 * 1e3:>7.3f}ms {e99 * 1e3:>6.3f}ms | {f50 / e50:>8.2f}x {f99 / e99:>5.2f}x | "
                      f"{m50 * 1e3:>9.3f}ms {(f50 - m50) / e50:>13.2f}x")
        finally:
            backend.close()


def best_of_each(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest seconds of each function, their runs interleaved so that a busy machine slows all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run with n torch threads (a router whose experts run elsewhere needs fewer)."""
    def run() -> object:
        torch.set_num_threads(n)
        return fn()
    return run


def bench_decode(args, tmp: Path) -> None:
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
                                        num_cpus=0.1)
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
                                       lambda llm=llm, batch=batch: llm.generate(batch, params))
                       for k, llm in llms.items() if k != "local"}
                for t in sorted({1, default_threads}):
                    fns[f"local@{t}"] = with_threads(t, lambda batch=batch: llms["local"].generate(batch,
                                                                                                  params))
                    fns[f"HF@{t}"] = with_threads(t, lambda p=prompts: hf.generate(
                        p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0))
                best = best_of_each(fns, args.repeats)
                tps = {k: b * n / t for k, t in best.items()}
                for ref in ("local", "HF"):
                    tps[ref] = max(v for k, v in tps.items() if k.startswith(ref + "@"))
                same = all(tokens[k] == tokens["local"] for k in rays)
                print(f"{b:>5} | " + " ".join(f"{tps[k]:>8.1f}" for k in [*rays, "local", "HF"]) + " | "
                      + " ".join(f"{tps[k] / tps['local']:>15.2f}x {tps[k] / tps['HF']:>5.2f}x" for k in rays)
                      + ("" if same else "   (ray and local tokens differ!)"))
    finally:
        torch.set_num_threads(default_threads)
        for llm in llms.values():
            llm.shutdown()


def run(args: argparse.Namespace) -> None:
    import ray

    from cluster.bringup import ensure_ray, ensure_serve

    torch.manual_seed(0)
    started_ray = ensure_ray()
    started_serve = ensure_serve()
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
