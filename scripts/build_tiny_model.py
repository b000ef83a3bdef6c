#!/usr/bin/env python
"""Build the tiny pretrained Qwen3 model that ships with loratune (src/loratune/assets/tiny-qwen3/).

What it does, end to end, fully offline and seeded:

1. builds a character-level tokenizer with the `tokenizers` library (printable ASCII, newline and tab,
   256 byte-fallback tokens for anything else, and Qwen's special tokens `<|endoftext|>`,
   `<|im_start|>`, `<|im_end|>`), wrapped as a `PreTrainedTokenizerFast` with a Qwen-style ChatML
   chat template;
2. creates a small `Qwen3ForCausalLM` (hidden 256, 4 layers, 8 query heads / 4 key-value heads,
   head_dim 32, tied embeddings, about 3.2M parameters);
3. pretrains it from scratch on generated text: chat-formatted conversations of about twenty simple
   string / arithmetic / small-talk tasks (copy, upper/lower case, reverse, spell, replace a letter,
   count, add, ...) plus plain English-like sentences, packed into 256-token rows;
4. saves model (bf16 safetensors), generation config and tokenizer with `save_pretrained`, plus a
   `pretrain_report.json` with the training curve summary and greedy exact-match per task.

The model never sees the secret cipher of the default fine-tuning task (scripts/build_default_task.py).

Usage (from the repository root):

    .venv/bin/python scripts/build_tiny_model.py            # full build, ~20 min on 2 CPU cores
    .venv/bin/python scripts/build_tiny_model.py --steps 50 --out /tmp/tq   # smoke test

Determinism: data comes from `random.Random(seed)`, initialisation from `torch.manual_seed(seed)`; the
result is bit-reproducible for a given torch build and thread count (the default is 2 threads).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Sleep rather than spin in OpenMP barriers: on a shared 2-core machine spinning threads slow a run 5x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "loratune" / "assets" / "tiny-qwen3"

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# Qwen-style ChatML. Qwen3's own template adds tool / thinking handling; this keeps the core format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Every printable ASCII character except the whitespace ones, then space, newline, tab.
BASE_CHARS = [c for c in string.printable if c not in string.whitespace] + [" ", "\n", "\t"]
CONFIG_VOCAB_SIZE = 384  # tokenizer has 356 entries; like Qwen, the embedding matrix is padded


def build_tokenizer():
    """Character-level BPE (no merges) with byte fallback, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for ch in BASE_CHARS:
        vocab[ch] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    core.add_special_tokens(SPECIAL_TOKENS)  # ids 353, 354, 355
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=512,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == len(BASE_CHARS) + 256 + len(SPECIAL_TOKENS) <= CONFIG_VOCAB_SIZE
    return tok


def save_tokenizer(tok, out: Path) -> None:
    """save_pretrained, then make tokenizer_config.json loadable by transformers 4.x as well as 5.x
    (5.x writes its own class name `TokenizersBackend` and a list-valued `extra_special_tokens`)."""
    tok.save_pretrained(out)
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def render_chat(messages, add_generation_prompt: bool = False) -> str:
    """The same string the chat template renders (kept in Python for speed during data generation)."""
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        out += f"{IM_START}assistant\n"
    return out


# --------------------------------------------------------------------------------------------------
# Generated pretraining corpus
# --------------------------------------------------------------------------------------------------
NOUNS = """cat dog bird fish horse cow sheep goat mouse rabbit fox wolf bear lion tiger frog duck
owl bee ant tree flower grass leaf river lake sea hill mountain road house door window table chair
bed book pen cup plate spoon box bag ball kite boat car bus train ship plane bike apple bread cake
milk water tea soup rice egg cheese honey sun moon star sky cloud rain snow wind fire stone sand
garden forest field city town village school park shop market farm king queen child friend farmer
teacher doctor baker sailor girl boy man woman family song story letter word game map key clock
lamp coat hat shoe ring gold coin""".split()
ADJS = """big small old new red blue green yellow black white happy sad quick slow tall short warm
cold bright dark soft hard quiet loud kind brave clever calm busy lazy tiny huge sweet fresh young
little round heavy light wild gentle proud""".split()
VERBS_PAST = """saw found liked took made painted watched carried helped visited followed opened
closed cleaned moved wanted needed loved heard called""".split()
VERBS_INTR = """ran walked slept sang jumped laughed smiled waited danced played swam talked
cried rested worked dreamed""".split()
PLACES = """in the garden|near the river|by the lake|on the hill|in the forest|at the market|in the
city|at home|under the tree|on the road|in the park|at school|by the sea|in the field""".replace("\n", " ").split("|")
TIMES = "in the morning|at night|every day|after lunch|before dinner|on sunday|in the winter|in the summer|yesterday|today".split("|")
NAMES = """anna ben carl dora emma finn gina hugo ivan jill kate leo mia nick olga paul rosa sam tom
uma vera will zoe""".split()
WORDS = sorted(set(NOUNS + ADJS + VERBS_PAST + VERBS_INTR + NAMES))


