"""A differentiable full-sequence Mixtral built from the inference pieces, and its export to HF layout.

The non-expert weights live in a `RouterModel` (so the module layout is the serving one), the experts
in two stacked Parameters run through `swiglu()`, and routing is `route()`: training and
serving share one definition of every operation but attention, which here runs over whole sequences.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from attention.rope import apply_rope
from checkpoint.args import ModelArgs
from checkpoint.hf import dense_names, expert_names
from experts.ffn import swiglu
from router.model import RouterModel, route


def window_mask(T: int, window: int | None) -> torch.Tensor:
    """(T, T) bool: query i sees keys i - W < j <= i."""
    i = torch.arange(T)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window) if window else d >= 0


def load_balancing_loss(gate_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss, transformers' `load_balancing_loss_func` without padding masks.

    gate_logits: per layer (N, E) -> E * sum over (slot, e) of (fraction of tokens whose slot goes to e)
    * (mean gate probability of e), over the tokens of all the layers given; k when both are uniform.
    """
    logits = torch.cat(gate_logits)  # (L N, E)
    E = logits.shape[-1]
    probs = F.softmax(logits.float(), dim=-1)
    chosen = probs.topk(k, dim=-1).indices
    tokens_per_expert = F.one_hot(chosen, E).float().mean(0)  # (k, E)
    return E * (tokens_per_expert * probs.mean(0)[None]).sum()


class TrainableMixtral(nn.Module):
    def __init__(self, args: ModelArgs, experts_held: int | None = None):
        """experts_held: experts per layer this module holds (all of them, unless an expert-parallel
        subclass holds a slice)."""
        super().__init__()
        self.args = args
        self.core = RouterModel(args)
        L, I, D = args.n_layers, args.hidden_dim, args.dim
        E = args.n_experts if experts_held is None else experts_held
        self.w13 = nn.Parameter(torch.empty(L, E, 2 * I, D))  # w1 then w3, out-major as checkpoints store them
        self.w2 = nn.Parameter(torch.empty(L, E, D, I))

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """GPT-2 style: N(0, std), residual output projections scaled down by sqrt(2 L), norms at one."""
        out_std = std / math.sqrt(2 * self.args.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    s = out_std if name == "w2" or name.endswith("wo.weight") else std
                    p.normal_(0.0, s, generator=generator)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens (B, T) -> logits (B, T, V), gate logits per layer (B T, E)."""
        a, m = self.args, self.core
        B, T = tokens.shape
        mask = window_mask(T, a.sliding_window).to(tokens.device)
        h = m.tok_embeddings(tokens)  # (B, T, D)
        cos, sin = (t.to(h.device) for t in m.rope.cos_sin(torch.arange(T), h.dtype))  # (T, 1, hd)
        gates = []
        for i, layer in enumerate(m.layers):
            att = layer.attention
            x = layer.attention_norm(h)
            q = apply_rope(att.wq(x).view(B, T, a.n_heads, a.head_dim), cos, sin).transpose(1, 2)  # (B, H, T, hd)
            k = apply_rope(att.wk(x).view(B, T, a.n_kv_heads, a.head_dim), cos, sin).transpose(1, 2)
            v = att.wv(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, hd)
            h = h + att.wo(o.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))
            x = layer.ffn_norm(h).view(B * T, a.dim)
            logits = layer.gate(x)  # (B T, E)
            gates.append(logits)
            weights, ids = route(logits, a.top_k)
            h = h + self.moe(i, x, ids, weights).view(B, T, a.dim)
        return m.output(m.norm(h)), gates

    def moe(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids/weights (N, k) -> (N, D), sum_k weights * expert(x).

        The sum ExpertSet.forward computes, arranged for autograd: one gather sorts the N k routing
        slots by expert, each expert runs on its contiguous slice, one gather puts them back, so the
        backward pass scatters twice in all rather than once per expert.
        """
        N, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # (N k,)
        counts = torch.bincount(flat, minlength=self.args.n_experts).tolist()
        xs = x[order // k].split(counts)
        ys = torch.cat([swiglu(c, self.w13[layer, e], self.w2[layer, e]) for e, c in enumerate(xs)])  # (N k, D)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return (ys[inverse].view(N, k, -1) * weights[..., None].to(x.dtype)).sum(1)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor under the names transformers' MixtralForCausalLM (and our Checkpoint) reads."""
        return hf_state_dict(self.core, self.w13, self.w2)


def hf_state_dict(core: RouterModel, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dense weights of `core` and all experts, w13 (L, E, 2I, D) and w2 (L, E, D, I), under HF names."""
    a, I = core.args, core.args.hidden_dim
    state = core.state_dict()
    out = {hf: state[ours] for ours, (hf, _) in dense_names(a).items()}
    for i in range(a.n_layers):
        for e in range(a.n_experts):
            n1, n2, n3 = expert_names(i, e)
            out |= {n1: w13[i, e, :I], n2: w2[i, e], n3: w13[i, e, I:]}
    return {k: v.detach() for k, v in out.items()}
