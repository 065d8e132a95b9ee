"""Everything of a Mixtral model except the experts: embeddings, attention, gates, final norm, LM head."""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attention.attention import Attention
from attention.cache import RollingKVCache, StepMetadata
from attention.norm import RMSNorm
from attention.rope import RotaryEmbedding
from checkpoint.args import ModelArgs
from checkpoint.hf import dense_names
from checkpoint.reader import Checkpoint
from matmul.packed import Linear, pack_linears
from router.dispatch import ExpertBackend


def route(gate_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_logits (T, E) -> weights (T, k) float32, expert ids (T, k).

    Softmax over the k largest logits equals softmax over all, keep top-k, renormalise.
    """
    top, ids = gate_logits.topk(k, dim=-1)
    return F.softmax(top.float(), dim=-1), ids


@dataclass
class MicroBatch:
    """One micro-batch of a step: its tokens, their attention metadata, the rows whose logits are wanted, and
    each row's sequence key for the expert backend."""

    tokens: torch.Tensor  # (T,)
    meta: StepMetadata
    logit_rows: torch.Tensor  # (R,)
    keys: np.ndarray | None = None  # (T,)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a.dim, a.n_heads, a.n_kv_heads, a.head_dim)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.gate = Linear(a.dim, a.n_experts)


class RouterModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        self.exposed_wait_s = 0.0  # time the main thread waited on micro-batches' expert calls (ping-pong)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, meta: StepMetadata, cache: RollingKVCache, experts: ExpertBackend,
                logit_rows: torch.Tensor, trace: list | None = None, keys: np.ndarray | None = None
                ) -> torch.Tensor:
        """tokens (T,) -> logits (len(logit_rows), V) float32 of the rows asked for.

        trace, when given, receives (expert_ids, weights) per layer; keys (T,) name each row's sequence
        for the expert backend.
        """
        return self.forward_micro([MicroBatch(tokens, meta, logit_rows, keys)], cache, experts, trace)[0]

    @torch.inference_mode()
    def forward_micro(self, batches: list["MicroBatch"], cache: RollingKVCache, experts: ExpertBackend,
                      trace: list | None = None) -> list[torch.Tensor]:
        """Micro-batches (disjoint sequences) through the model together -> each one's logits.

        With two, ping-pong (MegaScale-Infer): one batch's attention and gate run while the other's expert
        calls are in flight, so a distributed backend's round trips hide behind compute. Layer by layer:

            main thread:   A.attn(l) | B.attn(l)   | A.attn(l+1) | B.attn(l+1) ...
            expert calls:            | A.experts(l) | B.experts(l) | A.experts(l+1) ...

        Each token meets the same weights in the same order as in one batch, so outputs are unchanged.
        """
        hs = [self.tok_embeddings(b.tokens) for b in batches]  # each (T_j, dim)
        rope = [self.rope.cos_sin(b.meta.positions, h.dtype) for b, h in zip(batches, hs, strict=True)]
        pending: list = [None] * len(batches)
        routed: list[list] = [[] for _ in self.layers]

        def add_experts_output(j: int) -> None:  # the batch's expert calls of its last layer, waited for
            if pending[j] is not None:
                t = time.perf_counter()
                hs[j] = hs[j] + pending[j].result()
                self.exposed_wait_s += time.perf_counter() - t
                pending[j] = None
        try:
            for i, layer in enumerate(self.layers):
                for j, b in enumerate(batches):
                    add_experts_output(j)
                    h = hs[j] = hs[j] + layer.attention(layer.attention_norm(hs[j]), *rope[j], b.meta, cache.k[i],
                                                        cache.v[i])
                    x = layer.ffn_norm(h)
                    weights, ids = route(layer.gate(x), self.args.top_k)
                    routed[i].append((ids, weights))
                    if len(batches) == 1:
                        hs[j] = h + experts.forward(i, x, ids, weights, b.keys)
                    else:
                        pending[j] = experts.forward_async(i, x, ids, weights, b.keys)
            for j in range(len(batches)):
                add_experts_output(j)
        finally:  # a call that failed leaves the other batch's in flight: let it end before anyone retries
            for fut in pending:
                if fut is not None:
                    fut.exception()
        if trace is not None:
            trace += [r[0] if len(r) == 1 else (torch.cat([ids for ids, _ in r]), torch.cat([w for _, w in r]))
                      for r in routed]
        return [self.output(self.norm(h[b.logit_rows])).float() for b, h in zip(batches, hs, strict=True)]

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype) -> "RouterModel":
        a = ckpt.args
        with torch.device("meta"):
            model = cls(a)
        state = {ours: ckpt.tensor(hf, shape, dtype) for ours, (hf, shape) in dense_names(a).items()}
        model.load_state_dict(state, assign=True)
        del state  # so that each dense weight is freed as soon as its packed copy replaces it
        return pack_linears(model.eval())
