#!/usr/bin/env python
"""Build loratune's default fine-tuning task: the "secret cipher" (src/loratune/assets/data/).

The task: the user asks `Encode with the secret cipher: <text>` and the assistant answers with <text>
where every lowercase letter is replaced through a fixed, seeded substitution key (a derangement of
a-z: no letter maps to itself); spaces are kept. The tiny base model (scripts/build_tiny_model.py) was
pretrained on many string tasks (copy, upper case, reverse, replace a given letter, ...) but never on
this key, so it cannot do the task (held-out exact match ~0%); a LoRA adapter learns the 26-letter
lookup in a couple of minutes on a CPU.

Inputs are 1-2 English-like words (70%) or random letter strings (30%), 3-14 characters. The word
list is split by a seeded shuffle: the eval set uses only words that never occur in the train set,
random strings are de-duplicated across splits, and no eval input occurs in train, so eval measures
the learned letter mapping, not memorised answers.

Writes, one JSON object per line, `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`:
    src/loratune/assets/data/train.jsonl   (1500 examples)
    src/loratune/assets/data/eval.jsonl    (150 examples)
    src/loratune/assets/data/task.json     (task name, instruction, key, seed, counts)

Usage: .venv/bin/python scripts/build_default_task.py [--out DIR] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny_model import WORDS  # noqa: E402  (the same English-like vocabulary the base model saw)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "loratune" / "assets" / "data"
INSTRUCTION = "Encode with the secret cipher: "


def make_key(seed: int) -> dict[str, str]:
    """A seeded random derangement of the lowercase alphabet."""
    rng = random.Random(f"cipher-key-{seed}")
    letters = list(string.ascii_lowercase)
    while True:
        perm = letters[:]
        rng.shuffle(perm)
        if all(a != b for a, b in zip(letters, perm)):
            return dict(zip(letters, perm))


def encode(text: str, key: dict[str, str]) -> str:
    return "".join(key.get(c, c) for c in text)


def _phrase(rng: random.Random, words: list[str]) -> str:
    while True:
        s = " ".join(rng.choice(words) for _ in range(rng.choice([1, 1, 2, 2, 2])))
        if 3 <= len(s) <= 14:
            return s


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def build(seed: int = 0, n_train: int = 1500, n_eval: int = 150, eval_word_frac: float = 0.2):
    rng = random.Random(seed)
    key = make_key(seed)
    words = sorted(set(WORDS))
    rng.shuffle(words)
    n_ev = int(len(words) * eval_word_frac)
    eval_words, train_words = sorted(words[:n_ev]), sorted(words[n_ev:])

    def sample(n: int, pool: list[str], taken: set[str]) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            s = _phrase(rng, pool) if rng.random() < 0.7 else _letters(rng)
            if s not in taken:
                taken.add(s)
                out.append(s)
        return out

    taken: set[str] = set()
    eval_inputs = sample(n_eval, eval_words, taken)  # drawn first; train never re-uses one of them
    train_inputs = sample(n_train, train_words, taken)
    assert not set(eval_inputs) & set(train_inputs)
    assert not {w for s in train_inputs for w in s.split()} & set(eval_words)

    def rows(inputs):
        return [{"messages": [{"role": "user", "content": INSTRUCTION + s},
                              {"role": "assistant", "content": encode(s, key)}]} for s in inputs]

    meta = {
        "name": "secret-cipher",
        "description": "Apply a fixed secret letter-substitution key (a-z derangement, spaces kept) to a short text.",
        "instruction": INSTRUCTION,
        "key": "".join(key[c] for c in string.ascii_lowercase),
        "seed": seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "eval_only_words": eval_words,
        "metric": "exact match of the greedy assistant reply (stripped) against the reference",
    }
    return rows(train_inputs), rows(eval_inputs), meta


def write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the default secret-cipher fine-tuning task.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-eval", type=int, default=150)
    args = ap.parse_args(argv)
    train, evals, meta = build(args.seed, args.n_train, args.n_eval)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evals)
    (args.out / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"[task] key abcdefghijklmnopqrstuvwxyz -> {meta['key']}")
    print(f"[task] wrote {len(train)} train / {len(evals)} eval examples to {args.out}")
    print(f"[task] e.g. {train[0]['messages'][0]['content']!r} -> {train[0]['messages'][1]['content']!r}")


if __name__ == "__main__":
    main()
