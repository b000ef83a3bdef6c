"""Shared pieces of the training and inference benchmarks: the synthetic assets, the step schedule, FLOP counts,
the bf16 GEMM peak and peak-RSS reading.

Assets (written once under a cache directory, reused by every process of a run):

* ``model/``: the Qwen3-0.6B architecture from the bundled real ``config.json``, random weights, bf16
  safetensors (compute cost is identical to the pretrained model), plus the tokenizer below;
* the tokenizer: a WordLevel ``tokenizers`` vocabulary of exactly ``vocab_size`` (151,936) entries (ChatML
  specials + words ``w0``, ``w1``, ...; whitespace-split, one token per word) with a ChatML chat template;
* ``train.jsonl``: one-turn chats whose rendered lengths follow a lognormal (median ≈ 200 tokens, σ = 0.7,
  clipped to [32, 1024]), the prompt taking 30-70 % of each example.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "src" / "loratune" / "assets" / "configs" / "qwen3-0.6b" / "config.json"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE_TOKENS = 6  # <|im_start|> user ... <|im_end|> <|im_start|> assistant ... <|im_end|>
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_R, LORA_ALPHA = 8, 16


def make_tokenizer(vocab_size: int):
    """WordLevel tokenizer over ``vocab_size`` entries, ChatML template, eos <|im_end|>, pad <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + ["user", "assistant", "system"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def example_lengths(n: int, seed: int, median: float = 200.0, sigma: float = 0.7, lo: int = 32,
                    hi: int = 1024) -> list[int]:
    """n lognormal lengths (median ``median``, log-σ ``sigma``) clipped to [lo, hi]."""
    rng = random.Random(seed)
    return [min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(n)]


def write_chats(path: Path, lengths: list[int], vocab_size: int, seed: int) -> None:
    """One chat per length: prompt 30-70 % of the words, random word tokens."""
    rng = random.Random(seed)
    first_word = len(SPECIALS) + 3
    with open(path, "w") as f:
        for n in lengths:
            words = n - TEMPLATE_TOKENS
            prompt = max(1, round(words * rng.uniform(0.3, 0.7)))
            text = [f"w{rng.randrange(vocab_size - first_word)}" for _ in range(words)]
            messages = [{"role": "user", "content": " ".join(text[:prompt])},
                        {"role": "assistant", "content": " ".join(text[prompt:])}]
            f.write(json.dumps({"messages": messages}) + "\n")


def prepare(cache: Path, n_examples: int, seed: int = 0) -> Path:
    """Create (once) the model dir with tokenizer and ``train.jsonl`` under ``cache``; returns ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    config = json.loads(CONFIG.read_text())
    model_dir = cache / "model"
    if not (model_dir / "model.safetensors").exists():
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
        cfg.architectures = config["architectures"]
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        tok = make_tokenizer(config["vocab_size"])
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        tmp = cache / "model.tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, model_dir)
    data = cache / f"train-{n_examples}-{seed}.jsonl"
    if not data.exists():
        write_chats(data.with_suffix(".tmp"), example_lengths(n_examples, seed), config["vocab_size"], seed)
        os.replace(data.with_suffix(".tmp"), data)
    return cache


def schedule(lengths: list[int], per_step: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` + 1 optimizer steps (lists of example indices) as transformers' ``group_by_length`` forms them on
    the whole data set: shuffle, cut into mega-batches of 50 steps, sort each by length (longest first), cut into
    steps. Then ``steps`` + 1 of them are drawn at random (so lengths, and padding, are those of a real run), and
    the one with the fewest tokens goes first: it is the warm-up step."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = 50 * per_step
    all_steps = []
    for m in range(0, len(order) - mega + 1, mega):
        group = sorted(order[m: m + mega], key=lambda i: -lengths[i])
        all_steps += [group[s: s + per_step] for s in range(0, mega, per_step)]
    chosen = rng.sample(all_steps, steps + 1)
    first = min(range(len(chosen)), key=lambda k: sum(lengths[i] for i in chosen[k]))
    chosen.insert(0, chosen.pop(first))
    return chosen


# -------------------------------------------------------------------------------------------------- FLOPs
def model_flops(config: dict, seq_lens: list[int], scored: int, lora_r: int = LORA_R) -> float:
    """Training FLOPs the LoRA step needs for examples of ``seq_lens`` with ``scored`` labelled positions.

    Frozen base: forward 2N + input gradients 2N per token (N = decoder matmul parameters); the tied LM head
    4·V·H per scored position only (the head is needed nowhere else); LoRA A/B: 6 FLOPs per parameter per token
    (forward, input and weight gradients); causal attention per example of length l: QKᵀ and P·V forward
    2·2·(l²/2)·heads·head_dim per layer, backward twice that.
    """
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    hd, nq, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    q, kv, o = nq * hd * h, nkv * hd * h, h * nq * hd
    per_layer = q + 2 * kv + o + 3 * h * inter
    lora_per_layer = lora_r * ((h + nq * hd) + 2 * (h + nkv * hd) + (nq * hd + h))
    tokens = sum(seq_lens)
    dense = tokens * (4 * per_layer * layers + 6 * lora_per_layer * layers) + scored * 4 * config["vocab_size"] * h
    attention = 3 * sum(2 * l * l * nq * hd for l in seq_lens) * layers
    return float(dense + attention)


# ------------------------------------------------------------------------------------------- measurements
def gemm_peak(seconds: float = 4.0, n: int = 2048, threads: int | None = None) -> float:
    """bf16 [n×n]·[n×n] matmul throughput in GFLOP/s (median of 1-second-ish windows over ``seconds``)."""
    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < min(0.5, seconds):
            a @ b
            k += 1
        rates.append(2 * n ** 3 * k / (time.perf_counter() - t0) / 1e9)
    rates.sort()
    return rates[len(rates) // 2]


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":  # python bench_setup.py gemm-peak THREADS  → prints GFLOP/s
    import sys

    if sys.argv[1:2] == ["gemm-peak"]:
        print(f"RESULT {gemm_peak(threads=int(sys.argv[2]))}")
