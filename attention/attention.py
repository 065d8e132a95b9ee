import torch
import torch.nn.functional as F
from torch import nn

from attention.cache import StepMetadata
from attention.rope import apply_rope
from matmul.packed import Linear


class Attention(nn.Module):
    """Grouped-query attention over a rolling KV cache, for a flat batch of decodes and prompt chunks."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = Linear(dim, n_heads * head_dim)
        self.wk = Linear(dim, n_kv_heads * head_dim)
        self.wv = Linear(dim, n_kv_heads * head_dim)
        self.wo = Linear(n_heads * head_dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x (T, dim); k_cache/v_cache (rows, W, KVH, D) of this layer, updated in place."""
        T = x.shape[0]
        q = apply_rope(self.wq(x).view(T, self.n_heads, self.head_dim), cos, sin)  # (T, H, D)
        k = apply_rope(self.wk(x).view(T, self.n_kv_heads, self.head_dim), cos, sin)  # (T, KVH, D)
        v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)
        out = torch.empty_like(q)

        n = meta.num_decode
        if n:
            # Writing first is safe: the evicted slot held position p - W, outside the window.
            k_cache[meta.decode_rows, meta.decode_slots] = k[:n]
            v_cache[meta.decode_rows, meta.decode_slots] = v[:n]
            S = meta.decode_span
            keys = k_cache[meta.decode_rows, :S].transpose(1, 2)  # (n, KVH, S, D)
            values = v_cache[meta.decode_rows, :S].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:n, :, None], keys, values, attn_mask=meta.decode_mask,
                                               enable_gqa=True)  # (n, H, 1, D)
            out[:n] = o[:, :, 0]

        W = k_cache.shape[1]
        for c in meta.prefills:
            sl = slice(c.start, c.start + c.length)
            qc, kc, vc = q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)  # (H|KVH, c, D)
            # Queries in blocks of W: block [qs, qe) sees only the chunk's keys [qs - W + 1, qe), and the
            # cached keys only in the first block, so the work is c * 2W rather than c^2.
            for qs in range(0, c.length, W):
                qe, ks = min(qs + W, c.length), max(0, qs - W + 1)
                keys, values = kc[:, ks:qe], vc[:, ks:qe]
                mask = c.mask[qs:qe, c.n_cached + ks : c.n_cached + qe]
                if qs == 0 and c.n_cached:
                    keys = torch.cat((k_cache[c.row, : c.n_cached].transpose(0, 1), keys), dim=1)
                    values = torch.cat((v_cache[c.row, : c.n_cached].transpose(0, 1), values), dim=1)
                    mask = torch.cat((c.mask[qs:qe, : c.n_cached], mask), dim=1)
                o = F.scaled_dot_product_attention(qc[:, qs:qe], keys, values, attn_mask=mask,
                                                   enable_gqa=True)  # (H, qe - qs, D)
                out[c.start + qs : c.start + qe] = o.transpose(0, 1)
            # Only the last W tokens are written: earlier ones would be evicted within the chunk.
            m = min(c.length, W)
            slots = torch.arange(c.pos0 + c.length - m, c.pos0 + c.length) % W
            k_cache[c.row, slots] = k[sl][-m:]
            v_cache[c.row, slots] = v[sl][-m:]

        return self.wo(out.view(T, self.n_heads * self.head_dim))
