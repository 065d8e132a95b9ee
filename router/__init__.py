from router.llm import LLM
from router.outputs import CompletionOutput, RequestOutput
from router.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
