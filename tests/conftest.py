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


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + ChatML specials, vocab < 128) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def write_chat_jsonl(path, n: int, seed: int = 0):
    """n chat records of a simple learnable task (reverse a 3-letter word)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdef") for _ in range(3))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"rev {word}"},
                                             {"role": "assistant", "content": word[::-1]}]}) + "\n")
    return path


def randomize_lora_B(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Fill every lora_B (zero at init, so ΔW = 0) with seeded Gaussian values: merge tests need a real ΔW."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_run_dir(tmp_path):
    """A local model dir (tiny Qwen3 + char tokenizer) and train/eval JSONL files, as a user would have them."""
    return make_run_dir(tmp_path)


def make_run_dir(tmp_path, **model_overrides):
    """What :func:`tiny_run_dir` holds, written to ``tmp_path`` (for fixtures of a wider scope, or a model with
    other config values, e.g. ``attention_bias=True``)."""
    # initializer_range 0.2 (not 0.02): with hidden size 64, tiny embeddings would cap the logits near ±1 and no
    # adapter could make a confident prediction, so nothing would visibly learn.
    model = make_tiny_qwen3(vocab_size=128, initializer_range=0.2, **model_overrides)
    tok = make_char_tokenizer()
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    write_chat_jsonl(tmp_path / "train.jsonl", 64, seed=1)
    write_chat_jsonl(tmp_path / "eval.jsonl", 8, seed=2)
    return tmp_path


def _nf4_backend_ok() -> bool:
    from loratune import quant

    try:
        quant.check_backend_available()
        return True
    except RuntimeError:
        return False


needs_backend = pytest.mark.skipif(not _nf4_backend_ok(), reason="bitsandbytes NF4 backend not installed/usable here")
