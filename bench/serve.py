"""`raymoe bench serve`: streaming HTTP requests at several concurrencies beside offline `LLM.generate`.

The server is deployed from the same config `raymoe serve` uses; the offline reference runs the same
prompts through `LLM.generate` with the same expert backend, engine settings and torch threads, in the
same run, so the ratio says what HTTP, Serve and streaming cost.
"""

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import bench_checkpoint, percentile
from checkpoint.bundled import BUNDLED_MODEL


@dataclass
class ServeBenchOptions:
    """The server, its load levels and the plot."""

    model: Path | None = field(default=None, metadata={
        "help": "checkpoint (default: the bundled one, else the benchmark one)"})
    expert_backend: str = field(default="ray", metadata={"help": "where the experts run",
                                                          "choices": ["ray", "local"]})
    num_shards: int | None = field(default=None, metadata={"help": "expert shards (default: one per expert)"})
    expert_num_cpus: float = field(default=0.5, metadata={
        "help": "CPUs reserved per expert replica (the server's and offline's planes run at once)"})
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "concurrency levels"})
    requests: int | None = field(default=None, metadata={
        "help": "requests per level (default: 2 x concurrency, at least 8)"})
    max_tokens: int = field(default=64, metadata={"help": "tokens generated per request"})
    prompt_len: int = field(default=32, metadata={"help": "prompt tokens per request"})
    threads: int = field(default=1, metadata={"help": "torch threads of the router and of offline"})
    rounds: int = field(default=2, metadata={
        "help": "interleaved rounds of offline and every level; each keeps its best"})
    out: Path = field(default=Path("runs/bench_serve.png"), metadata={"help": "the plot (PNG)"})


@dataclass
class Result:
    ttft: float = 0.0  # seconds to the first streamed text
    gaps: list[float] = field(default_factory=list)  # seconds between streamed chunks
    tokens: int = 0


