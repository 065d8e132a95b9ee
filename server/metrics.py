"""raymoe's own Prometheus metrics, exported by Ray beside Ray Serve's (names get Ray's `ray_` prefix)."""

import time
from collections import deque

import torch
from ray.serve.metrics import Counter, Gauge, Histogram

from router.engine import Engine

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
STEP_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
RATE_WINDOW_S = 10.0  # tokens/s is averaged over this window
FLUSH_S = 1.0


class RouterMetrics:
    """Updated on the engine thread after each step, and by the HTTP handlers per request."""

    def __init__(self, model: str, n_layers: int, n_experts: int):
        tags = {"model": model}
        self.prompt_tokens = Counter("raymoe_prompt_tokens", "prompt tokens prefilled", tag_keys=("model",))
        self.generation_tokens = Counter("raymoe_generation_tokens", "tokens generated", tag_keys=("model",))
        self.tokens_per_s = Gauge("raymoe_generation_tokens_per_second",
                                  f"tokens generated per second over about the last {RATE_WINDOW_S:g} s",
                                  tag_keys=("model",))
        self.running = Gauge("raymoe_num_requests_running", "sequences in the running batch",
                             tag_keys=("model",))
        self.waiting = Gauge("raymoe_num_requests_waiting", "sequences waiting for a slot",
                             tag_keys=("model",))
        self.step_tokens = Histogram("raymoe_step_batch_tokens", "mean tokens per engine step, per flush",
                                     boundaries=BATCH_BOUNDARIES, tag_keys=("model",))
        self.step_seconds = Histogram("raymoe_step_seconds", "duration of one engine step",
                                      boundaries=STEP_BOUNDARIES, tag_keys=("model",))
        self.expert_tokens = Counter("raymoe_expert_tokens", "tokens routed to each (layer, expert)",
                                     tag_keys=("model", "layer", "expert"))
        self.expert_batch = Histogram("raymoe_expert_batch_size",
                                      "mean tokens one (layer, expert) received per step, per flush",
                                      boundaries=BATCH_BOUNDARIES, tag_keys=("model", "expert"))
        self.requests = Counter("raymoe_requests", "HTTP requests by endpoint and status",
                                tag_keys=("model", "endpoint", "status"))
        for m in (self.prompt_tokens, self.generation_tokens, self.tokens_per_s, self.running, self.waiting,
                  self.step_tokens, self.step_seconds, self.expert_tokens, self.expert_batch, self.requests):
            m.set_default_tags(dict(tags))
        self._last_prompt = self._last_generated = 0
        self._last_experts = torch.zeros(n_layers, n_experts, dtype=torch.long)
        self._steps = 0  # steps since the last flush
        self._flushed = time.monotonic()
        self._history: deque[tuple[float, int]] = deque([(self._flushed, 0)])  # (flush time, tokens so far)

    def on_step(self, engine: Engine, seconds: float) -> None:
        # Per step only what must be per step; counters and gauges go out once per FLUSH_S, which keeps
        # a Mixtral-sized step (32 layers x 8 experts) from paying hundreds of metric calls.
        self.step_seconds.observe(seconds)
        self._steps += 1
        now = time.monotonic()
        if now - self._flushed >= FLUSH_S or not engine.has_unfinished():
            self.flush(engine, now)

    def flush(self, engine: Engine, now: float) -> None:
        prompt = engine.num_prompt_tokens - self._last_prompt
        generated = engine.num_generated_tokens - self._last_generated
        self._last_prompt, self._last_generated = engine.num_prompt_tokens, engine.num_generated_tokens
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)
        self._history.append((now, engine.num_generated_tokens))
        while len(self._history) > 2 and self._history[1][0] <= now - RATE_WINDOW_S:
            self._history.popleft()
        t0, n0 = self._history[0]
        self.tokens_per_s.set((engine.num_generated_tokens - n0) / (now - t0) if now > t0 else 0.0)
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        routed = engine.expert_tokens - self._last_experts  # (L, E) tokens routed since the last flush
        self._last_experts = engine.expert_tokens.clone()
        steps = max(self._steps, 1)
        self.step_tokens.observe(int(routed[0].sum()) / engine.args.top_k / steps)
        for layer, expert in routed.nonzero().tolist():
            n = int(routed[layer, expert])
            self.expert_tokens.inc(n, tags={"layer": str(layer), "expert": str(expert)})
            self.expert_batch.observe(n / steps, tags={"expert": str(expert)})
        self._steps, self._flushed = 0, now

    def request(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