def a_or_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def gen_sentence(rng: random.Random) -> str:
    k = rng.randrange(6)
    n1, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
    adj = rng.choice(ADJS)
    name = rng.choice(NAMES).capitalize()
    if k == 0:
        s = f"the {adj} {n1} {rng.choice(VERBS_INTR)} {rng.choice(PLACES)}"
    elif k == 1:
        s = f"{name} {rng.choice(VERBS_PAST)} {a_or_an(adj)} {adj} {n1} {rng.choice(TIMES)}"
    elif k == 2:
        s = f"the {n1} is {adj}"
    elif k == 3:
        s = f"{name} and {rng.choice(NAMES).capitalize()} {rng.choice(VERBS_INTR)} {rng.choice(PLACES)}"
    elif k == 4:
        s = f"there is {a_or_an(adj)} {adj} {n1} {rng.choice(PLACES)}"
    else:
        s = f"the {n1} {rng.choice(VERBS_PAST)} the {n2}"
    s = s[0].upper() + s[1:]
    return s + rng.choice([".", ".", ".", "!"])


def gen_plain_text(rng: random.Random) -> str:
    """A document of plain text: a short story, a list, the alphabet or counting."""
    k = rng.random()
    if k < 0.7:
        return " ".join(gen_sentence(rng) for _ in range(rng.randint(2, 7)))
    if k < 0.8:
        start = rng.randint(0, 90)
        step = rng.choice([1, 1, 2, 5, 10])
        return ", ".join(str(start + i * step) for i in range(rng.randint(4, 12)))
    if k < 0.9:
        letters = string.ascii_lowercase if rng.random() < 0.5 else string.ascii_uppercase
        i = rng.randint(0, 20)
        return rng.choice([" ", "", ", "]).join(letters[i : i + rng.randint(5, 26 - i)])
    topic = rng.choice(NOUNS)
    items = rng.sample(NOUNS, rng.randint(2, 5))
    return f"List of things:\n" + "\n".join(f"- {a} {rng.choice(ADJS)} {it}" for a, it in zip("abcdefg", items)) + f"\nThe {topic} is {rng.choice(ADJS)}."


