"""Shared fixtures: tiny real transformers models (random weights) built on the fly.

Nothing here downloads anything: configs are written inline and weights are random,
which exercises exactly the same code paths as a pretrained checkpoint.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A 2-layer Qwen3ForCausalLM with GQA (4 query heads, 2 kv heads), about 60k parameters."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kw)).to(dtype)
    model.eval()
    return model


def make_tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer GPT-2 whose attention/MLP projections are transformers' Conv1D (weight stored in×out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)).to(dtype)
    model.eval()
    return model


@pytest.fixture
def tiny_qwen3():
    return make_tiny_qwen3()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture
def tiny_qwen3_dir(tmp_path):
    """A local model directory (config.json + model.safetensors), as from_pretrained reads it."""
    model = make_tiny_qwen3()
    path = tmp_path / "tiny-qwen3"
    model.save_pretrained(path)
    return path
