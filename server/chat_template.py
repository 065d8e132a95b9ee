"""Chat templates rendered the Hugging Face way: jinja2 over `messages` with the special tokens' text."""

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the conversation (its own raise_exception) or failed to render."""


def _token_text(tok) -> str:
    # tokenizer_config.json writes special tokens as plain strings or as AddedToken dicts.
    if isinstance(tok, dict):
        return tok.get("content", "")
    return tok or ""


def _raise(message: str):
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        # The same environment settings as transformers' apply_chat_template.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def maybe(cls, path: str | Path) -> "ChatTemplate | None":
        """The template in `tokenizer_config.json`, or None when the checkpoint has none."""
        cfg_file = Path(path) / "tokenizer_config.json"
        if not cfg_file.is_file():
            return None
        cfg = json.loads(cfg_file.read_text())
        source = cfg.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        return cls(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template failed to render these messages: {e}") from e
