"""Generation and exact-match evaluation with a base model plus adapters (or a merged model).

Prompts are rendered the way training rendered them (see :mod:`loratune.data`): chat records through the
tokenizer's chat template with the generation prompt appended, prompt/completion and Alpaca records as a one-turn
chat when the tokenizer has a template, else as plain text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, DataError, detect_format

Prompt = list[dict[str, str]] | str  # a chat (list of messages) or plain text


def prompt_and_reference(record: Mapping[str, Any], chat: bool) -> tuple[Prompt, str | None]:
    """Split a training record into what the model is shown and the answer it should give.

    Chat: all messages before the last assistant turn, and that turn's content. Prompt/completion and Alpaca: the
    prompt (as a user message when ``chat``) and the completion/output. Plain text has no reference (None).
    """
    fmt = detect_format(record)
    if fmt == "chat":
        messages = list(record["messages"])
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            return messages, None
        return messages[:last], messages[last].get("content")
    if fmt == "prompt_completion":
        prompt, ref = record["prompt"], record["completion"]
        return ([{"role": "user", "content": prompt}] if chat else prompt), ref
    if fmt == "alpaca":
        instruction, inp, ref = record["instruction"], record.get("input") or "", record["output"]
        if chat:
            return [{"role": "user", "content": instruction if not inp else f"{instruction}\n\n{inp}"}], ref
        template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=instruction, input=inp), ref
    return record["text"], None


def render(tokenizer: Any, prompt: Prompt) -> str:
    """The text the model continues: a chat goes through the chat template with the assistant prefix appended."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a chat prompt needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int = 64,
             batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Complete each prompt; greedy when ``temperature == 0``. Returns the new text only, special tokens removed.

    Prompts are left-padded into batches of ``batch_size`` and decoded with ``model.generate`` (so LoRA layers,
    merged or not, take part as in training).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    outputs: list[str] = []
    # Sampling draws from the global RNG: fork it, so generating never shifts a training run's random stream.
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            for start in range(0, len(prompts), batch_size):
                texts = [render(tokenizer, p) for p in prompts[start:start + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **sampling)  # [b, prompt + new]
                new = out[:, enc["input_ids"].shape[1]:]
                outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


@dataclass
class ExactMatch:
    """Exact-match accuracy of generated answers against references (both stripped of surrounding space)."""

    correct: int
    total: int
    outputs: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{100 * self.accuracy:.1f}% ({self.correct}/{self.total})"


def exact_match(model: nn.Module, tokenizer: Any, records: Iterable[Mapping[str, Any]], max_new_tokens: int = 64,
                batch_size: int = 16) -> ExactMatch:
    """Generate greedily for every record that has a reference answer and count exact matches."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts, refs = [], []
    for rec in records:
        try:
            prompt, ref = prompt_and_reference(rec, chat)
        except (DataError, KeyError, TypeError):
            continue
        if ref is not None:
            prompts.append(prompt)
            refs.append(ref.strip())
    if not prompts:
        raise ValueError("no record with a reference answer (chat with an assistant turn, prompt/completion or Alpaca)")
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return ExactMatch(sum(o == r for o, r in zip(outs, refs)), len(refs), outs, refs)
