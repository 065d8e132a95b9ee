"""raymoe's own Prometheus metrics, exported by Ray beside Ray Serve's (names get Ray's `ray_` prefix)."""

import time
from collections import deque

import torch
from ray.serve.metrics import Counter, Gauge, Histogram

from router.engine import Engine

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
STEP_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
RATE_WINDOW_S = 10.0  # tokens/s is averaged over this window


class RouterMetrics:
    """Updated on the engine thread after each step, and by the HTTP handlers per request."""

    def __init__(self, model: str, n_layers: int, n_experts: int):
        tags = {"model": model}
        self.prompt_tokens = Counter("raymoe_prompt_tokens", "prompt tokens prefilled", tag_keys=("model",))
        self.generation_tokens = Counter("raymoe_generation_tokens", "tokens generated", tag_keys=("model",))
        self.tokens_per_s = Gauge("raymoe_generation_tokens_per_second",
                                  f"tokens generated per second over the last {RATE_WINDOW_S:g} s",
                                  tag_keys=("model",))
        self.running = Gauge("raymoe_num_requests_running", "sequences in the running batch",
                             tag_keys=("model",))
        self.waiting = Gauge("raymoe_num_requests_waiting", "sequences waiting for a slot",
                             tag_keys=("model",))
        self.step_tokens = Histogram("raymoe_step_batch_tokens", "tokens per engine step",
                                     boundaries=BATCH_BOUNDARIES, tag_keys=("model",))
        self.step_seconds = Histogram("raymoe_step_seconds", "duration of one engine step",
                                      boundaries=STEP_BOUNDARIES, tag_keys=("model",))
        self.expert_tokens = Counter("raymoe_expert_tokens", "tokens routed to each (layer, expert)",
                                     tag_keys=("model", "layer", "expert"))
        self.expert_batch = Histogram("raymoe_expert_batch_size", "tokens one expert received in one step",
                                      boundaries=BATCH_BOUNDARIES, tag_keys=("model", "expert"))
        self.requests = Counter("raymoe_requests", "HTTP requests by endpoint and status",
                                tag_keys=("model", "endpoint", "status"))
        for m in (self.prompt_tokens, self.generation_tokens, self.tokens_per_s, self.running, self.waiting,
                  self.step_tokens, self.step_seconds, self.expert_tokens, self.expert_batch, self.requests):
            m.set_default_tags(dict(tags))
        self._last_prompt = self._last_generated = 0
        self._last_experts = torch.zeros(n_layers, n_experts, dtype=torch.long)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated in the step)

    def on_step(self, engine: Engine, seconds: float) -> None:
        prompt = engine.num_prompt_tokens - self._last_prompt
        generated = engine.num_generated_tokens - self._last_generated
        self._last_prompt, self._last_generated = engine.num_prompt_tokens, engine.num_generated_tokens
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)
        now = time.monotonic()
        self._recent.append((now, generated))
        while self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        span = max(now - self._recent[0][0], seconds)
        self.tokens_per_s.set(sum(n for _, n in self._recent) / span if span > 0 else 0.0)
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        self.step_seconds.observe(seconds)
        per_expert = engine.expert_tokens - self._last_experts  # (L, E) tokens routed in this step
        self._last_experts = engine.expert_tokens.clone()
        self.step_tokens.observe(int(per_expert[0].sum()) // max(engine.args.top_k, 1))
        for layer, expert in per_expert.nonzero().tolist():
            n = int(per_expert[layer, expert])
            self.expert_tokens.inc(n, tags={"layer": str(layer), "expert": str(expert)})
            self.expert_batch.observe(n, tags={"expert": str(expert)})

    def request(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