def rand_word_string(rng: random.Random, max_words: int = 3) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def rand_letters(rng: random.Random, lo: int = 2, hi: int = 8, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def rand_text(rng: random.Random) -> str:
    """A short string to manipulate: words, random letters, mixed-case or alphanumeric."""
    k = rng.random()
    if k < 0.45:
        return rand_word_string(rng)
    if k < 0.75:
        return rand_letters(rng, 2, 10)
    if k < 0.85:
        return rand_letters(rng, 2, 8, string.ascii_letters)
    if k < 0.95:
        return rand_letters(rng, 2, 8, string.ascii_lowercase + string.digits)
    return rng.choice(gen_sentence(rng).split(" and ")).rstrip(".!")


def _q(s: str, rng: random.Random) -> str:
    return rng.choice([s, f'"{s}"'])


# Each task: rng -> (user, assistant). Several phrasings per task so the model learns instructions,
# not a single surface form.
def t_copy(rng):
    s = rand_text(rng)
    p = rng.choice(["Repeat after me: {}", "Say: {}", "Copy this text: {}", "Please repeat: {}", "Echo: {}", "Write exactly this: {}"])
    return p.format(s), s


def t_upper(rng):
    s = rand_text(rng).lower()
    p = rng.choice(["Write in capital letters: {}", "Uppercase: {}", "Convert to upper case: {}", "Make this uppercase: {}"])
    return p.format(s), s.upper()


def t_lower(rng):
    s = rand_text(rng).upper() if rng.random() < 0.6 else rand_letters(rng, 2, 10, string.ascii_letters)
    p = rng.choice(["Write in small letters: {}", "Lowercase: {}", "Convert to lower case: {}", "Make this lowercase: {}"])
    return p.format(s), s.lower()


def t_reverse(rng):
    s = rand_letters(rng, 2, 7) if rng.random() < 0.6 else rng.choice(WORDS)
    p = rng.choice(["Reverse: {}", "Write backwards: {}", "Reverse the letters of {}"])
    return p.format(s), s[::-1]


def t_spell(rng):
    w = rng.choice(WORDS) if rng.random() < 0.7 else rand_letters(rng, 2, 7)
    if rng.random() < 0.5:
        return f"Spell {w} letter by letter.", "-".join(w)
    return f"Put spaces between the letters: {w}", " ".join(w)


def t_join(rng):
    w = rng.choice(WORDS) if rng.random() < 0.7 else rand_letters(rng, 2, 7)
    return f"Join the letters: {' '.join(w)}", w


def t_double(rng):
    s = rand_text(rng)
    return rng.choice(["Say it twice: {}", "Repeat twice: {}"]).format(s), f"{s} {s}"


def t_double_letters(rng):
    w = rand_letters(rng, 2, 6) if rng.random() < 0.5 else rng.choice(WORDS)
    return f"Double every letter: {w}", "".join(c + c for c in w)


def t_replace(rng):
    s = rand_word_string(rng) if rng.random() < 0.5 else rand_letters(rng, 3, 10)
    a = rng.choice(s.replace(" ", "")) if rng.random() < 0.85 else rng.choice(string.ascii_lowercase)
    b = rng.choice(string.ascii_lowercase.replace(a, "") + "*#")
    return f"Replace every {a} with {b}: {s}", s.replace(a, b)


def t_remove(rng):
    s = rand_word_string(rng) if rng.random() < 0.5 else rand_letters(rng, 3, 10)
    if rng.random() < 0.4:
        return f"Remove the spaces: {s}", s.replace(" ", "")
    a = rng.choice(s.replace(" ", ""))
    return f"Delete every {a} from: {s}", s.replace(a, "")


def t_capitalize(rng):
    s = rand_word_string(rng, 4)
    return rng.choice(["Capitalize each word: {}", "Title case: {}"]).format(s), " ".join(w.capitalize() for w in s.split())


def t_length(rng):
    s = rand_letters(rng, 1, 9) if rng.random() < 0.5 else rng.choice(WORDS)
    return rng.choice(["How many letters are in {}?", "Count the letters: {}", "Length of {}?"]).format(_q(s, rng)), str(len(s))


def t_count_words(rng):
    s = rand_word_string(rng, 6)
    return f"How many words: {s}", str(len(s.split()))


def t_first_last(rng):
    w = rng.choice(WORDS) if rng.random() < 0.6 else rand_letters(rng, 2, 8)
    k = rng.randrange(4)
    if k == 0:
        return f"What is the first letter of {w}?", w[0]
    if k == 1:
        return f"What is the last letter of {w}?", w[-1]
    if k == 2:
        n = rng.randint(1, min(3, len(w)))
        return f"First {n} letters of {w}:", w[:n]
    n = rng.randint(1, min(3, len(w)))
    return f"Last {n} letters of {w}:", w[-n:]


def t_word_pick(rng):
    ws = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
    k = rng.randrange(3)
    if k == 0:
        return f"First word: {' '.join(ws)}", ws[0]
    if k == 1:
        return f"Last word: {' '.join(ws)}", ws[-1]
    return f"Reverse the word order: {' '.join(ws)}", " ".join(ws[::-1])


def t_arith(rng):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.6:
        return rng.choice(["What is {} + {}?", "{} + {} =", "Add {} and {}."]).format(a, b), str(a + b)
    a, b = max(a, b), min(a, b)
    return rng.choice(["What is {} - {}?", "{} - {} ="]).format(a, b), str(a - b)


def t_compare(rng):
    a, b = rng.sample(range(100), 2)
    if rng.random() < 0.5:
        return f"Which is bigger, {a} or {b}?", str(max(a, b))
    return f"Which is smaller, {a} or {b}?", str(min(a, b))


def t_alphabet(rng):
    i = rng.randrange(25)
    L = string.ascii_lowercase
    if rng.random() < 0.5:
        return f"Which letter comes after {L[i]}?", L[i + 1]
    return f"Which letter comes before {L[i + 1]}?", L[i]


def t_qa(rng):
    n = rng.choice(NOUNS)
    adj = rng.choice(ADJS)
    name = rng.choice(NAMES).capitalize()
    k = rng.randrange(3)
    if k == 0:
        return f"The {n} is {adj}. What is the {n} like?", f"The {n} is {adj}."
    if k == 1:
        place = rng.choice(PLACES)
        return f"{name} is {place}. Where is {name}?", f"{name} is {place}."
    return f"Complete the sentence: the {adj} {n}", gen_sentence(rng)


def t_chat(rng):
    k = rng.randrange(6)
    name = rng.choice(NAMES).capitalize()
    if k == 0:
        return rng.choice(["Hello!", "Hi!", "Hey there.", "Good morning!"]), rng.choice(
            ["Hello! How can I help you?", "Hi! What can I do for you?", "Hello! Ask me anything."])
    if k == 1:
        return f"My name is {name}.", f"Nice to meet you, {name}!"
    if k == 2:
        return "Who are you?", "I am a tiny assistant. I can copy, change and count short texts."
    if k == 3:
        return rng.choice(["Thank you!", "Thanks.", "Thanks a lot!"]), rng.choice(["You are welcome!", "Happy to help!"])
    if k == 4:
        return "Tell me a short story.", " ".join(gen_sentence(rng) for _ in range(rng.randint(2, 3)))
    return rng.choice(["Bye!", "Goodbye."]), rng.choice(["Goodbye!", "Bye! Have a nice day."])


TASKS = {
    "copy": (t_copy, 3.0), "upper": (t_upper, 1.5), "lower": (t_lower, 1.0), "reverse": (t_reverse, 1.5),
    "spell": (t_spell, 1.0), "join": (t_join, 0.7), "double": (t_double, 0.7), "double_letters": (t_double_letters, 0.8),
    "replace": (t_replace, 1.5), "remove": (t_remove, 1.0), "capitalize": (t_capitalize, 0.8), "length": (t_length, 0.8),
    "count_words": (t_count_words, 0.5), "first_last": (t_first_last, 1.0), "word_pick": (t_word_pick, 0.8),
    "arith": (t_arith, 1.0), "compare": (t_compare, 0.5), "alphabet": (t_alphabet, 0.6), "qa": (t_qa, 0.8),
    "chat": (t_chat, 0.7),
}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a tiny assistant.", "Answer briefly."]


def gen_conversation(rng: random.Random) -> list[dict]:
    names = list(TASKS)
    weights = [TASKS[n][1] for n in names]
    msgs: list[dict] = []
    if rng.random() < 0.15:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3)):
        user, assistant = TASKS[rng.choices(names, weights)[0]][0](rng)
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs


