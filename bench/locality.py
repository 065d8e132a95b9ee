"""`raymoe bench locality`: expert-locality grouping against the locality-blind baseline, one plane, one run.

The bundled model decodes continuations of its held-out standard-library text (its real routing) with its
experts on Ray, S shards x R replicas (default 2 x 2: a shard's tokens split over its replicas, which is
where grouping pays). One router drives both arms over the same replicas, the same code with
`GrpcExperts.group_by_expert` on (raymoe: each (token, expert) slot to the replica that takes that expert,
router.rendezvous) and off (baseline: whole rows spread by row number, no sequence affinity); their rounds
alternate, so that noise on a shared machine hits both alike. Per arm, over its rounds:

- tokens per expert matmul: the replicas' own counters (Info expert_rows / expert_matmuls);
- messages per generated token: Forward calls the router made, retries included;
- dispatch hidden fraction: with --ping-pong, the share of the expert calls' time in flight that the engine
  spent computing the other micro-batch rather than waiting (router.model's exposed_wait_s against the calls'
  time, as `bench dispatch` reports it); 0 without ping-pong, where every call is waited out;
- p50 and p99 step time, and tokens generated per second of step time.

All of them over decode steps only: a step that carries prompt tokens (the first of each round) is left out,
its many rows per matmul saying nothing about decode.

Greedy decoding: both arms must produce the same tokens (grouping changes which replica computes a row, and
float rounding at most), which the run checks and reports.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.harness import percentile
from checkpoint.bundled import BUNDLED_MODEL

ARMS = ("raymoe", "baseline")  # raymoe: grouping on; baseline: off
KEYS = ("tokens_per_expert_matmul", "messages_per_token", "dispatch_hidden_fraction", "p50_step_ms",
        "p99_step_ms", "tokens_per_s")


@dataclass
class LocalityBenchOptions:
    """The expert plane, the decode load and where the results go."""

    num_shards: int = field(default=2, metadata={"help": "expert shards (expert-parallel over the 8 experts)"})
    replicas_per_shard: int = field(default=2, metadata={
        "help": "replicas of every shard (grouping only matters where a shard has several)"})
    batch_size: int = field(default=32, metadata={"help": "sequences decoded together"})
    prompt_len: int = field(default=32, metadata={"help": "prompt tokens per sequence, cut from the held-out text"})
    new_tokens: int = field(default=48, metadata={"help": "tokens generated per sequence and round"})
    rounds: int = field(default=3, metadata={"help": "timed rounds per arm, alternating (after one warm-up each)"})
    ping_pong: bool = field(default=False, metadata={
        "help": "both arms with ping-pong micro-batches (the only way dispatch time is hidden)"})
    expert_num_cpus: float = field(default=0.1, metadata={"help": "CPUs per expert replica"})
    router_threads: int = field(default=1, metadata={"help": "torch threads of the router (the experts run in "
                                                             "the replicas)"})
    out: Path = field(default=Path("runs/bench_locality.json"), metadata={
        "help": 'results: {"raymoe": {...}, "baseline": {...}} (JSON; the PNG beside it)'})


def held_out_prompts(n: int, length: int) -> list[list[int]]:
    """n prompts of `length` token ids, windows spread evenly over the bundled model's held-out text."""
    from router.tokenizer import Tokenizer
    from training.evaluate import held_out_texts

    tok = Tokenizer.maybe(BUNDLED_MODEL)
    ids = [i for text in held_out_texts().values() for i in tok.encode(text)]
    if len(ids) < n * length:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than {n} prompts of {length}")
    step = len(ids) // n
    return [ids[k * step : k * step + length] for k in range(n)]


@dataclass
class Tally:
    """What one arm measured over the decode steps of its rounds."""

    step_s: list[float] = field(default_factory=list)
    tokens: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(6))  # Counters' fields, summed over decode steps
    outputs: list[list[list[int]]] = field(default_factory=list)  # per round, each sequence's tokens

    def result(self) -> dict:
        messages, rows_sent, expert_rows, expert_matmuls, call_s, waited_s = self.counts.tolist()
        decode_s = sum(self.step_s)
        return {
            "tokens_per_expert_matmul": expert_rows / max(expert_matmuls, 1),
            "messages_per_token": messages / max(self.tokens, 1),
            "dispatch_hidden_fraction": max(0.0, 1 - waited_s / call_s) if call_s > 0 else 0.0,
            "p50_step_ms": percentile(self.step_s, 50) * 1e3,
            "p99_step_ms": percentile(self.step_s, 99) * 1e3,
            "tokens_per_s": self.tokens / decode_s if decode_s else 0.0,
            "wire_rows_per_token": rows_sent / max(self.tokens, 1),
            "decode_steps": len(self.step_s),
            "generated_tokens": self.tokens,
        }


def counters(engine, experts) -> np.ndarray:
    """So far: (Forward calls made, rows sent, the replicas' expert rows and expert matmuls (Info), seconds expert
    calls were in flight on the ping-pong call thread, seconds the engine waited for them)."""
    infos = experts.infos().values()
    return np.array([experts.messages_sent, sum(experts.rows_sent.values()), sum(i.expert_rows for i in infos),
                     sum(i.expert_matmuls for i in infos), getattr(experts, "async_call_s", 0.0),
                     engine.model.exposed_wait_s], dtype=np.float64)


