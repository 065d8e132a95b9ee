"""Settings of the HTTP server and of the router replicas that run it; defaults written here once."""

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    """The OpenAI HTTP API and the router replicas that serve it."""

    served_model_name: str | None = field(default=None, metadata={
        "help": "the model name clients send (default: the checkpoint directory's name)"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1 (default: $RAYMOE_API_KEY; none: open); never "
                "written into a config file"})
    stream_chunks_per_s: float = field(default=200.0, metadata={
        "help": "streamed chunks per second per router, shared by its open streams: under load each chunk "
                "carries several tokens (0: one chunk per engine step, as vLLM)"})
    max_body_bytes: int = field(default=1 << 20, metadata={
        "help": "largest request body in bytes (413 above it, before it is parsed)"})
    max_prompts: int = field(default=64, metadata={"help": "most prompts in one completion request"})
    max_stop_strings: int = field(default=16, metadata={"help": "most stop strings in one request"})
    max_stop_chars: int = field(default=256, metadata={"help": "longest stop string, in characters"})
    max_waiting: int = field(default=1024, metadata={
        "help": "sequences that may wait for a batch slot per router; beyond it requests get 503 + Retry-After"})
    stream_stall_timeout_s: float = field(default=60.0, metadata={
        "help": "abort a stream whose client has read nothing for this long, freeing its batch slot"})
    router_replicas: int = field(default=1, metadata={"help": "router replicas (each runs its own engine)"})
    router_num_cpus: float = field(default=1.0, metadata={"help": "CPUs per router replica"})
    router_threads: int | None = field(default=None, metadata={
        "help": "torch threads per router replica (default: its CPUs, as Ray sets)"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "HTTP host (0.0.0.0 to listen on every interface)", "http": True})
    port: int = field(default=8000, metadata={"help": "HTTP port", "http": True})

    def __post_init__(self):
        if self.router_replicas < 1 or self.router_num_cpus < 0:
            raise ValueError(f"router_replicas must be >= 1 and router_num_cpus >= 0, got {self.router_replicas} "
                             f"and {self.router_num_cpus}")
        limits = ("max_body_bytes", "max_prompts", "max_stop_strings", "max_stop_chars", "max_waiting",
                  "stream_stall_timeout_s")
        if bad := [f"{n}={getattr(self, n)}" for n in limits if getattr(self, n) <= 0]:
            raise ValueError(f"these limits must be > 0: {', '.join(bad)}")
        if self.stream_chunks_per_s < 0:
            raise ValueError(f"stream_chunks_per_s must be >= 0, got {self.stream_chunks_per_s}")
