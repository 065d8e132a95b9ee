"""Everything of a Mixtral model except the experts: embeddings, attention, gates, final norm, LM head."""

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
from router.dispatch import ExpertBackend


def route(gate_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_logits (T, E) -> weights (T, k) float32, expert ids (T, k).

    Softmax over the k largest logits equals softmax over all, keep top-k, renormalise.
    """
    top, ids = gate_logits.topk(k, dim=-1)
    return F.softmax(top.float(), dim=-1), ids


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a.dim, a.n_heads, a.n_kv_heads, a.head_dim)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.gate = nn.Linear(a.dim, a.n_experts, bias=False)


class RouterModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, meta: StepMetadata, cache: RollingKVCache, experts: ExpertBackend,
                logit_rows: torch.Tensor, trace: list | None = None, keys: np.ndarray | None = None
                ) -> torch.Tensor:
        """tokens (T,) -> logits (len(logit_rows), V) float32 of the rows asked for.

        trace, when given, receives (expert_ids, weights) per layer; keys (T,) name each row's sequence
        for the expert backend.
        """
        h = self.tok_embeddings(tokens)  # (T, dim)
        cos, sin = self.rope.cos_sin(meta.positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = h + layer.attention(layer.attention_norm(h), cos, sin, meta, cache.k[i], cache.v[i])
            x = layer.ffn_norm(h)
            weights, ids = route(layer.gate(x), self.args.top_k)
            if trace is not None:
                trace.append((ids, weights))
            h = h + experts.forward(i, x, ids, weights, keys)
        return self.output(self.norm(h[logit_rows])).float()

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype) -> "RouterModel":
        a = ckpt.args
        with torch.device("meta"):
            model = cls(a)
        state = {ours: ckpt.tensor(hf, shape, dtype) for ours, (hf, shape) in dense_names(a).items()}
        model.load_state_dict(state, assign=True)
        return model.eval()