def prefilling(engine) -> bool:
    """Will the next step carry prompt tokens?"""
    return bool(engine.waiting) or any(not s.prefilled for s in engine.running)


def run_round(engine, experts, grouped: bool, prompts: list[list[int]], new_tokens: int,
              tally: Tally | None) -> None:
    """Decode every prompt to new_tokens tokens with grouping on or off; add what its decode steps measured to
    `tally` (steps carrying prompt tokens are left out: a prefill's matmuls say nothing about decode)."""
    from router.sampling import SamplingParams

    experts.group_by_expert = grouped
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    counts, since = np.zeros(6), counters(engine, experts)
    while engine.has_unfinished():
        if prefilling(engine):
            now = counters(engine, experts)
            engine.step()
            counts, since = counts + now - since, counters(engine, experts)
            continue
        t = time.perf_counter()
        updated = engine.step()
        if tally is not None:
            tally.step_s.append(time.perf_counter() - t)
            tally.tokens += len(updated)  # in a decode step, every sequence updated made a token
    if tally is not None:  # else a warm-up round
        tally.counts += counts + counters(engine, experts) - since
        tally.outputs.append([list(s.output_ids) for s in seqs])


def compare(engine, experts, prompts: list[list[int]], new_tokens: int, rounds: int, ping_pong: bool = False,
            bar=None) -> tuple[dict, bool]:
    """Both arms on one engine whose expert calls go through `experts` (a GrpcExperts): one warm-up round each,
    then `rounds` timed rounds each, alternating. -> ({"raymoe": ..., "baseline": ...}, same tokens in both)."""
    engine.ping_pong = ping_pong
    tallies = {arm: Tally() for arm in ARMS}
    try:
        for r in range(rounds + 1):
            for arm in ARMS:
                run_round(engine, experts, arm == "raymoe", prompts, new_tokens, tallies[arm] if r else None)
                if bar is not None:
                    bar.update(1)
    finally:
        experts.group_by_expert = True
    same = tallies["raymoe"].outputs == tallies["baseline"].outputs
    return {arm: t.result() for arm, t in tallies.items()}, same


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokens_per_expert_matmul", "tokens per expert matmul"), ("messages_per_token", "messages per token"),
              ("dispatch_hidden_fraction", "dispatch time hidden"), ("p50_step_ms", "p50 decode step (ms)"),
              ("p99_step_ms", "p99 decode step (ms)"), ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = [results[arm][key] for arm in ARMS]
        bars = ax.bar(ARMS, values, color=["tab:blue", "tab:gray"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        base = results["baseline"][key]
        ax.set_title(label + (f"\n{values[0] / base:.2f}x baseline" if base else "\n"), fontsize=9)
        if key == "dispatch_hidden_fraction":
            ax.set_ylim(0, 1)  # a share; 0 for both without ping-pong
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(results: dict, out: Path, title: str) -> Path:
    """Write the results to `out` (JSON) and their plot beside it; -> the plot's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    png = out.with_suffix(".png")
    plot(results, png, title)
    return png


def report(results: dict, same: bool) -> str:
    rows = [f"{'':>26} {'raymoe':>10} {'baseline':>10} {'ratio':>7}"]
    for key in KEYS + ("wire_rows_per_token",):
        a, b = results["raymoe"][key], results["baseline"][key]
        rows.append(f"{key:>26} {a:>10.3f} {b:>10.3f} " + (f"{a / b:>6.2f}x" if b else f"{'-':>7}"))
    rows.append(f"{'same tokens in both arms':>26} {'yes' if same else 'NO'}")
    return "\n".join(rows)


def run(o: LocalityBenchOptions) -> dict:
    from tqdm import tqdm

    from router.llm import LLM

    prompts = held_out_prompts(o.batch_size, o.prompt_len)
    llm = LLM(BUNDLED_MODEL, expert_backend="ray", num_shards=o.num_shards, replicas_per_shard=o.replicas_per_shard,
              expert_num_cpus=o.expert_num_cpus, max_num_seqs=o.batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(o.router_threads)
    try:
        with tqdm(total=2 * (o.rounds + 1), desc="locality", unit="round") as bar:
            results, same = compare(llm.engine, llm.experts.backend, prompts, o.new_tokens, o.rounds, o.ping_pong,
                                    bar)
    finally:
        torch.set_num_threads(threads)
        llm.shutdown()
    title = (f"bundled model, held-out prompts: {o.num_shards} shards x {o.replicas_per_shard} replicas, batch "
             f"{o.batch_size}, {o.new_tokens} new tokens x {o.rounds} rounds"
             + (", ping-pong" if o.ping_pong else ""))
    print(f"\n== {title}; raymoe: grouped by expert; baseline: rows spread by row number")
    print(report(results, same))
    png = save(results, o.out, title)
    print(f"\nwrote {o.out} and {png}")
    if not same:
        print("warning: the arms' tokens differ (a greedy tie broken differently by float rounding?)")
    return results

