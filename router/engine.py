"""The step loop: continuous batching of many sequences over one rolling KV cache."""

import logging
import zlib
from collections import deque
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import torch

from attention.cache import RollingKVCache
from router.config import EngineConfig
from router.detokenizer import IncrementalDetokenizer, StopStrings
from router.dispatch import ExpertBackend, ExpertsUnavailable
from router.model import MicroBatch, RouterModel
from router.sampling import SamplingParams, sample_row
from router.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def top_logprobs(row: torch.Tensor, n: int, chosen: int) -> dict[int, float]:
    """row (V,) log-probs -> {token: log-prob} for the n most likely tokens and the chosen one."""
    out = {}
    if n:
        vals, ids = row.topk(min(n, row.numel()))
        out = dict(zip(ids.tolist(), vals.tolist(), strict=True))
    out[chosen] = float(row[chosen])
    return out


@dataclass
class Sequence:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    chunk_size: int
    prompt: str | None = None
    keep_prompt_rows: bool = False  # keep every prompt position's full log-softmax (scoring)
    output_ids: list[int] = field(default_factory=list)
    row: int | None = None  # cache row while running
    num_computed: int = 0  # tokens whose keys and values are cached
    cumulative_logprob: float = 0.0
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    output_offsets: list[int] = field(default_factory=list)  # where each output token's text starts in text
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    prompt_rows: list[torch.Tensor] = field(default_factory=list)
    text: str = ""
    detokenizer: IncrementalDetokenizer | None = None  # set when the engine has a tokenizer
    stops: StopStrings | None = None
    finish_reason: str | None = None
    error: str | None = None  # why the server failed this sequence alone ("error" finish), for its log
    key: int = 0  # a stable number for the sequence: where a distributed backend keeps its tokens

    def __post_init__(self):
        self.key = zlib.crc32(self.seq_id.encode())

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.keep_prompt_rows or self.params.prompt_logprobs is not None


