"""Writing a checkpoint in the Hugging Face layout every reader here (and transformers) loads."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint.args import ModelArgs, parse_dtype
from checkpoint.hf import config_from_args


def save_checkpoint(out: Path, args: ModelArgs, tensors: dict[str, torch.Tensor], dtype: str,
                    router_aux_loss_coef: float = 0.02) -> None:
    """`config.json`, `generation_config.json` and `model.safetensors` (tensors under HF names) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    t = parse_dtype(dtype)
    save_file({k: v.detach().to(t).contiguous() for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    cfg = config_from_args(args, dtype, router_aux_loss_coef)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
