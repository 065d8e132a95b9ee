from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """The checkpoint's `tokenizer.json`."""

    def __init__(self, path: str | Path):
        self.tok = HFTokenizer.from_file(str(Path(path) / "tokenizer.json"))

    @classmethod
    def maybe(cls, path: str | Path) -> "Tokenizer | None":
        return cls(path) if (Path(path) / "tokenizer.json").is_file() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encodings(self, texts: list[str], add_special_tokens: bool = True) -> list:
        """The tokenizers Encodings (ids and character offsets) of texts. encode_batch releases the GIL while it
        works (encode does not), so a long prompt tokenized on a worker thread leaves the event loop running."""
        return self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @cached_property
    def special_ids(self) -> set[int]:
        """Ids of special tokens (<s>, </s>): decoding drops them, so they have no text."""
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()
