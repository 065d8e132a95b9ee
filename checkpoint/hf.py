"""Hugging Face's Mixtral layout, spelled once: config keys <-> ModelArgs, and every tensor name.

Readers (the router's dense model, the expert replicas) and the trainer's writer all go through here.
"""

from checkpoint.args import ModelArgs

Shape = tuple[int, ...]


def args_from_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a `config.json` mapping (KeyError/TypeError when it is not a Mixtral config)."""
    rope = cfg.get("rope_parameters") or {}
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
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


def config_from_args(a: ModelArgs, dtype: str, router_aux_loss_coef: float = 0.02) -> dict:
    """The `config.json` transformers' MixtralForCausalLM loads for these args."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": a.vocab_size,
        "hidden_size": a.dim,
        "intermediate_size": a.hidden_dim,
        "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": a.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": a.norm_eps,
        "use_cache": True,
        "rope_theta": a.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "sliding_window": a.sliding_window,
        "attention_dropout": 0.0,
        "num_experts_per_tok": a.top_k,
        "num_local_experts": a.n_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": a.tie_word_embeddings,
        "bos_token_id": a.bos_token_id,
        "eos_token_id": a.eos_token_id,
        "pad_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """HF names of one expert's w1 (I, dim), w2 (dim, I), w3 (I, dim)."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return f"{p}.w1.weight", f"{p}.w2.weight", f"{p}.w3.weight"


def dense_names(a: ModelArgs) -> dict[str, tuple[str, Shape]]:
    """Every non-expert tensor: our module name (RouterModel's state dict) -> (HF name, shape).

    With tied embeddings the LM head reads the embedding matrix.
    """
    kv, q = a.n_kv_heads * a.head_dim, a.n_heads * a.head_dim
    names = {
        "tok_embeddings.weight": ("model.embed_tokens.weight", (a.vocab_size, a.dim)),
        "norm.weight": ("model.norm.weight", (a.dim,)),
        "output.weight": ("model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight",
                          (a.vocab_size, a.dim)),
    }
    for i in range(a.n_layers):
        p = f"model.layers.{i}"
        names |= {
            f"layers.{i}.attention_norm.weight": (f"{p}.input_layernorm.weight", (a.dim,)),
            f"layers.{i}.ffn_norm.weight": (f"{p}.post_attention_layernorm.weight", (a.dim,)),
            f"layers.{i}.attention.wq.weight": (f"{p}.self_attn.q_proj.weight", (q, a.dim)),
            f"layers.{i}.attention.wk.weight": (f"{p}.self_attn.k_proj.weight", (kv, a.dim)),
            f"layers.{i}.attention.wv.weight": (f"{p}.self_attn.v_proj.weight", (kv, a.dim)),
            f"layers.{i}.attention.wo.weight": (f"{p}.self_attn.o_proj.weight", (a.dim, q)),
            f"layers.{i}.gate.weight": (f"{p}.block_sparse_moe.gate.weight", (a.n_experts, a.dim)),
        }
    return names
