"""`raymoe inspect routing`: expert locality of a model on the held-out standard-library files.

Per layer, the measures of the Mixtral paper's Table 5: how often consecutive tokens keep the same
first-choice expert, and how often their top-2 sets share an expert, each beside the same fraction
with the token order shuffled (what the load skew alone explains); and each expert's share of routing
slots. The routing is recorded from the serving path: `LLM.logprobs` scores each file (giving the
bits per byte too) while a wrapper around its expert backend keeps every layer's choices.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch

from checkpoint.bundled import BUNDLED_MODEL
from router.dispatch import ExpertBackend
from router.llm import LLM
from training.evaluate import held_out_texts, text_nats


class RecordingExperts(ExpertBackend):
    """Delegates to another backend and keeps each call's (expert_ids, weights) per layer."""

    def __init__(self, inner: ExpertBackend, n_layers: int):
        self.inner = inner
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_layers)]

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                keys=None) -> torch.Tensor:
        self.calls[layer].append((expert_ids.clone(), weights.clone()))
        return self.inner.forward(layer, x, expert_ids, weights, keys)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything recorded since the last take: expert ids (L, T, k) and weights (L, T, k)."""
        ids = torch.stack([torch.cat([c[0] for c in calls]) for calls in self.calls])
        weights = torch.stack([torch.cat([c[1] for c in calls]) for calls in self.calls])
        self.calls = [[] for _ in self.calls]
        return ids, weights

    def note_waiting(self, n: int) -> None:
        self.inner.note_waiting(n)

    def close(self) -> None:
        self.inner.close()


@dataclass
class SequenceTrace:
    path: str
    token_ids: list[int]
    expert_ids: torch.Tensor  # (L, T, k), first choice first
    weights: torch.Tensor  # (L, T, k) float32


def trace_texts(llm: LLM, texts: dict[str, str]) -> tuple[list[SequenceTrace], float]:
    """Score and trace each text alone (so its tokens reach the experts in order); -> traces, bits per byte."""
    recorder = RecordingExperts(llm.engine.experts, llm.args.n_layers)
    llm.engine.experts = recorder
    traces, nats, n_bytes = [], 0.0, 0
    try:
        for path, text in texts.items():
            ids, text_nats_ = text_nats(llm, text)
            nats += text_nats_
            n_bytes += len(text.encode("utf-8"))
            traces.append(SequenceTrace(path, ids, *recorder.take()))
    finally:
        llm.engine.experts = recorder.inner
    return traces, nats / math.log(2) / n_bytes


def consecutive_fractions(expert_ids: list[torch.Tensor]) -> tuple[float, float]:
    """expert_ids per sequence (T, k) -> over all consecutive token pairs within a sequence, the fraction
    whose first choices are equal, and the fraction whose top-k sets share at least one expert."""
    same = share = pairs = 0
    for ids in expert_ids:
        a, b = ids[:-1], ids[1:]
        same += (a[:, 0] == b[:, 0]).sum().item()
        share += (a[:, :, None] == b[:, None, :]).any(-1).any(-1).sum().item()
        pairs += len(a)
    return same / max(pairs, 1), share / max(pairs, 1)


@dataclass
class LayerStats:
    same_first: float
    same_first_shuffled: float
    share_topk: float
    share_topk_shuffled: float
    expert_share: list[float]  # fraction of all routing slots of the layer, per expert


def layer_stats(expert_ids: list[torch.Tensor], n_experts: int, seed: int = 0) -> LayerStats:
    """expert_ids per sequence (T, k) of one layer; the baseline shuffles token order within each sequence."""
    gen = torch.Generator().manual_seed(seed)
    shuffled = [ids[torch.randperm(len(ids), generator=gen)] for ids in expert_ids]
    counts = torch.bincount(torch.cat([ids.flatten() for ids in expert_ids]), minlength=n_experts).float()
    same, share = consecutive_fractions(expert_ids)
    same_shuffled, share_shuffled = consecutive_fractions(shuffled)
    return LayerStats(same, same_shuffled, share, share_shuffled, (counts / counts.sum()).tolist())


def routing_stats(traces: list[SequenceTrace], n_experts: int, seed: int = 0) -> list[LayerStats]:
    n_layers = traces[0].expert_ids.shape[0]
    return [layer_stats([t.expert_ids[l] for t in traces], n_experts, seed) for l in range(n_layers)]


def format_table(stats: list[LayerStats]) -> str:
    E = len(stats[0].expert_share)
    head = (f"{'layer':>5} | {'same 1st':>8} {'shuffled':>8} | {'top-2 share':>11} {'shuffled':>8} | "
            + " ".join(f"{'e' + str(e):>5}" for e in range(E)))
    lines = [head, "-" * len(head)]
    for l, s in enumerate(stats):
        lines.append(f"{l:>5} | {s.same_first:>8.1%} {s.same_first_shuffled:>8.1%} | {s.share_topk:>11.1%} "
                     f"{s.share_topk_shuffled:>8.1%} | " + " ".join(f"{x:>5.1%}" for x in s.expert_share))
    return "\n".join(lines)


def _tensor(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.numpy().tobytes()}


def save_trace(path: str | Path, traces: list[SequenceTrace], model: str) -> None:
    """msgpack: {"model", "sequences": [{"path", "token_ids", "expert_ids", "weights"}]}, the tensors
    (L, T, k) as {"dtype", "shape", "data": raw little-endian bytes} (int8 ids, float32 weights)."""
    doc = {"model": model, "sequences": [
        {"path": t.path, "token_ids": t.token_ids, "expert_ids": _tensor(t.expert_ids.to(torch.int8)),
         "weights": _tensor(t.weights.float())} for t in traces]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(msgpack.packb(doc, use_bin_type=True))


def load_trace(path: str | Path) -> list[SequenceTrace]:
    def tensor(d: dict) -> torch.Tensor:
        return torch.frombuffer(bytearray(d["data"]), dtype=getattr(torch, d["dtype"])).reshape(d["shape"])

    doc = msgpack.unpackb(Path(path).read_bytes(), raw=False)
    return [SequenceTrace(s["path"], s["token_ids"], tensor(s["expert_ids"]).long(), tensor(s["weights"]))
            for s in doc["sequences"]]


@dataclass
class RoutingReportOptions:
    """The model to inspect and where its routing trace goes."""

    model: str = field(default=str(BUNDLED_MODEL), metadata={"help": "HF checkpoint directory (default: bundled)"})
    trace_out: str = field(default="runs/routing_trace.msgpack", metadata={
        "help": "where to save the routing trace (msgpack); '' to skip"})
    seed: int = field(default=0, metadata={"help": "seed of the shuffled baseline"})


def run(args: RoutingReportOptions) -> int:
    llm = LLM(args.model, expert_backend="local", dtype="float32")
    try:
        texts = held_out_texts()
        traces, bpb = trace_texts(llm, texts)
    finally:
        llm.shutdown()
    n_tokens = sum(len(t.token_ids) for t in traces)
    print(f"{args.model}: {len(traces)} held-out standard-library files, {n_tokens} tokens, "
          f"{sum(len(t.encode()) for t in texts.values())} bytes")
    print(f"held-out bits per byte: {bpb:.3f}\n")
    print("consecutive tokens routed alike (shuffled: token order permuted), and each expert's share of slots")
    print(format_table(routing_stats(traces, llm.args.n_experts, args.seed)))
    if args.trace_out:
        save_trace(args.trace_out, traces, str(args.model))
        print(f"\nrouting trace saved to {args.trace_out}")
    return 0
