"""Output text built token by token at a cost that does not grow with the output, and stop strings
searched only where a new match can be, as vLLM's detokenizer does.

A sequence's text is the decode of its output ids, decoded in a window: the ids from `prefix_offset`
on, of which those before `read_offset` were already emitted. Decoding the window with and without
the new token and keeping the difference gets the spacing a token has inside text (a SentencePiece
"▁word" is " word" there, "word" alone), so the window starts a few prompt tokens back.

Worked example (byte-level BPE; "é" is the two byte tokens b1 b2; c0 c1 are the prompt's last tokens):

    offsets (prefix, read)  window decoded          emitted   offsets after
    (0, 2) + h              c0 c1 [h]   "..h" - ".."  "h"       (2, 3)
    (2, 3) + b1             h [b1]      "h\ufffd"     ""        (2, 3)   half a character: wait
    (2, 3) + b2             h [b1 b2]   "hé" - "h"    "é"       (3, 5)
    (3, 5) + x              b1 b2 [x]   "éx" - "é"    "x"       (5, 6)   the window stays short
"""

from router.tokenizer import Tokenizer

CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET
INCOMPLETE = "\ufffd"  # what a byte-level decoder makes of a character still missing bytes
MAX_PENDING = 4  # held-back tokens before looking for a boundary the decoder restarts at (a character is <= 4 bytes)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        # Decode drops these before the decoder sees them, so the window need not hold them: a run of them
        # (an EOS loop under ignore_eos) would otherwise widen the window token by token.
        self.special = tokenizer.special_ids
        self.hf = tokenizer.tok
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        if tokenizer.decode(context).endswith(INCOMPLETE):
            # The prompt ends inside a character: its continuation then reads as the plain decode of the
            # output alone does (a replacement character), not as the prompt's character completed.
            context = []
        self.ids = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""

    def _window_texts(self) -> tuple[str, str]:
        window = self.ids[self.prefix_offset :]
        return (self.tokenizer.decode(window[: self.read_offset - self.prefix_offset]),
                self.tokenizer.decode(window))

    def step(self, token_id: int) -> str:
        """Add a generated token; return the text it completes ('' while a character is incomplete)."""
        if token_id in self.special or self.hf.id_to_token(token_id) is None:  # ids outside the vocabulary decode to ""
            return ""
        self.ids.append(token_id)
        prefix, full = self._window_texts()
        end = len(self.ids)
        if full.endswith(INCOMPLETE):
            if end - self.read_offset < MAX_PENDING:
                return ""
            # Bytes that can never complete (stray continuation bytes) would hold the window open for good.
            # Emit up to the latest token boundary the decoder restarts at: there, decoding the two sides
            # apart gives the same text as decoding them together, whatever bytes come later.
            end = self._restart_boundary(prefix, full)
            if end < 0:
                return ""
            full = self.tokenizer.decode(self.ids[self.prefix_offset : end])
        if len(full) <= len(prefix):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, end
        self.text += delta
        return delta

    def _restart_boundary(self, prefix: str, full: str) -> int:
        for k in range(len(self.ids) - 1, self.read_offset, -1):
            # The tail must have text: with no byte after k, bytes before it may still complete a character.
            head, tail = self.tokenizer.decode(self.ids[self.prefix_offset : k]), self.tokenizer.decode(self.ids[k:])
            if tail and head.startswith(prefix) and full == head + tail:
                return k
        return -1

    def flush(self) -> str:
        """At the end of the sequence: what is still held back (an incomplete character, as U+FFFD)."""
        prefix, full = self._window_texts()
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


class StopStrings:
    """The earliest stop string in a text that grows at its end, found by looking only at the new end.

    Earlier text held no stop string, so a new match must end in the new characters: it starts at most
    len(stop) - 1 characters before them. Like vLLM and OpenAI, the earliest match in the text wins,
    whichever stop string it is.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_chars: int) -> int:
        """Index in `text` where the earliest stop string starts, or -1; `new_chars` were just appended."""
        if not self.stops or not new_chars:
            return -1
        start = max(0, len(text) - new_chars - self.longest + 1)
        hits = [at for s in self.stops if (at := text.find(s, start)) >= 0]
        return min(hits, default=-1)
