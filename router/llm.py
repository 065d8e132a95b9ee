"""The offline API, shaped like vLLM's `LLM`."""

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint.args import parse_dtype
from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint
from router.config import EngineConfig, ExpertPlaneConfig, split_settings
from router.dispatch import Backoff, ExpertsUnavailable, make_expert_backend
from router.engine import Engine, Sequence
from router.model import RouterModel
from router.outputs import CompletionOutput, RequestOutput
from router.sampling import SamplingParams
from router.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PromptType = str | dict | list[int]


def to_output(seq: Sequence) -> RequestOutput:
    return RequestOutput(
        request_id=seq.seq_id,
        prompt=seq.prompt,
        prompt_token_ids=seq.prompt_ids,
        outputs=[CompletionOutput(0, seq.text, list(seq.output_ids), seq.cumulative_logprob,
                                  seq.output_logprobs if seq.params.logprobs is not None else None,
                                  seq.finish_reason)],
        finished=seq.finished,
        prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
    )


class LLM:
    """A Mixtral-style checkpoint ready to generate, with its experts in-process or on Ray.

    Keyword settings are the fields of `EngineConfig` (dtype, max_num_seqs, ...) and of
    `ExpertPlaneConfig` (num_shards, replicas_per_shard, num_gpus, expert_num_cpus, ...).

    >>> llm = LLM(model="models/tiny-mixtral")
    >>> llm.generate(["def f(x):"], SamplingParams(temperature=0.0, max_tokens=16))[0].outputs[0].text
    """

    def __init__(self, model: str | Path, expert_backend: str = "local", **settings):
        engine, plane = split_settings(settings, EngineConfig, ExpertPlaneConfig)
        self.config = EngineConfig(model=str(model), **engine)
        self.plane = ExpertPlaneConfig(expert_backend=expert_backend, **plane)
        self.model_path = resolve_model(model)
        self.dtype = parse_dtype(self.config.dtype)
        self.checkpoint = Checkpoint(self.model_path)
        self.args = self.checkpoint.args
        self.tokenizer = Tokenizer.maybe(self.model_path)
        router_model = RouterModel.from_checkpoint(self.checkpoint, self.dtype)
        self.experts = make_expert_backend(self.plane, self.checkpoint, self.dtype)
        self.engine = Engine(router_model, self.experts, self.config, tokenizer=self.tokenizer)

    def encode(self, prompt: PromptType) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer.json: pass prompt_token_ids instead of text")
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"]), prompt.get("prompt")
            return self.encode(prompt["prompt"])
        return list(prompt), None

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        # No bar unless asked: even a disabled tqdm starts tqdm's monitor thread, which then outlives the LLM.
        bar = tqdm(total=len(seqs), desc="generate") if use_tqdm else None
        backoff = Backoff()
        while self.engine.has_unfinished():
            try:
                done = sum(s.finished for s in self.engine.step())
                if bar is not None:
                    bar.update(done)
                backoff.succeeded()
            except ExpertsUnavailable as e:  # nothing of the step was kept: run it again a little later
                wait = backoff.failed()
                log.warning("experts unavailable, retrying in %.1fs: %s", wait, e)
                time.sleep(wait)
        if bar is not None:
            bar.close()

    def generate(self, prompts: PromptType | list[PromptType], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt concurrently through the engine; outputs come back in prompt order."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        seqs = []
        for p in prompts:
            ids, text = self.encode(p)
            seqs.append(self.engine.add_request(ids, params, prompt=text))
        self._run(seqs, use_tqdm)
        return [to_output(s) for s in seqs]

    def logprobs(self, prompts: list[PromptType], chunk_size: int | None = None) -> list[torch.Tensor]:
        """Score prompts: per prompt a (len, vocab) float32 log-softmax; row t predicts token t + 1."""
        params = SamplingParams(max_tokens=0)
        seqs = [self.engine.add_request(self.encode(p)[0], params, chunk_size=chunk_size, keep_prompt_rows=True)
                for p in prompts]
        self._run(seqs, use_tqdm=False)
        return [torch.cat(s.prompt_rows) for s in seqs]

    def shutdown(self) -> None:
        self.experts.close()
