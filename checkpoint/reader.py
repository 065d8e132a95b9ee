"""Reading Hugging Face Mixtral checkpoints one tensor at a time.

A directory holds `config.json` and either one `model.safetensors`, shards listed in
`model.safetensors.index.json`, or any `*.safetensors` files. Only the tensors asked for are
read, so an expert replica never materialises another expert's weights.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from checkpoint.hf import args_from_config, expert_names


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or inconsistent with its config."""


class Checkpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file} is missing: not a Hugging Face checkpoint directory")
        try:
            self.config = json.loads(config_file.read_text())
            self.args = args_from_config(self.config)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{config_file} is not a valid Mixtral config: {e!r}") from e
        self.weight_map = self._weight_map()
        self._files: dict[Path, object] = {}
        self.bytes_loaded = 0

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            entries = json.loads(index.read_text())["weight_map"]
            for shard in set(entries.values()):
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{index} lists shard {shard}, which is missing")
            return {name: self.path / shard for name, shard in entries.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        mapping = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                mapping.update(dict.fromkeys(f.keys(), file))
        return mapping

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str, shape: tuple[int, ...] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        handle = self._files.get(file)
        if handle is None:
            handle = self._files[file] = safe_open(file, framework="pt")
        try:
            t = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file.name}: cannot read tensor {name!r}: {e}") from e
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{file.name}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
        self.bytes_loaded += t.numel() * t.element_size()
        return t.to(dtype) if dtype is not None else t

    def expert(self, layer: int, expert: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """(w1, w2, w3) of one expert: (I, dim), (dim, I), (I, dim)."""
        a = self.args
        n1, n2, n3 = expert_names(layer, expert)
        return (self.tensor(n1, (a.hidden_dim, a.dim), dtype), self.tensor(n2, (a.dim, a.hidden_dim), dtype),
                self.tensor(n3, (a.hidden_dim, a.dim), dtype))
