from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """The checkpoint's `tokenizer.json`."""

    def __init__(self, path: str | Path):
        self.tok = HFTokenizer.from_file(str(Path(path) / "tokenizer.json"))

    @classmethod
    def maybe(cls, path: str | Path) -> "Tokenizer | None":
        return cls(path) if (Path(path) / "tokenizer.json").is_file() else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()
