import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


def tiny_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def save_tiny(directory, seed=0, shard="40KB", **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**kw)).eval()
    model.save_pretrained(directory, max_shard_size=shard)
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(directory, fp32 model) of a 2-layer Llama saved as sharded safetensors."""
    d = tmp_path_factory.mktemp("tiny")
    model = save_tiny(d)
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
    return str(d), model


@pytest.fixture()
def cache(tmp_path):
    return str(tmp_path / "cache")
