"""Data loading, label masking, errors, splitting, samplers and collators, with real tiny tokenizers.

The tokenizers are byte-level BPEs trained here in milliseconds with the `tokenizers` library and wrapped in
`transformers.PreTrainedTokenizerFast` (ChatML template, `<|im_end|>` as eos), so every code path is the real
one; nothing is downloaded.
"""
from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from loratune import data as data_mod
from loratune.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataError,
    ExampleEncoder,
    LengthGroupedBatchSampler,
    PackedBatchSampler,
    PackingCollator,
    PaddingCollator,
    TokenizedDataset,
    detect_format,
    load_examples,
    pad_token_id_for,
    split_indices,
    train_eval_split,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "Hello world, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. Say hi to the user.",
    "user assistant system tool instruction input output response",
    "Below is an instruction that describes a task. Write a response.",
]


def _bpe(special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="module")
def plain_tok():
    """No chat template; eos <|endoftext|>; no pad token."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bos_tok():
    """Llama-style: the tokenizer itself puts <s> in front of every encoding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels built segment by segment: (text, trained?)."""
    input_ids, labels = [], []
    for text, trained in segments:
        part = ids(tok, text)
        input_ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    labels[0] = IGNORE_INDEX
    return input_ids, labels


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


def check(example, want_ids, want_labels):
    assert example.input_ids.tolist() == want_ids
    assert example.labels.tolist() == want_labels


# ----------------------------------------------------------------------------------------------- formats & masking


def test_chat_single_turn_trains_only_assistant_and_end_token(chat_tok):
    ex = ExampleEncoder(chat_tok).encode({"messages": [{"role": "user", "content": "Hello"},
                                                       {"role": "assistant", "content": "world"}]})
    want = expected(chat_tok, [
        ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", False),
        ("world<|im_end|>", True),
        ("\n", False),
    ])
    check(ex, *want)
    trained = [t for t in ex.labels.tolist() if t != IGNORE_INDEX]
    assert chat_tok.decode(trained) == "world<|im_end|>"
    assert trained[-1] == chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.format == "chat" and ex.num_trainable == len(trained)


def test_chat_multi_turn_with_system_and_tool_trains_every_assistant_turn(chat_tok):
    messages = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "I am fine."},
        {"role": "tool", "content": "fox=quick"},
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi, thank you"},
    ]
    ex = ExampleEncoder(chat_tok).encode({"messages": messages})
    want = expected(chat_tok, [
        ("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("I am fine.<|im_end|>", True),
        ("\n<|im_start|>tool\nfox=quick<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hi, thank you<|im_end|>", True),
        ("\n", False),
    ])
    check(ex, *want)
    # The full token sequence is the tokenization of the rendered conversation (what inference sees).
    assert ex.input_ids.tolist() == ids(chat_tok, chat_tok.apply_chat_template(messages, tokenize=False))


def test_trailing_user_turn_is_context_only(chat_tok):
    ex = ExampleEncoder(chat_tok).encode({"messages": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"}]})
    assert chat_tok.decode([t for t in ex.labels.tolist() if t != IGNORE_INDEX]) == "hi<|im_end|>"


def test_prompt_completion_with_template_is_a_user_assistant_chat(chat_tok):
    enc = ExampleEncoder(chat_tok)
    pc = enc.encode({"prompt": "Say hi", "completion": "hi"})
    chat = enc.encode({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]})
    assert pc.format == "prompt_completion"
    check(pc, chat.input_ids.tolist(), chat.labels.tolist())


def test_prompt_completion_plain_is_concatenation_plus_eos(plain_tok):
    ex = ExampleEncoder(plain_tok).encode({"prompt": "Say hi to the user: ", "completion": "Hello world"})
    want_ids, want_labels = expected(plain_tok, [("Say hi to the user: ", False), ("Hello world", True)])
    eos = plain_tok.eos_token_id
    check(ex, want_ids + [eos], want_labels + [eos])


def test_alpaca_plain_uses_documented_prompt(plain_tok):
    enc = ExampleEncoder(plain_tok)
    eos = plain_tok.eos_token_id
    with_input = enc.encode({"instruction": "Say hi", "input": "to the fox", "output": "hi fox"})
    prompt = ALPACA_PROMPT.format(instruction="Say hi", input="to the fox")
    assert prompt.endswith("### Input:\nto the fox\n\n### Response:\n")
    want_ids, want_labels = expected(plain_tok, [(prompt, False), ("hi fox", True)])
    check(with_input, want_ids + [eos], want_labels + [eos])
    for record in ({"instruction": "Say hi", "output": "hi"}, {"instruction": "Say hi", "input": "", "output": "hi"},
                   {"instruction": "Say hi", "input": None, "output": "hi"}):
        ex = enc.encode(record)
        want_ids, want_labels = expected(plain_tok, [(ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi"), False),
                                                     ("hi", True)])
        check(ex, want_ids + [eos], want_labels + [eos])
        assert ex.format == "alpaca"


def test_alpaca_with_template_puts_input_in_user_message(chat_tok):
    enc = ExampleEncoder(chat_tok)
    got = enc.encode({"instruction": "Say hi", "input": "to the fox", "output": "hi fox"})
    ref = enc.encode({"messages": [{"role": "user", "content": "Say hi\n\nto the fox"},
                                   {"role": "assistant", "content": "hi fox"}]})
    check(got, ref.input_ids.tolist(), ref.labels.tolist())


def test_pairs_as_chat_false_forces_plain_rendering(chat_tok):
    ex = ExampleEncoder(chat_tok, pairs_as_chat=False).encode({"prompt": "Say hi ", "completion": "hi"})
    assert chat_tok.decode(ex.input_ids.tolist()) == "Say hi hi<|im_end|>"


def test_text_trains_all_tokens_but_the_first(plain_tok):
    ex = ExampleEncoder(plain_tok).encode({"text": "The quick brown fox"})
    toks = ids(plain_tok, "The quick brown fox") + [plain_tok.eos_token_id]
    check(ex, toks, [IGNORE_INDEX] + toks[1:])
    assert ex.format == "text" and ex.num_trainable == len(toks) - 1


def test_bos_added_for_plain_but_not_for_templates(bos_tok):
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    ex = ExampleEncoder(bos_tok).encode({"text": "hello world"})
    toks = ids(bos_tok, "hello world")
    check(ex, [bos] + toks + [eos], [IGNORE_INDEX] + toks + [eos])
    ex = ExampleEncoder(bos_tok, chat_template=CHATML).encode({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert ex.input_ids[0].item() != bos
    # No special token in this template's assistant turn ("hello<|im_end|>" is plain text for this tokenizer),
    # so the whole turn as the template writes it is trained.
    assert bos_tok.decode([t for t in ex.labels.tolist() if t != IGNORE_INDEX]) == "hello<|im_end|>\n"


def test_train_on_all(chat_tok):
    ex = ExampleEncoder(chat_tok, train_on_all=True).encode({"messages": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"}]})
    toks = ex.input_ids.tolist()
    assert ex.labels.tolist() == [IGNORE_INDEX] + toks[1:]


def test_incremental_tokenization_fallback_agrees_with_offsets(chat_tok):
    record = {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": "world"}, {"role": "user", "content": "Say hi"},
                           {"role": "assistant", "content": "hi, how are you?"}]}
    fast = ExampleEncoder(chat_tok)
    slow = ExampleEncoder(chat_tok)
    slow.has_offsets = False  # the path taken for tokenizers without offset mappings
    assert fast.has_offsets
    a, b = fast.encode(record), slow.encode(record)
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_template_that_rewrites_earlier_turns_is_rejected(chat_tok):
    # Renders a turn count at the top: every prefix differs from the full conversation.
    bad = "{{ messages|length }} turns\n" + CHATML
    enc = ExampleEncoder(chat_tok, chat_template=bad)
    with pytest.raises(DataError, match="not prefix-stable"):
        enc.encode({"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"}]})
    # ...but train_on_all needs no prefixes.
    ExampleEncoder(chat_tok, chat_template=bad, train_on_all=True).encode(
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"}]})


def test_detect_format():
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"prompt": "a", "completion": "b", "text": "c"}) == "prompt_completion"
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"text": "a", "meta": 1}) == "text"
    with pytest.raises(DataError, match="unrecognised record"):
        detect_format({"question": "a"})


# ----------------------------------------------------------------------------------------------- loading, report, errors


def test_load_jsonl_all_formats_and_report(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"}]},
        "",  # blank lines are ignored
        {"prompt": "Say hi", "completion": "hi"},
        {"instruction": "Say hi", "output": "hi"},
        {"text": "The quick brown fox"},
    ])
    ds = load_examples(path, chat_tok, max_seq_len=64)
    assert isinstance(ds, TokenizedDataset) and len(ds) == 4
    assert [ex.source for ex in ds] == [f"{path}:1", f"{path}:3", f"{path}:4", f"{path}:5"]
    rep = ds.report
    assert rep.formats == {"chat": 1, "prompt_completion": 1, "alpaca": 1, "text": 1}
    assert rep.examples == 4 and rep.truncated == 0 and rep.skipped == 0
    assert rep.tokens == sum(len(ex) for ex in ds) == sum(ds.lengths)
    assert rep.trainable_tokens == sum(int((ex.labels != IGNORE_INDEX).sum()) for ex in ds)
    assert all(ex.labels[0].item() == IGNORE_INDEX for ex in ds)
    assert "4 examples" in rep.summary()


def test_truncation_drops_tail_and_is_counted(tmp_path, chat_tok):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 6
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "hi"}]},
        {"text": long_answer},
    ])
    full = load_examples(path, chat_tok)
    limit = 24
    ds = load_examples(path, chat_tok, max_seq_len=limit)
    assert ds.report.truncated == 2 and ds.report.max_seq_len == limit
    assert [ex.truncated for ex in ds] == [True, False, True]
    for short, long in zip(ds, full):
        assert len(short) == min(limit, len(long))
        assert short.input_ids.tolist() == long.input_ids[:limit].tolist()  # the tail is what is dropped
        assert short.labels.tolist() == long.labels[:limit].tolist()
    assert "2 truncated" in ds.report.summary()


def test_truncation_leaving_no_trainable_token_is_an_error(tmp_path, chat_tok):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Say hi", "completion": "hi"},
        {"prompt": long_prompt, "completion": "hi"},
    ])
    with pytest.raises(DataError) as err:
        load_examples(path, chat_tok, max_seq_len=16)
    assert str(err.value).startswith(f"{path}:2: no trainable tokens after truncation to max_seq_len=16")
    ds = load_examples(path, chat_tok, max_seq_len=16, skip_bad=True)
    assert len(ds) == 1 and ds.report.skipped == 1


BAD_LINES = [
    ('{"prompt": "a", "completion": "b"', "malformed JSON"),
    ({"prompt": "Say hi"}, "missing field 'completion'"),
    ({"prompt": 3, "completion": "b"}, "field 'prompt' must be a string, got number"),
    ({"instruction": "Say hi", "input": ["x"], "output": "hi"}, "field 'input' must be a string, got array"),
    ({"text": ""}, "field 'text' is empty"),
    ({"messages": "hi"}, "field 'messages' must be a list"),
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "unknown role 'bot' in messages[1]"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "field 'messages[0].content' must be a string, got number"),
    ({"messages": [{"content": "hi"}]}, "missing field 'messages[0].role'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "missing field 'messages[1].content'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "field 'messages[1].content' must be a string, got null"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "no trainable tokens: the conversation has no assistant message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "conversation starts with an assistant message"),
    ({"question": "?", "answer": "!"}, "unrecognised record"),
    ([1, 2], "expected a JSON object, got array"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES, ids=[p.split()[0] + str(i) for i, (_, p) in enumerate(BAD_LINES)])
def test_bad_record_names_file_line_and_problem(tmp_path, chat_tok, line, problem):
    good = {"prompt": "Say hi", "completion": "hi"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as err:
        load_examples(path, chat_tok)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert msg.startswith(f"{path}:3: ") and problem in msg, msg
    assert "\n" not in msg
    assert (err.value.path, err.value.line, err.value.where) == (str(path), 3, f"{path}:3")
    assert msg == f"{path}:3: {err.value.problem}"


def test_non_utf8_line(tmp_path, chat_tok):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"text": "hello"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        load_examples(path, chat_tok)
    assert len(load_examples(path, chat_tok, skip_bad=True)) == 1


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, chat_tok, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_examples(path, chat_tok, skip_bad=True)  # not skippable: there is nothing to train on
    assert str(err.value) == f"{path}: empty file: no JSON records"


def test_missing_file_and_no_datasets(tmp_path, chat_tok, monkeypatch):
    monkeypatch.setattr(data_mod, "_datasets_available", lambda: False)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", chat_tok)
    with pytest.raises(DataError, match="needs the optional 'datasets' package"):
        load_examples(tmp_path, chat_tok)  # a directory


def test_chat_without_template_is_an_error(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r":1: chat 'messages' need a chat template"):
        load_examples(path, plain_tok)


def test_template_exception_is_a_data_error(chat_tok):
    raising = "{% if messages|length > 1 %}{{ raise_exception('Roles must alternate') }}{% endif %}" + CHATML
    with pytest.raises(DataError, match="chat template failed: Roles must alternate"):
        ExampleEncoder(chat_tok, chat_template=raising).encode({"messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


def test_skip_bad_counts_and_reports_reasons(tmp_path, chat_tok, caplog):
    good = {"prompt": "Say hi", "completion": "hi"}
    lines = [good, "{oops", {"prompt": 1, "completion": "x"}, good, {"foo": 1}, {"text": ""}, {"messages": 3},
             {"prompt": "a"}, good]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    ds = load_examples(path, chat_tok, skip_bad=True, max_skip_reasons=3)
    assert len(ds) == 3 and [ex.source for ex in ds] == [f"{path}:1", f"{path}:4", f"{path}:9"]
    rep = ds.report
    assert rep.skipped == 6 and rep.examples == 3
    assert len(rep.skip_reasons) == 3
    assert rep.skip_reasons[0].startswith(f"{path}:2: malformed JSON")
    assert rep.skip_reasons[1].startswith(f"{path}:3: field 'prompt' must be a string")
    assert rep.skip_reasons[2].startswith(f"{path}:5: unrecognised record")
    assert "6 skipped" in rep.summary()
    assert any("skipped 6 bad records" in r.getMessage() for r in caplog.records)


def test_skip_bad_with_nothing_left_is_an_error(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "allbad.jsonl", ["{", {"x": 1}])
    with pytest.raises(DataError, match=r"no usable examples \(2 bad records skipped; first: .*:1: malformed JSON"):
        load_examples(path, chat_tok, skip_bad=True)


def test_records_in_memory(chat_tok):
    ds = load_examples([{"text": "hello"}, {"text": "world"}], chat_tok)
    assert [ex.source for ex in ds] == ["<records>:1", "<records>:2"]
    with pytest.raises(DataError, match=r"^<records>:2: missing field 'completion'"):
        load_examples([{"text": "hello"}, {"prompt": "x"}], chat_tok)


def test_datasets_sources_when_the_package_is_importable(tmp_path, chat_tok, monkeypatch):
    """`datasets` is optional and not installed here: a minimal stand-in module exercises the dispatch."""
    calls = []

    def load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return [{"prompt": "Say hi", "completion": "hi"}, {"prompt": "Say hi"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = load_examples("org/some-dataset", chat_tok, split="validation", skip_bad=True)
    assert calls == [("org/some-dataset", "validation", {})]
    assert len(ds) == 1 and ds[0].source == "org/some-dataset[validation] row 0"
    assert ds.report.skip_reasons == ["org/some-dataset[validation] row 1: missing field 'completion'"]
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"")
    load_examples(parquet, chat_tok, skip_bad=True)
    assert calls[-1] == ("parquet", "train", {"data_files": str(parquet)})
    # JSONL files never go through datasets.
    load_examples(write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}]), chat_tok)
    assert len(calls) == 2


def test_pad_token_id_for(chat_tok, plain_tok):
    assert pad_token_id_for(chat_tok) == chat_tok.pad_token_id
    assert pad_token_id_for(plain_tok) == plain_tok.eos_token_id  # no pad token: eos


# ----------------------------------------------------------------------------------------------- split


def test_split_indices_deterministic_disjoint_and_sized():
    train, ev = split_indices(100, eval_fraction=0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90
    assert sorted(train + ev) == list(range(100)) and train == sorted(train) and ev == sorted(ev)
    assert (train, ev) == split_indices(100, eval_fraction=0.1, seed=3)
    assert ev != split_indices(100, eval_fraction=0.1, seed=4)[1]
    assert len(split_indices(100, eval_size=7, seed=0)[1]) == 7
    assert len(split_indices(5, eval_fraction=0.01)[1]) == 1  # at least one eval example
    with pytest.raises(ValueError):
        split_indices(1)
    with pytest.raises(ValueError):
        split_indices(10, eval_size=10)


def test_train_eval_split_on_tokenized_dataset(chat_tok):
    ds = load_examples([{"text": "hello " * (i + 1)} for i in range(20)], chat_tok)
    train, ev = train_eval_split(ds, eval_size=5, seed=1)
    assert isinstance(train, TokenizedDataset) and len(train) == 15 and len(ev) == 5
    assert {e.source for e in train}.isdisjoint({e.source for e in ev})
    assert train.report.examples == 15 and train.report.tokens + ev.report.tokens == ds.report.tokens
    plain_train, plain_eval = train_eval_split(list(range(20)), eval_size=5, seed=1)
    assert [int(e.source.split(":")[1]) - 1 for e in ev] == plain_eval


# ----------------------------------------------------------------------------------------------- samplers


def _lengths(n=103, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(n)]


def test_length_grouped_sampler_covers_each_index_once_and_groups_lengths():
    lengths = _lengths()
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, group_batches=4)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert len(batches) == len(sampler) == 13 and sum(len(b) < 8 for b in batches) == 1

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)

    rng = random.Random(0)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i: i + 8] for i in range(0, len(shuffled), 8)]
    assert padding(batches) < 0.5 * padding(random_batches)
    # Batches come in shuffled order, not longest-first (even with a single length group).
    one_group = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, group_batches=100).batches(0)
    maxima = [max(lengths[i] for i in b) for b in one_group]
    assert maxima != sorted(maxima, reverse=True)


def test_length_grouped_sampler_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths()
    a = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1)
    b = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1)
    assert a.batches(0) == b.batches(0) and a.batches(3) == b.batches(3)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != LengthGroupedBatchSampler(lengths, batch_size=8, seed=2).batches(0)
    # Iteration follows set_epoch; a fresh sampler (a resumed run) reproduces any epoch exactly.
    b.set_epoch(2)
    assert list(b) == a.batches(2)
    a.batches(5)  # computing other epochs does not disturb anything
    assert list(b) == a.batches(2)


def test_sampler_resume_skips_consumed_batches():
    lengths = _lengths()
    full = LengthGroupedBatchSampler(lengths, batch_size=4, seed=7)
    full.set_epoch(1)
    order = list(full)
    resumed = LengthGroupedBatchSampler(lengths, batch_size=4, seed=7)
    resumed.set_epoch(1, skip_batches=10)
    assert len(resumed) == len(order) - 10
    assert list(resumed) == order[10:]
    resumed.set_epoch(2)  # the skip applies to the resumed epoch only
    assert len(list(resumed)) == len(full.batches(2))


def test_sampler_drop_last_and_dataloader(chat_tok):
    ds = load_examples([{"text": "hello " * (i % 7 + 1)} for i in range(10)], chat_tok)
    sampler = LengthGroupedBatchSampler(ds.lengths, batch_size=3, seed=0, drop_last=True)
    assert all(len(b) == 3 for b in sampler) and len(sampler) == 3
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=PaddingCollator(pad_token_id_for(chat_tok)))
    batches = list(loader)
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 3 for b in batches)


def test_packed_sampler_respects_budget_and_is_deterministic():
    lengths = _lengths(200)
    s = PackedBatchSampler(lengths, max_tokens=256, seed=3, window=64)
    packs = s.batches(0)
    flat = [i for p in packs for i in p]
    assert sorted(flat) == list(range(200))
    assert all(sum(lengths[i] for i in p) <= 256 for p in packs)
    fill = sum(lengths) / (len(packs) * 256)
    assert fill > 0.9  # best-fit decreasing packs tightly
    assert packs == PackedBatchSampler(lengths, max_tokens=256, seed=3, window=64).batches(0)
    assert packs != s.batches(1)
    s.set_epoch(0, skip_batches=5)
    assert list(s) == packs[5:] and len(s) == len(packs) - 5
    limited = PackedBatchSampler(lengths, max_tokens=256, seed=3, max_examples=2).batches(0)
    assert max(len(p) for p in limited) == 2
    with pytest.raises(ValueError, match="longer than max_tokens"):
        PackedBatchSampler([10, 300], max_tokens=256)


# ----------------------------------------------------------------------------------------------- collators


def test_padding_collator(chat_tok):
    ds = load_examples([{"text": "hello"}, {"text": "The quick brown fox jumps"}, {"text": "hi"}], chat_tok)
    pad = pad_token_id_for(chat_tok)
    batch = PaddingCollator(pad)(list(ds))
    width = max(ds.lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for row, ex in enumerate(ds):
        n = len(ex)
        assert batch["input_ids"][row, :n].tolist() == ex.input_ids.tolist()
        assert batch["labels"][row, :n].tolist() == ex.labels.tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert torch.all(batch["input_ids"][row, n:] == pad) and torch.all(batch["labels"][row, n:] == IGNORE_INDEX)
    padded = PaddingCollator(pad, pad_to_multiple_of=8)(list(ds))
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] >= width
    dicts = PaddingCollator(0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert dicts["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]


def test_packing_collator_restarts_positions_and_marks_boundaries():
    items = [{"input_ids": [11, 12, 13], "labels": [11, 12, 13]},
             {"input_ids": [21, 22], "labels": [-100, 22]},
             {"input_ids": [31, 32, 33, 34], "labels": [31, -100, 33, 34]}]
    out = PackingCollator(max_tokens=9)(items)
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # The first token of every example is never a target (so a shifted loss cannot cross a boundary).
    assert out["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, 33, 34]]
    assert out["seq_lens"].tolist() == [3, 2, 4] and out["seq_lens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 9] and out["cu_seqlens"].dtype == torch.int32
    assert out["max_seqlen"] == 4 and "attention_mask" not in out
    assert items[0]["labels"] == [11, 12, 13]  # inputs untouched
    with pytest.raises(ValueError, match="more than max_tokens=8"):
        PackingCollator(max_tokens=8)(items)


def test_packed_pipeline_end_to_end(chat_tok):
    ds = load_examples([{"prompt": "Say hi " * (i % 3 + 1), "completion": "hi"} for i in range(12)], chat_tok)
    sampler = PackedBatchSampler(ds.lengths, max_tokens=64, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=PackingCollator(max_tokens=64))
    seen = 0
    for batch in loader:
        cu, pos = batch["cu_seqlens"].tolist(), batch["position_ids"][0]
        assert batch["input_ids"].shape == (1, cu[-1]) and cu[-1] <= 64
        for a, b in zip(cu, cu[1:]):
            assert pos[a:b].tolist() == list(range(b - a))
            assert batch["labels"][0, a].item() == IGNORE_INDEX
        seen += len(cu) - 1
    assert seen == len(ds)
