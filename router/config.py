"""Settings of the inference core, one dataclass per concern, each default written here once.

`raymoe` flags, the Serve config's application args and `LLM(...)` keyword arguments are all derived
from these fields (their `help` metadata becomes the flag's help).
"""

from dataclasses import dataclass, field, fields

from checkpoint.args import DTYPES, parse_dtype

EXPERT_BACKENDS = ("ray", "local")


@dataclass
class EngineConfig:
    """The model and how one router batches it."""

    model: str = field(default="models/tiny-mixtral", metadata={
        "help": "HF checkpoint directory (default: the bundled tiny Mixtral, found relative to the repository)"})
    dtype: str = field(default="float32", metadata={
        "help": "weights and compute dtype", "choices": sorted(DTYPES)})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences batched per router"})
    max_model_len: int | None = field(default=None, metadata={"help": "context limit (default: the model's)"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "tokens per engine step"})
    chunk_size: int | None = field(default=None, metadata={
        "help": "prompt tokens per prefill chunk (default: the step's token budget)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling for requests that give none"})
    ping_pong: bool = field(default=False, metadata={
        "help": "with remote experts, split each step's batch in two so that one half's attention runs while "
                "the other half's expert calls are in flight: for experts on other machines (GPUs); where they "
                "share the router's CPUs there is nothing to overlap and it costs a second call per layer"})

    def __post_init__(self):
        parse_dtype(self.dtype)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "chunk_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")