class Engine:
    """Steps all running sequences together; new ones join between steps, finished ones leave.

    Each step runs every decoding sequence's next token plus prompt chunks of the prefilling
    ones, within a token budget, as one flat batch through the model.
    """

    def __init__(self, model: RouterModel, experts: ExpertBackend, config: EngineConfig | None = None, *,
                 tokenizer: Tokenizer | None = None, kv_cache_bytes: int = 2 << 30):
        c = config or EngineConfig()
        a = self.args = model.args
        self.model, self.experts, self.tokenizer = model, experts, tokenizer
        max_num_seqs, chunk_size = c.max_num_seqs, c.chunk_size
        self.max_model_len = min(c.max_model_len or a.max_position_embeddings, a.max_position_embeddings)
        window = min(a.sliding_window or self.max_model_len, self.max_model_len)
        dtype = model.tok_embeddings.weight.dtype
        row_bytes = 2 * a.n_layers * window * a.n_kv_heads * a.head_dim * dtype.itemsize
        if row_bytes * max_num_seqs > kv_cache_bytes:
            max_num_seqs = max(1, kv_cache_bytes // row_bytes)
            log.warning("KV cache of %d rows of %d MiB each fits kv_cache_bytes; lower max_model_len for more",
                        max_num_seqs, row_bytes >> 20)
        self.max_num_seqs = max_num_seqs
        self.cache = RollingKVCache(a.n_layers, max_num_seqs, window, a.n_kv_heads, a.head_dim, dtype)
        # As in vLLM, a prompt chunk is bounded by the step's token budget unless asked otherwise.
        self.max_num_batched_tokens = max(c.max_num_batched_tokens, chunk_size or 0)
        self.chunk_size = chunk_size or self.max_num_batched_tokens
        self.ping_pong = c.ping_pong
        self.generator = torch.Generator().manual_seed(c.seed)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._ids = count()
        # Counters for metrics: tokens processed and per-(layer, expert) routed tokens.
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.expert_tokens = torch.zeros(a.n_layers, a.n_experts, dtype=torch.long)

    # --- requests -------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, seq_id: str | None = None,
                    prompt: str | None = None, chunk_size: int | None = None,
                    keep_prompt_rows: bool = False) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.args.vocab_size})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_model_len} tokens")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else self.generator
        seq = Sequence(seq_id if seq_id is not None else str(next(self._ids)), list(prompt_ids), params, gen,
                       chunk_size or self.chunk_size, prompt=prompt, keep_prompt_rows=keep_prompt_rows)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)
            seq.stops = StopStrings(params.stop)
        self.waiting.append(seq)
        return seq

    def abort(self, seq_id: str) -> None:
        for seq in list(self.waiting):
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
        for seq in self.running:
            if seq.seq_id == seq_id:
                self._finish(seq, "abort")
        self.running = [s for s in self.running if not s.finished]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the step -------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Run one batch; return the sequences that produced a token or finished in it."""
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.row = self.free_rows.pop()
            self.running.append(seq)
        self.experts.note_waiting(len(self.waiting))
        if not self.running:
            return []

        decode = [s for s in self.running if s.prefilled]
        budget = self.max_num_batched_tokens - len(decode)
        prefill: list[tuple[Sequence, int]] = []
        for s in self.running:
            if not s.prefilled and budget > 0:
                n = min(s.chunk_size, len(s.prompt_ids) - s.num_computed, budget)
                prefill.append((s, n))
                budget -= n

        overlap = self.ping_pong and self.experts.overlaps_calls
        groups = self._split(decode, prefill) if overlap else [(decode, prefill)]
        batches = [self._micro_batch(d, p) for d, p in groups]
        trace: list = []
        try:
            parts = self.model.forward_micro(batches, self.cache, self.experts, trace)
        except Exception:
            # Nothing of the step is kept, so running it again gives the same tokens. A decode token rewrites
            # its own cache slot with the same values; a prompt chunk may have overwritten slots its own
            # queries still read, so those prompts start over (recomputation, as vLLM preempts).
            for s, _ in prefill:
                s.num_computed, s.prompt_rows, s.prompt_logprobs = 0, [], []
            raise
        # Back to the step's order: every group's decode rows (one per sequence), then every group's prompt rows.
        logits = parts[0] if len(parts) == 1 else torch.cat(
            [lg[: len(d)] for lg, (d, _) in zip(parts, groups, strict=True)]
            + [lg[len(d) :] for lg, (d, _) in zip(parts, groups, strict=True)])
        self.expert_tokens += torch.stack([torch.bincount(ids.flatten(), minlength=self.args.n_experts)
                                           for ids, _ in trace])
        logprobs = torch.log_softmax(logits, dim=-1)  # (rows, V)

        updated = []
        r = 0
        for s in decode:
            s.num_computed += 1
            self._guarded(s, self._sample, s, logits[r], logprobs[r])
            updated.append(s)
            r += 1
        for s, n in prefill:
            if s.wants_prompt_logprobs:
                self._guarded(s, self._record_prompt_logprobs, s, logprobs[r : r + n])
                r += n
                last = r - 1
            else:
                last = r
            s.num_computed += n
            self.num_prompt_tokens += n
            if s.finished:  # recording its prompt log-probs failed it
                updated.append(s)
            elif s.prefilled:
                if s.params.max_tokens == 0:
                    self._guarded(s, self._finish, s, "length")
                else:
                    self._guarded(s, self._sample, s, logits[last], logprobs[last])
                updated.append(s)
                if not s.wants_prompt_logprobs:
                    r += 1
        self.running = [s for s in self.running if not s.finished]
        return updated

    def step_alone(self) -> list[Sequence]:
        """After a step that raised: run each running sequence in a step of its own, so that a sequence which
        fails a batch fails alone (finish "error") and the others go on. Returns the sequences updated.

        Raises ExpertsUnavailable as `step` does (the sequences not yet run stay as they were).
        """
        running, waiting = self.running, self.waiting
        self.waiting, updated = deque(), []
        try:
            for s in running:
                self.running = [s]
                try:
                    updated += self.step()
                except ExpertsUnavailable:
                    raise
                except Exception as e:
                    self._fail(s, e)
                    updated.append(s)
        finally:
            self.running = [s for s in running if not s.finished]
            self.waiting = waiting
        return updated

    def _guarded(self, s: Sequence, fn, *args) -> None:
        """Run one sequence's own work (sampling, stop check, detokenizing); an error in it fails that sequence."""
        try:
            fn(*args)
        except Exception as e:
            self._fail(s, e)

    def _fail(self, s: Sequence, e: Exception) -> None:
        log.error("sequence %s failed: %s", s.seq_id, e, exc_info=e)
        s.error = f"{type(e).__name__}: {e}"
        self._finish(s, "error")

    def _micro_batch(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]) -> MicroBatch:
        """The model's input for these sequences: decode tokens first, then prompt chunks (as the cache plans)."""
        tokens = [s.output_ids[-1] for s in decode]
        logit_rows = list(range(len(decode)))
        for s, n in prefill:
            start = len(tokens)
            tokens += s.prompt_ids[s.num_computed : s.num_computed + n]
            if s.wants_prompt_logprobs:
                logit_rows += range(start, start + n)
            elif s.num_computed + n == len(s.prompt_ids):
                logit_rows.append(start + n - 1)
        meta = self.cache.plan([s.row for s in decode], [s.num_computed for s in decode],
                               [(s.row, s.num_computed, n) for s, n in prefill])
        keys = np.repeat(np.array([s.key for s in decode] + [s.key for s, _ in prefill], dtype=np.int64),
                         [1] * len(decode) + [n for _, n in prefill])  # (T,) each row's sequence
        return MicroBatch(torch.tensor(tokens), meta, torch.tensor(logit_rows, dtype=torch.long), keys)

    @staticmethod
    def _split(decode: list[Sequence], prefill: list[tuple[Sequence, int]]
               ) -> list[tuple[list[Sequence], list[tuple[Sequence, int]]]]:
        """Two groups of about equal tokens, cut at a sequence boundary (decodes count 1, chunks their length).

        Example: decodes a b c and a chunk (d, 5): 8 tokens, halves from 4 -> [a b c] and [(d, 5)].
        """
        items = [(s, 1) for s in decode] + prefill
        if len(items) < 2:
            return [(decode, prefill)]
        total, run, cut = sum(n for _, n in items), 0, 1
        for i, (_, n) in enumerate(items[:-1]):
            run += n
            cut = i + 1
            if run * 2 >= total:
                break
        k = min(cut, len(decode))  # the first group's decodes; the rest of it is prompt chunks
        return [(decode[:k], prefill[: cut - k]), (decode[k:], prefill[cut - k :])]

    def _record_prompt_logprobs(self, s: Sequence, rows: torch.Tensor) -> None:
        """rows (n, V): log-probs predicting the tokens after positions num_computed.. of the prompt."""
        if s.keep_prompt_rows:
            s.prompt_rows.append(rows.clone())
        n_top = s.params.prompt_logprobs
        if n_top is None:
            return
        if s.num_computed == 0:
            s.prompt_logprobs.append(None)
        for i in range(rows.shape[0]):
            nxt = s.num_computed + i + 1
            if nxt < len(s.prompt_ids):
                s.prompt_logprobs.append(top_logprobs(rows[i], n_top, s.prompt_ids[nxt]))

    def _sample(self, s: Sequence, logits: torch.Tensor, logprobs: torch.Tensor) -> None:
        tok = sample_row(logits, s.params, s.generator)
        s.output_ids.append(tok)
        s.output_offsets.append(len(s.text))
        s.cumulative_logprob += float(logprobs[tok])
        if s.params.logprobs is not None:
            s.output_logprobs.append(top_logprobs(logprobs, s.params.logprobs, tok))
        self.num_generated_tokens += 1
        p = s.params
        if s.detokenizer is not None and self._stopped_by_string(s, s.detokenizer.step(tok)):
            return self._finish(s, "stop")
        if (tok in self.args.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return self._finish(s, "stop")
        if len(s.output_ids) >= p.max_tokens or s.num_computed + 1 >= self.max_model_len:
            return self._finish(s, "length")

    @staticmethod
    def _stopped_by_string(s: Sequence, delta: str) -> bool:
        """Take the text a token completed; True (text cut before it) when it completes a stop string."""
        s.text = s.detokenizer.text
        at = s.stops.find(s.text, len(delta))
        if at >= 0:
            s.text = s.text[:at]
        return at >= 0

    def _finish(self, s: Sequence, reason: str) -> None:
        if s.detokenizer is not None and reason not in ("abort", "error") and len(s.text) == len(s.detokenizer.text):
            # Ended on a token that left a character incomplete: its text goes out as U+FFFD.
            if self._stopped_by_string(s, s.detokenizer.flush()):
                reason = "stop"
        s.finish_reason = reason
        if s.row is not None:
            self.free_rows.append(s.row)
            s.row = None
