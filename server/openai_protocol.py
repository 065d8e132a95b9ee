"""The OpenAI API as vLLM serves it: request models with their validation, response shapes, errors."""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.sampling import SamplingParams

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


# Parameters that change what is generated and that raymoe does not implement, with the values that leave the
# output as it is. Set to anything else, a request is refused naming them rather than answered as if they were not.
UNSUPPORTED = {
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "min_tokens": (None, 0),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate ("\\ud800" is valid JSON, but no text:
    no tokenizer takes it and no response can encode it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        return next((w for k, v in value.items() if (w := lone_surrogate(v, f"{where}.{k}".lstrip("."))))
                    , None)
    elif isinstance(value, list):
        return next((w for i, v in enumerate(value) if (w := lone_surrogate(v, f"{where}.{i}".lstrip(".")))),
                    None)
    return None


class OpenAIModel(BaseModel):
    # Other unknown fields (user, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            used = sorted(k for k, neutral in UNSUPPORTED.items() if k in data and data[k] not in neutral)
            if used:
                raise ValueError(f"unsupported parameters: {', '.join(used)}")
            if where := lone_surrogate(data):
                raise ValueError(f"{where}: a lone UTF-16 surrogate is not text")
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk, not only the last


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions, ranged as vLLM ranges them."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt; n > 1 is not supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=max_tokens, seed=self.seed, stop=list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.include_usage and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    # A string, a list of strings, one list of token ids, or a list of them (one choice each).
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int = Field(16, ge=0, lt=2**31)  # 0 scores the prompt only (lm-evaluation-harness's loglikelihood)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True  # vLLM's: False for a client that tokenizes itself (no <s> added)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if not v or (isinstance(v, list) and any(not p for p in v if isinstance(p, str | list))):
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(OpenAIModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, lt=2**31)
    max_completion_tokens: int | None = Field(None, ge=0, lt=2**31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # vLLM's default for chat: the template writes <s> itself

    def max_new_tokens(self, room: int) -> int:
        """The request's limit, or what is left of the context (vLLM's default for chat)."""
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return room if limit is None else limit

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a prompt, or a conversation as the chat template renders it."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (as vLLM)

    @model_validator(mode="after")
    def _one_form(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.add_special_tokens is None:
            self.add_special_tokens = self.prompt is not None
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[TokenId] = Field(min_length=1)


class DetokenizeResponse(BaseModel):
    prompt: str


# --- responses -------------------------------------------------------------------------------


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raymoe"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorResponse(BaseModel):
    object: Literal["error"] = "error"
    message: str
    type: str
    param: str | None = None
    code: int


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return ErrorResponse(message=message, type=ERROR_TYPES.get(status, "Error"), param=param,
                         code=status).model_dump()


def format_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's error list -> one readable message and the first offending field."""
    parts, param = [], None
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        param = param or loc or None
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param