@dataclass
class ExpertPlaneConfig:
    """Where the experts run: in the router's process, or as Ray Serve deployments reached over gRPC."""

    expert_backend: str = field(default="ray", metadata={
        "help": "ray: expert shards as Serve deployments reached over gRPC; local: in the router process "
                "(LLM(...) defaults to local)", "choices": EXPERT_BACKENDS})
    num_shards: int | None = field(default=None, metadata={
        "help": "expert shards (default: one per expert index, as expert parallelism)"})
    replicas_per_shard: int = field(default=1, metadata={"help": "replicas of every expert shard"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per expert replica"})
    expert_num_cpus: float | None = field(default=None, metadata={
        "help": "CPUs per expert replica (default: 1, fitted down to what the cluster has free; 0.1 with GPUs)"})
    placement: list | None = field(default=None, metadata={
        "help": "shards as lists of [layer, expert] pairs (default: expert-parallel over num_shards)",
        "cli": False})
    max_replicas_per_shard: int | None = field(default=None, metadata={
        "help": "autoscale every shard between replicas_per_shard and this many replicas on the busy fraction "
                "its replicas report (default: a fixed count)"})
    target_busy: float = field(default=0.6, metadata={
        "help": "autoscaling: the busy fraction (time in expert math / wall time) replicas are scaled toward"})
    max_total_replicas: int | None = field(default=None, metadata={
        "help": "autoscaling: replica budget over all shards; the hottest shards get replicas first"})
    upscale_delay_s: float = field(default=1.0, metadata={"help": "autoscaling: how long a need to grow must last"})
    downscale_delay_s: float = field(default=10.0, metadata={
        "help": "autoscaling: how long a need to shrink must last"})
    rebalance_interval_s: float | None = field(default=None, metadata={
        "help": "re-place hot (layer, expert) pairs every this many seconds when the routers' load of that window "
                "calls for it (default: only on `raymoe rebalance`)"})
    redundant_experts: int | None = field(default=None, metadata={
        "help": "rebalancing: copies per layer beyond one of each expert, given to the hottest (default: one per "
                "shard)"})
    min_copies: int = field(default=1, metadata={
        "help": "rebalancing: shards holding every (layer, expert) at least (2: routers send the pairs of a shard "
                "whose replicas are all gone to their other holders, so a shard of one replica may fail)"})
    standby: bool = field(default=True, metadata={
        "help": "rebalancing: give every pair that one replica serves a standby copy on another shard, which routers "
                "use only while the pair's holders are all down (memory, for a replica loss that stops no pair)"})
    max_message_bytes: int = field(default=64 << 20, metadata={
        "help": "largest gRPC message between router and replica (2048 tokens of dim 4096 in float32: 32 MiB)"})
    call_timeout_s: float = field(default=10.0, metadata={"help": "deadline of each router-to-replica call"})
    max_concurrent_rpcs: int | None = field(default=None, metadata={
        "help": "gRPC calls an expert replica serves at once; more get RESOURCE_EXHAUSTED, and routers send them "
                "to another replica (default: 256)"})
    data_plane_tls_cert: str | None = field(default=None, metadata={
        "help": "expert replicas serve gRPC over TLS with this certificate chain (PEM path, mounted on every "
                "node; default: plaintext, the data-plane token still required)"})
    data_plane_tls_key: str | None = field(default=None, metadata={
        "help": "the private key of --data-plane-tls-cert (PEM path)"})
    data_plane_tls_ca: str | None = field(default=None, metadata={
        "help": "routers verify replicas' certificates against this CA certificate (PEM path; default: the "
                "system's roots)"})
    data_plane_tls_server_name: str | None = field(default=None, metadata={
        "help": "the name replicas' certificate is issued for (default: the replica's IP address)"})
    paced_expert_ms: float | None = field(default=None, metadata={
        "help": "experiments: each replica stands for a device of its own, whose every run of expert math lasts "
                "at least this per expert it touches plus --paced-row-ms per (token, expert) row (for machines "
                "whose replicas share cores; default: real time only)"})
    paced_row_ms: float | None = field(default=None, metadata={
        "help": "experiments: the modelled time of one (token, expert) row (see --paced-expert-ms)"})
    locality_grouping: bool = field(default=True, metadata={
        "help": "routers send each (token, expert) to the replica of its shard that takes that expert's tokens "
                "(rendezvous hashing of (layer, expert), bounded loads), so a replica's call holds few experts and "
                "their matmuls more rows; off: rows spread by row number (the locality-blind baseline)"})

    def __post_init__(self):
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ValueError(f"expert_backend must be one of {EXPERT_BACKENDS}, got {self.expert_backend!r}")
        if self.replicas_per_shard < 1:
            raise ValueError(f"replicas_per_shard must be >= 1, got {self.replicas_per_shard}")
        if self.max_replicas_per_shard is not None and self.max_replicas_per_shard < self.replicas_per_shard:
            raise ValueError(f"max_replicas_per_shard ({self.max_replicas_per_shard}) is below replicas_per_shard "
                             f"({self.replicas_per_shard})")
        if not 0 < self.target_busy <= 1:
            raise ValueError(f"target_busy must be in (0, 1], got {self.target_busy}")
        if self.rebalance_interval_s is not None and self.rebalance_interval_s <= 0:
            raise ValueError(f"rebalance_interval_s must be > 0, got {self.rebalance_interval_s}")
        if self.redundant_experts is not None and self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")
        if self.min_copies < 1:
            raise ValueError(f"min_copies must be >= 1, got {self.min_copies}")
        for name in ("paced_expert_ms", "paced_row_ms"):
            if (getattr(self, name) or 0.0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if (self.data_plane_tls_cert is None) != (self.data_plane_tls_key is None):
            raise ValueError("data_plane_tls_cert and data_plane_tls_key go together")
        if self.data_plane_tls_cert is None and (self.data_plane_tls_ca or self.data_plane_tls_server_name):
            raise ValueError("data_plane_tls_ca and data_plane_tls_server_name need data_plane_tls_cert")
        if self.num_gpus < 0 or (self.expert_num_cpus is not None and self.expert_num_cpus <= 0):
            raise ValueError(f"num_gpus must be >= 0 and expert_num_cpus > 0, got {self.num_gpus} and "
                             f"{self.expert_num_cpus}")


    @property
    def autoscaling(self) -> bool:
        return self.max_replicas_per_shard is not None and self.max_replicas_per_shard > self.replicas_per_shard


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def split_settings(options: dict, *classes) -> list[dict]:
    """Spread flat keyword settings over the dataclasses that own them; unknown names are an error."""
    out = [{k: v for k, v in options.items() if k in field_names(c)} for c in classes]
    unknown = sorted(set(options) - set().union(*(field_names(c) for c in classes)))
    if unknown:
        known = sorted(set().union(*(field_names(c) for c in classes)))
        raise TypeError(f"unknown settings {unknown}; known: {known}")
    return out