def gen_document(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return gen_plain_text(rng)
    return render_chat(gen_conversation(rng))


def fast_encoder(tok):
    """Pure-Python equivalent of `tok(text, add_special_tokens=False).input_ids` for generated ASCII
    text (the tokenizer is character-level); checked against the real tokenizer on first use."""
    import re

    table = {ch: tok.convert_tokens_to_ids(ch) for ch in BASE_CHARS}
    specials = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    split = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
    checked = [0]

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for part in split.split(text):
            if part in specials:
                ids.append(specials[part])
            else:
                ids.extend(table[c] for c in part)
        if checked[0] < 200:
            checked[0] += 1
            assert ids == tok(text, add_special_tokens=False)["input_ids"], text
        return ids

    return encode


def batch_stream(tok, rng: random.Random, batch: int, seq_len: int):
    """Yields (input_ids, labels) LongTensors [batch, seq_len]: whole documents joined by
    <|endoftext|>, each row starting at a document boundary; the last document of a row is cut."""
    import torch

    eot = tok.convert_tokens_to_ids(PAD_TOKEN)
    encode = fast_encoder(tok)
    while True:
        rows = []
        for _ in range(batch):
            ids: list[int] = []
            while len(ids) < seq_len + 1:
                ids += encode(gen_document(rng)) + [eot]
            rows.append(ids[: seq_len + 1])
        t = torch.tensor(rows, dtype=torch.long)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def make_config(tok):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=CONFIG_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        initializer_range=0.02,
        attention_bias=False,
        use_cache=True,
        bos_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),
    )


