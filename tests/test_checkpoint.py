"""Checkpoint reading: lazy per tensor, sharded or not, with errors that name the file and tensor."""

import json

import pytest
import torch
from hf_reference import build_checkpoint
from safetensors.torch import load_file, save_file

from checkpoint.hf import expert_names
from checkpoint.reader import Checkpoint, CheckpointError
from router import LLM


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_checkpoint(path, max_shard_size="30KB")
    return path


def test_reads_only_the_tensors_asked_for(ckpt_dir):
    ckpt = Checkpoint(ckpt_dir)
    assert ckpt.bytes_loaded == 0
    w1, w2, w3 = ckpt.expert(1, 3)
    a = ckpt.args
    assert w1.shape == (a.hidden_dim, a.dim) and w2.shape == (a.dim, a.hidden_dim)
    assert ckpt.bytes_loaded == 3 * a.hidden_dim * a.dim * 4
    assert torch.equal(w2, load_file(ckpt.weight_map[expert_names(1, 3)[1]])[expert_names(1, 3)[1]])


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid Mixtral config"):
        Checkpoint(tmp_path)


def single_file_checkpoint(tmp_path, edit):
    build_checkpoint(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    name = expert_names(1, 2)[2]
    single_file_checkpoint(tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is missing"):
        LLM(tmp_path)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    single_file_checkpoint(tmp_path, lambda t: t.update({name: t[name][:-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has shape"):
        LLM(tmp_path)


def test_missing_shard_is_named(tmp_path):
    build_checkpoint(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard {shard}, which is missing"):
        Checkpoint(tmp_path)


def test_no_weights_at_all(tmp_path):
    build_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        Checkpoint(tmp_path)
