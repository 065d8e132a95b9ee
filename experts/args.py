from dataclasses import dataclass


@dataclass
class ModelArgs:
    """The shape of a Mixtral-style model, read from a Hugging Face `config.json`."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # intermediate size of one expert
    n_experts: int
    top_k: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        rope = cfg.get("rope_parameters") or {}
        n_heads = cfg["num_attention_heads"]
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            hidden_dim=cfg["intermediate_size"],
            n_experts=cfg["num_local_experts"],
            top_k=cfg["num_experts_per_tok"],
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 1e6)),
            sliding_window=cfg.get("sliding_window"),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.eos_token_id
        if eos is None:
            return set()
        return {eos} if isinstance(eos, int) else set(eos)