def greedy_generate(model, tok, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 64) -> list[str]:
    """Greedy decoding of a list of already-rendered prompts; returns the generated text up to <|im_end|>."""
    import torch

    eos = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD_TOKEN)]
    pad = tok.convert_tokens_to_ids(PAD_TOKEN)
    outs: list[str] = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        chunk = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            outs.append(tok.decode(row[:cut], skip_special_tokens=False))
    return outs


def evaluate_tasks(model, tok, seed: int = 1234, per_task: int = 40) -> dict[str, float]:
    """Greedy exact-match of the model on fresh samples of every pretraining task."""
    rng = random.Random(seed)
    names, prompts, refs = [], [], []
    for name, (fn, _) in TASKS.items():
        for _ in range(per_task):
            user, assistant = fn(rng)
            names.append(name)
            prompts.append(render_chat([{"role": "user", "content": user}], add_generation_prompt=True))
            refs.append(assistant)
    outs = greedy_generate(model, tok, prompts)
    acc: dict[str, float] = {}
    for name in TASKS:
        hits = [o.strip() == r.strip() for n, o, r in zip(names, outs, refs) if n == name]
        acc[name] = round(sum(hits) / len(hits), 3)
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-per-task", type=int, default=40)
    args = ap.parse_args(argv)

    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tok = build_tokenizer()
    config = make_config(tok)
    model = Qwen3ForCausalLM(config)  # fp32 master weights; bf16 autocast for the matmuls
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[build] Qwen3ForCausalLM with {n_params:,} parameters; tokenizer with {len(tok)} tokens", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    stream = batch_stream(tok, random.Random(args.seed + 1), args.batch, args.seq_len)
    model.train()
    t0 = time.time()
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = next(stream)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            avg = sum(losses[-50:]) / len(losses[-50:])
            curve.append((step + 1, round(avg, 4)))
            el = time.time() - t0
            print(f"[build] step {step + 1}/{args.steps} loss {avg:.4f} lr {lr_at(step):.2e} "
                  f"{el:.0f}s elapsed, eta {el / (step + 1) * (args.steps - step - 1):.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval()

    # Save: bf16 weights keep the asset small; the model loads fine in fp32 (dtype=torch.float32).
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*"):
        if stale.is_file():
            stale.unlink()
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id], pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, do_sample=False, max_new_tokens=64,
    )
    model.to(torch.bfloat16).save_pretrained(args.out)
    save_tokenizer(tok, args.out)

    # Reload exactly as a user would (fp32) and measure what the saved model can do.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(args.out)
    model2 = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    acc = evaluate_tasks(model2, tok2, per_task=args.eval_per_task)
    mean_acc = sum(acc.values()) / len(acc)
    print("[build] greedy exact-match per pretraining task (fp32 reload):", flush=True)
    for k, v in acc.items():
        print(f"    {k:15s} {v:.2f}")
    print(f"[build] mean {mean_acc:.3f}")
    report = {
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "warmup": args.warmup, "weight_decay": args.weight_decay, "threads": args.threads,
        "tokens_seen": args.steps * args.batch * args.seq_len, "parameters": n_params,
        "train_seconds": round(train_s, 1), "final_loss": curve[-1][1], "loss_curve": curve,
        "task_exact_match": acc, "task_exact_match_mean": round(mean_acc, 3),
        "torch": torch.__version__,
    }
    (args.out / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    size = sum(f.stat().st_size for f in args.out.glob("*"))
    print(f"[build] wrote {args.out} ({size / 1e6:.2f} MB) in {train_s:.0f}s of training", flush=True)


if __name__ == "__main__":
    sys.exit(main())
