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
        if self.stream_chunks_per_s < 0:
            raise ValueError(f"stream_chunks_per_s must be >= 0, got {self.stream_chunks_per_s}")
