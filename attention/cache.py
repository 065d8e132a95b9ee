from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    """One sequence's prompt chunk inside a step's flat token batch."""

    row: int  # cache row of the sequence
    start: int  # offset of the chunk's first token in the flat batch
    length: int  # c, tokens in the chunk
    pos0: int  # position of the chunk's first token (= tokens already cached)
    n_cached: int  # cache slots to read: min(W, pos0)
    mask: torch.Tensor  # (c, n_cached + c) bool, cached keys first then the chunk's own


@dataclass
class StepMetadata:
    """Everything attention needs about one step, built once and shared by every layer.

    Decode tokens (one per sequence) come first in the flat batch, prefill chunks after them.
    """

    positions: torch.Tensor  # (T,)
    num_decode: int
    decode_rows: torch.Tensor  # (n,)
    decode_slots: torch.Tensor  # (n,)
    decode_span: int  # S: slots [0, S) hold every key a decode token can see
    decode_mask: torch.Tensor  # (n, 1, 1, S) bool
    prefills: list[PrefillChunk]


class RollingKVCache:
    """Rolling buffer KV cache: position i of a sequence lives in slot i mod W.

    One row per running sequence, so sequences of any lengths share a batch; the buffer never
    grows past W keys per sequence. After a sequence has written n tokens, slot s holds position
    ``n - 1 - ((n - 1 - s) mod W)``, and is filled when that is >= 0.

    Worked example, W = 4, a sequence that has written n = 6 tokens (positions 0..5):

        slot:      0  1  2  3
        position:  4  5  2  3       e.g. slot 2: 5 - ((5 - 2) mod 4) = 2

    Decoding position 6 first writes slot 6 mod 4 = 2, evicting position 2, which the query at 6
    can no longer see anyway (it sees 6 - 4 < j <= 6: positions 3, 4, 5, 6), then attends over
    all four slots; order does not matter because RoPE was applied before caching.

    A prompt chunk of c tokens at positions p..p+c-1 first reads the cached keys it can still
    see (masking by position), attends over them and its own keys, and only then writes its last
    min(c, W) tokens, so a chunk longer than W never evicts keys its own queries still need.
    With n = 2 tokens cached and a chunk of c = 5 tokens (positions 2..6), the query at 6 sees
    the chunk's keys 3..6 and none of the cached 0, 1; afterwards slots hold positions 4 5 6 3.
    """

    def __init__(self, n_layers: int, max_seqs: int, window: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        self.window = window
        shape = (n_layers, max_seqs, window, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    def slot_positions(self, n: torch.Tensor) -> torch.Tensor:
        """n (B,) tokens written per sequence -> (B, W) position held by each slot (< 0: empty)."""
        s = torch.arange(self.window)
        last = n[:, None] - 1
        return last - torch.remainder(last - s, self.window)

    def plan(self, decode_rows: list[int], decode_positions: list[int],
             prefills: list[tuple[int, int, int]]) -> StepMetadata:
        """Build one step's metadata.

        decode_rows/decode_positions: one token per decoding sequence, at that position.
        prefills: (row, pos0, length) per prompt chunk, in batch order after the decodes.
        """
        W = self.window
        n = len(decode_rows)
        dpos = torch.tensor(decode_positions, dtype=torch.long)
        positions = [dpos]
        span = min(W, max(decode_positions) + 1) if n else 0
        decode_mask = (self.slot_positions(dpos + 1)[:, :span] >= 0)[:, None, None, :]
        chunks = []
        start = n
        for row, pos0, length in prefills:
            qpos = torch.arange(pos0, pos0 + length)
            n_cached = min(W, pos0)
            cpos = self.slot_positions(torch.tensor([pos0]))[0, :n_cached]
            kpos = torch.cat((cpos, qpos))
            mask = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)
            chunks.append(PrefillChunk(row, start, length, pos0, n_cached, mask))
            positions.append(qpos)
            start += length
        return StepMetadata(
            positions=torch.cat(positions),
            num_decode=n,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_slots=dpos % W,
            decode_span=span,
            decode_mask=decode_mask,
            prefills=chunks,
        )