async def stream_one(session, url: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    r, start, last = Result(), time.perf_counter(), None
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                r.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                if last is None:
                    r.ttft = now - start
                else:
                    r.gaps.append(now - last)
                last = now
    return r


async def level(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int
                ) -> tuple[list[Result], float]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def limited(p):
            async with sem:
                return await stream_one(session, url, p, max_tokens)

        t = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return results, time.perf_counter() - t


def plot(rows: list[dict], offline_tps: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(c, [r["tokens_per_s"] for r in rows], "o-", label="HTTP streaming")
    axes[0].axhline(offline_tps, color="gray", ls="--", label="offline LLM.generate")
    axes[0].set_ylabel("generated tokens / s")
    for ax, key, name in ((axes[1], "ttft", "time to first token (ms)"),
                          (axes[2], "itl", "inter-token (chunk) latency (ms)")):
        ax.plot(c, [r[f"{key}_p50"] * 1e3 for r in rows], "o-", label="p50")
        ax.plot(c, [r[f"{key}_p99"] * 1e3 for r in rows], "s--", label="p99")
        ax.set_ylabel(name)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_xticks(c, [str(x) for x in c])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def offline_tps(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from router import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def summarize(c: int, results: list[Result], wall: float) -> dict:
    gaps = [x for r in results for x in r.gaps]
    ttft = [r.ttft for r in results]
    tokens = sum(r.tokens for r in results)
    return dict(concurrency=c, requests=len(results), tokens=tokens, tokens_per_s=tokens / wall,
                ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
                itl_p50=percentile(gaps, 50), itl_p99=percentile(gaps, 99))


def report(rows: list[dict], offline: float, n_offline: int, rounds: int) -> None:
    print(f"{'concurrency':>11}{'requests':>9}{'tok/s':>9}{'vs offline':>11}{'TTFT p50':>10}{'p99':>8}"
          f"{'ITL p50':>9}{'p99':>8}  (ms)")
    for r in rows:
        print(f"{r['concurrency']:>11}{r['requests']:>9}{r['tokens_per_s']:>9.1f}"
              f"{r['tokens_per_s'] / offline:>10.2f}x{r['ttft_p50'] * 1e3:>10.1f}{r['ttft_p99'] * 1e3:>8.1f}"
              f"{r['itl_p50'] * 1e3:>9.1f}{r['itl_p99'] * 1e3:>8.1f}")
    print(f"{'offline':>11}{n_offline:>9}{offline:>9.1f}{1.0:>10.2f}x  "
          f"(LLM.generate, same backend; every row: best of {rounds})")


def run(args: ServeBenchOptions) -> None:
    import tempfile

    import torch

    from checkpoint.reader import Checkpoint
    from cluster.deploy import deploy, free_port, http_port
    from cluster.ray_init import remove_apps, start_or_join_ray, start_serve
    from cluster.serve_config import serve_config
    from router import LLM
    from router.config import EngineConfig, ExpertPlaneConfig
    from server.config import ServerConfig

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            bundled = (BUNDLED_MODEL / "config.json").is_file()
            model = BUNDLED_MODEL if bundled else bench_checkpoint(Path(tmp) / "bench")
        vocab = Checkpoint(model).args.vocab_size
        biggest = max(args.concurrency)
        g = torch.Generator().manual_seed(0)
        prompts = {c: torch.randint(3, vocab, (args.requests or max(2 * c, 8), args.prompt_len), generator=g)
                   .tolist() for c in args.concurrency}

        # Logical CPUs are scheduling slots here: two expert planes and a router run at once.
        started_ray = start_or_join_ray(num_cpus=max(os.cpu_count() or 1, 16), log_to_driver=False)
        # The router replica and offline generate both run args.threads torch threads.
        torch.set_num_threads(args.threads)
        started_serve = start_serve({"host": "127.0.0.1", "port": free_port()})  # before the offline plane's
        engine = EngineConfig(model=str(model), max_num_seqs=biggest)
        # The offline LLM's expert plane is the server's.
        plane = ExpertPlaneConfig(expert_backend=args.expert_backend, num_shards=args.num_shards,
                                  expert_num_cpus=args.expert_num_cpus)
        server = ServerConfig(router_num_cpus=args.threads, router_threads=args.threads)
        names = deploy(serve_config(engine, plane, server))
        url = f"http://127.0.0.1:{http_port()}/v1/completions"
        # Offline: the biggest level's prompts, at most `biggest` running at once, as in the server.
        best: dict[int, dict] = {}
        offline = []
        llm = None
        try:
            llm = LLM(model, expert_backend=args.expert_backend, max_num_seqs=biggest, num_shards=args.num_shards,
                      expert_num_cpus=args.expert_num_cpus)
            offline_tps(llm, prompts[biggest][:2], 8)  # warm-ups
            asyncio.run(level(url, prompts[biggest][:2], 2, 8))
            for _ in range(args.rounds):  # interleaved, so that noise from other processes hits both sides
                offline.append(offline_tps(llm, prompts[biggest], args.max_tokens))
                for c in args.concurrency:
                    row = summarize(c, *asyncio.run(level(url, prompts[c], c, args.max_tokens)))
                    if c not in best or row["tokens_per_s"] > best[c]["tokens_per_s"]:
                        best[c] = row
        finally:
            if llm is not None:
                llm.shutdown()
            remove_apps(names, started_serve, started_ray)

    print(f"\nmodel {model}, experts: {args.expert_backend}, {args.prompt_len}-token prompts, "
          f"{args.max_tokens} new tokens each, torch threads {args.threads}")
    rows = [best[c] for c in args.concurrency]
    print(f"offline runs (tok/s): {', '.join(f'{x:.1f}' for x in offline)}")
    report(rows, max(offline), len(prompts[biggest]), args.rounds)
    plot(rows, max(offline), args.out,
         f"raymoe serve ({args.expert_backend} experts) vs offline LLM.generate")
    print(f"plot: {args.out}")
