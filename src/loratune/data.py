"""Turning user data into training examples: loading, rendering, label masking, splitting, batching, packing.

Record formats (detected per record by its keys, in this order), and what is trained by default:

- ``chat``: ``messages``, a list of ``{"role", "content"}``: every assistant turn and its end-of-turn token;
- ``prompt_completion``: ``prompt`` and ``completion`` (strings): the completion and the end token;
- ``alpaca``: ``instruction``, optional ``input``, ``output`` (strings): the output and the end token;
- ``text``: ``text`` (string): every token (eos appended).

Roles: ``system``, ``user``, ``assistant`` and ``tool``. ``tool`` messages (a tool's output fed back to the
model) are accepted and rendered by the chat template like any other non-assistant message: they are context,
never trained. Extra message keys (``name``, ``tool_calls``, ``tool_call_id``, ...) are passed through to the
template untouched; an assistant message may omit ``content`` (or set it to null) only when it has ``tool_calls``.

Rendering: ``chat`` records always go through the tokenizer's chat template (or ``chat_template=`` given
explicitly); a tokenizer without one is an error for them. ``prompt_completion`` and ``alpaca`` records are
rendered as a one-turn user/assistant chat when a template is available, else as plain concatenation:
``prompt + completion + eos`` (no separator is inserted: put any you want at the end of ``prompt``) and, for
Alpaca, the original Stanford-Alpaca prompt (:data:`ALPACA_PROMPT` / :data:`ALPACA_PROMPT_NO_INPUT`) followed by
``output + eos``. In chat form the Alpaca user message is ``instruction`` or ``instruction + "\\n\\n" + input``.
``text`` records are ``text + eos``. Plain (non-template) renderings get the tokenizer's BOS token in front when
the tokenizer adds one by itself (Llama-style); template renderings never get extra special tokens (templates
write their own BOS).

Label masking: labels are ``-100`` everywhere except on assistant/completion tokens, which include the
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, eos, ...) so that the model learns to stop. The assistant
tokens are located by rendering prefixes of the conversation with the template: for an assistant message *i*,
``render(messages[:i], add_generation_prompt=True)`` must be a prefix of ``render(messages[:i+1])``, which must be
a prefix of the rendering of the whole conversation (a :class:`DataError` says so when a template breaks this,
e.g. one that rewrites earlier turns). The characters in between are the assistant turn as the template writes
it; the trained tokens are the tokens of the full conversation starting inside that range, up to and including
the last special token in it (so ChatML's ``"\\n"`` after ``<|im_end|>`` is not trained; a template that writes
no special token after the content has the whole range trained). Tokens are mapped to characters with the fast
tokenizer's offsets; for a tokenizer without offsets every prefix is tokenized on its own and must give a prefix
of the full token sequence. ``train_on_all=True`` trains every token instead. The token sequence is always the
tokenization of the whole rendered conversation, i.e. what the model reads at inference for later turns.
Templates that render the *last* assistant turn differently from earlier ones (Qwen3's adds an empty
``<think></think>`` block only to the final turn) fail the prefix check on multi-turn conversations: pass a
training template (``chat_template=``) that renders every turn the same way.

Invariant relied on by batching and the loss: ``labels[0]`` of every example is ``-100`` (no token precedes it
inside the example, so nothing could predict it). With the usual shift (position *t* predicts token *t+1*) this
also means that no loss term crosses the boundary between two examples packed into one row.

Errors are :class:`DataError` (a ``ValueError``) with a one-line message ``"<file>:<line>: <problem>"``
(file-level problems, such as a missing or empty file, have no line). ``skip_bad=True`` skips bad records
instead and counts them in the :class:`DataReport`.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence, TypeVar

import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss ignores."""

ROLES = ("system", "user", "assistant", "tool")
"""Accepted chat roles. Only ``assistant`` turns are trained (unless ``train_on_all``)."""

FORMATS = ("chat", "prompt_completion", "alpaca", "text")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""Plain-text Alpaca prompt (no chat template) for records with a non-empty ``input``; ``output`` follows it."""

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""Plain-text Alpaca prompt for records without ``input`` (missing, null or empty)."""

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- errors & report


class DataError(ValueError):
    """Bad training data. ``str(err)`` is one line: ``"<where>: <problem>"``, ``where`` being ``file:line``.

    Attributes: ``problem`` (the message without location), ``where`` (the location as printed: ``"file:line"``,
    ``"file"`` for file-level problems such as an empty file, ``"name[split] row i"`` for ``datasets`` rows),
    ``path`` (str) and ``line`` (1-based file line; 0-based row for ``datasets``; None for file-level problems).
    """

    def __init__(self, problem: str, *, path: str | Path | None = None, line: int | None = None,
                 where: str | None = None):
        problem = " ".join(str(problem).split("\n"))
        if where is None and path is not None:
            where = f"{path}:{line}" if line is not None else str(path)
        self.problem, self.where, self.line = problem, where, line
        self.path = str(path) if path is not None else None
        super().__init__(f"{where}: {problem}" if where else problem)

    def at(self, loc: "Location") -> "DataError":
        """The same problem, located at ``loc``."""
        return DataError(self.problem, path=loc.source, line=loc.line, where=str(loc))


class Location(NamedTuple):
    """Where a record comes from: ``source`` (file path, or ``"name[split]"`` for ``datasets``) and ``line``
    (1-based file line, or 0-based row for ``datasets`` sources, ``row=True``)."""

    source: str
    line: int
    row: bool = False

    def __str__(self) -> str:
        return f"{self.source} row {self.line}" if self.row else f"{self.source}:{self.line}"


@dataclass
class DataReport:
    """What loading produced. ``trainable_tokens`` counts tokens that contribute to the loss."""

    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    """Examples longer than ``max_seq_len`` whose tail was dropped."""
    skipped: int = 0
    """Bad records skipped (only with ``skip_bad=True``)."""
    skip_reasons: list[str] = field(default_factory=list)
    """The first few skipped records' messages (``file:line: problem``)."""
    formats: dict[str, int] = field(default_factory=dict)
    """Examples per detected format."""
    max_seq_len: int | None = None

    def summary(self) -> str:
        """A one-paragraph human-readable summary (what the CLI prints)."""
        fmt = ", ".join(f"{k}={v}" for k, v in sorted(self.formats.items())) or "none"
        text = (f"{self.examples} examples ({fmt}), {self.tokens} tokens, {self.trainable_tokens} trainable; "
                f"{self.truncated} truncated to max_seq_len={self.max_seq_len}; {self.skipped} skipped")
        if self.skip_reasons:
            text += "; first skipped: " + " | ".join(self.skip_reasons)
        return text


# ----------------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One tokenized training example.

    ``input_ids`` and ``labels`` are 1-D ``int32`` tensors of the same length L (≤ max_seq_len); ``labels`` is
    ``-100`` where no loss is taken and always at index 0. ``source`` is ``"file:line"`` of the record.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    source: str = ""
    truncated: bool = False
    format: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_trainable(self) -> int:
        """Tokens that contribute to the (shifted) causal-LM loss."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


class TokenizedDataset(Dataset):
    """A list of :class:`Example` plus the :class:`DataReport` that describes it; a ``torch`` map-style Dataset."""

    def __init__(self, examples: Sequence[Example], report: DataReport | None = None):
        self.examples = list(examples)
        self.report = report if report is not None else _report_for(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        """Token length of every example (for the samplers)."""
        return [len(e) for e in self.examples]

    def subset(self, indices: Sequence[int]) -> "TokenizedDataset":
        """The examples at ``indices`` (in that order), with a recomputed report (``skipped`` = 0)."""
        sub = [self.examples[i] for i in indices]
        return TokenizedDataset(sub, _report_for(sub, max_seq_len=self.report.max_seq_len))


def _report_for(examples: Sequence[Example], max_seq_len: int | None = None) -> DataReport:
    rep = DataReport(max_seq_len=max_seq_len)
    for ex in examples:
        _add_to_report(rep, ex)
    return rep


def _add_to_report(rep: DataReport, ex: Example) -> None:
    rep.examples += 1
    rep.tokens += len(ex)
    rep.trainable_tokens += ex.num_trainable
    rep.truncated += int(ex.truncated)
    rep.formats[ex.format] = rep.formats.get(ex.format, 0) + 1


# ----------------------------------------------------------------------------------------------- format detection


def detect_format(record: Any) -> str:
    """Which of :data:`FORMATS` a record is (by its keys); raises :class:`DataError` (without location) if none.

    Precedence: ``messages`` → chat; ``prompt`` or ``completion`` → prompt_completion; ``instruction`` or
    ``output`` → alpaca; ``text`` → text. A record with only half of a pair (say ``prompt`` alone) is detected
    as that format, so that validation reports the missing field.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {_json_type(record)}")
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    raise DataError("unrecognised record: expected 'messages', 'prompt'+'completion', "
                    f"'instruction'+'output' or 'text' (keys: {keys})")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _get_str(record: Mapping, key: str, *, optional: bool = False, prefix: str = "") -> str | None:
    if key not in record or (optional and record[key] is None):
        if optional:
            return None
        raise DataError(f"missing field '{prefix}{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field '{prefix}{key}' must be a string, got {_json_type(value)}")
    return value


def _validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"field 'messages' must be a list of messages, got {_json_type(messages)}")
    if not messages:
        raise DataError("field 'messages' is empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise DataError(f"{where} must be an object with 'role' and 'content', got {_json_type(msg)}")
        if "role" not in msg:
            raise DataError(f"missing field '{where}.role'")
        role = msg["role"]
        if not isinstance(role, str):
            raise DataError(f"field '{where}.role' must be a string, got {_json_type(role)}")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} in {where} (expected one of {', '.join(ROLES)})")
        content = msg.get("content")
        if content is None and not (role == "assistant" and msg.get("tool_calls")):
            if "content" not in msg:
                raise DataError(f"missing field '{where}.content'")
            raise DataError(f"field '{where}.content' must be a string, got null")
        if content is not None and not isinstance(content, str):
            raise DataError(f"field '{where}.content' must be a string, got {_json_type(content)}")
        out.append(dict(msg))
    return out


# ----------------------------------------------------------------------------------------------- encoder


class ExampleEncoder:
    """Turns one record into an :class:`Example` with a given tokenizer and options.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones give character offsets; others work, more slowly).
        max_seq_len: examples longer than this are truncated (tail dropped); None: no limit.
        train_on_all: train on every token (except the first) instead of assistant/completion tokens only.
        chat_template: a Jinja chat template overriding the tokenizer's.
        pairs_as_chat: render prompt/completion and Alpaca records as a chat (True), as plain text (False), or
            as a chat exactly when a chat template is available (None, the default).
    """

    def __init__(self, tokenizer: Any, *, max_seq_len: int | None = None, train_on_all: bool = False,
                 chat_template: str | None = None, pairs_as_chat: bool | None = None):
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 (one token to read, one to predict), got {max_seq_len}")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.train_on_all = train_on_all
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.pairs_as_chat = bool(self.chat_template) if pairs_as_chat is None else pairs_as_chat
        if self.pairs_as_chat and not self.chat_template:
            raise ValueError("pairs_as_chat=True needs a chat template, but the tokenizer has none")
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        self.special_ids = _special_ids(tokenizer)
        self.bos_prefix = _bos_prefix(tokenizer)
        self.has_offsets = _supports_offsets(tokenizer)

    # -- public

    def encode(self, record: Any) -> Example:
        """Encode one record (format detected by :func:`detect_format`); raises :class:`DataError` (unlocated)."""
        fmt = detect_format(record)
        if fmt == "chat":
            messages = _validate_messages(record["messages"])
            ids, mask = self._encode_chat(messages)
        elif fmt == "prompt_completion":
            prompt, completion = _get_str(record, "prompt"), _get_str(record, "completion")
            if self.pairs_as_chat:
                ids, mask = self._encode_chat([{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": completion}])
            else:
                ids, mask = self._encode_plain(prompt, completion)
        elif fmt == "alpaca":
            instruction, output = _get_str(record, "instruction"), _get_str(record, "output")
            inp = _get_str(record, "input", optional=True)
            if self.pairs_as_chat:
                user = instruction if not inp else f"{instruction}\n\n{inp}"
                ids, mask = self._encode_chat([{"role": "user", "content": user},
                                               {"role": "assistant", "content": output}])
            else:
                prompt = (ALPACA_PROMPT.format(instruction=instruction, input=inp) if inp
                          else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
                ids, mask = self._encode_plain(prompt, output)
        else:
            text = _get_str(record, "text")
            if not text:
                raise DataError("field 'text' is empty")
            ids, mask = self._encode_plain("", text)
        return self._finish(ids, mask, fmt)

    # -- internals

    def _finish(self, ids: list[int], mask: list[bool], fmt: str) -> Example:
        if self.train_on_all:
            mask = [True] * len(ids)
        truncated = self.max_seq_len is not None and len(ids) > self.max_seq_len
        if truncated:
            full_len = len(ids)
            ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        if labels:
            labels[0] = IGNORE_INDEX
        if all(lab == IGNORE_INDEX for lab in labels):
            if truncated:
                raise DataError(f"no trainable tokens after truncation to max_seq_len={self.max_seq_len} "
                                f"(example has {full_len} tokens; the trained part starts after the limit)")
            if fmt == "chat":
                raise DataError("no trainable tokens: the conversation has no assistant message to train on")
            raise DataError("no trainable tokens")
        return Example(torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32),
                       truncated=truncated, format=fmt)

    def _encode_plain(self, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
        """``[bos] + prompt + completion + eos``; the completion and eos are trained."""
        text = prompt + completion
        ids, mask = self._tokenize_with_spans(text, [(len(prompt), len(text))], trim_to_special=False)
        ids, mask = self.bos_prefix + ids, [False] * len(self.bos_prefix) + mask
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids, mask = ids + [self.eos_id], mask + [True]
        return ids, mask

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja2 TemplateError (raise_exception in templates), ValueError, ...
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"chat template failed: {msg}") from exc
        if not isinstance(text, str):
            raise DataError(f"chat template rendered {type(text).__name__}, expected a string")
        return text

    def _encode_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        if not self.chat_template:
            raise DataError("chat 'messages' need a chat template, but the tokenizer has none (pass chat_template=)")
        full = self._render(messages, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        if not self.train_on_all:
            for i, msg in enumerate(messages):
                if msg["role"] != "assistant":
                    continue
                if i == 0:
                    raise DataError("conversation starts with an assistant message; put a system or user message "
                                    "before it (its header could not be told apart from its content)")
                prompt = self._render(messages[:i], add_generation_prompt=True)
                turn = self._render(messages[: i + 1], add_generation_prompt=False)
                if not turn.startswith(prompt):
                    raise DataError(f"chat template is not prefix-stable: rendering messages[:{i}] with the generation "
                                    f"prompt is not a prefix of rendering messages[:{i + 1}], so the tokens of "
                                    f"assistant message {i} cannot be located")
                if not full.startswith(turn):
                    raise DataError(f"chat template is not prefix-stable: rendering messages[:{i + 1}] is not a prefix "
                                    "of the whole conversation (the template rewrites earlier turns?), so the tokens "
                                    f"of assistant message {i} cannot be located")
                if len(turn) > len(prompt):
                    spans.append((len(prompt), len(turn)))
        return self._tokenize_with_spans(full, spans, trim_to_special=True)

    def _tokenize_with_spans(self, text: str, spans: list[tuple[int, int]], *,
                             trim_to_special: bool) -> tuple[list[int], list[bool]]:
        """Tokenize ``text`` (no added special tokens); mask[k] is True for tokens starting inside a span.

        With ``trim_to_special``, a span's trained tokens stop after its last special token (when it has one).
        """
        if self.has_offsets:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            starts = [s for s, _ in enc["offset_mapping"]]
            token_spans = []
            for a, b in spans:
                lo = bisect.bisect_left(starts, a)
                hi = bisect.bisect_left(starts, b)
                token_spans.append((lo, hi))
        else:
            ids, token_spans = self._tokenize_incremental(text, spans)
        mask = [False] * len(ids)
        for lo, hi in token_spans:
            if trim_to_special:
                for k in range(hi - 1, lo - 1, -1):
                    if ids[k] in self.special_ids:
                        hi = k + 1
                        break
            for k in range(lo, hi):
                mask[k] = True
        return ids, mask

    def _tokenize_incremental(self, text: str,
                              spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token spans without offsets: the tokens of ``text[:c]`` must be a prefix of those of ``text``."""
        ids = _encode(self.tokenizer, text)
        cache: dict[int, int] = {0: 0, len(text): len(ids)}

        def boundary(c: int) -> int:
            if c not in cache:
                prefix = _encode(self.tokenizer, text[:c])
                if ids[: len(prefix)] != prefix:
                    raise DataError(f"tokenization is not prefix-stable at character {c}: the tokens of the text "
                                    "before an assistant turn are not a prefix of the full conversation's tokens")
                cache[c] = len(prefix)
            return cache[c]

        return ids, [(boundary(a), boundary(b)) for a, b in spans]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of special tokens: ``all_special_ids`` plus added tokens flagged special (``<|im_end|>``...)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    return frozenset(ids)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_id]`` when the tokenizer puts BOS in front by itself (add_special_tokens=True), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    try:
        with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    except Exception:  # pragma: no cover - tokenizers that refuse the flag
        return []
    return [bos] if with_special and with_special[0] == bos else []


def _supports_offsets(tokenizer: Any) -> bool:
    if not getattr(tokenizer, "is_fast", False):
        return False
    try:
        enc = tokenizer("ab", add_special_tokens=False, return_offsets_mapping=True)
        return "offset_mapping" in enc
    except (NotImplementedError, ValueError, TypeError):
        return False


# ----------------------------------------------------------------------------------------------- loading


def pad_token_id_for(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token, else 0. Padded positions are masked
    (attention_mask 0, labels -100), so the choice does not affect training."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or DataError) for every non-blank line; DataError if the file is empty.

    Lines are decoded one by one (UTF-8; a BOM on line 1 is accepted), so a line that is not UTF-8 is a
    per-line error like malformed JSON (skippable with ``skip_bad``).
    """
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open: {exc.strerror or exc}", path=path) from exc
    seen = False
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                seen = True
                yield lineno, DataError(f"not valid UTF-8 (byte {exc.start + 1}: {exc.reason})", path=path, line=lineno)
                continue
            if not line.strip():
                continue
            seen = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=path, line=lineno)
                continue
            yield lineno, record
    if not seen:
        raise DataError("empty file: no JSON records", path=path)


DATASETS_FILE_BUILDERS = {".parquet": ("parquet", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}),
                          ".arrow": ("arrow", {})}
"""Local files read through ``datasets`` (builder name, extra kwargs) by suffix."""


def _iter_hf_dataset(source: str, split: str | None) -> Iterator[tuple[Location, Any]]:
    import datasets  # optional; only reached when importable

    split = split or "train"
    where = f"{source}[{split}]"
    path = Path(source)
    try:
        if path.is_file():
            builder, kwargs = DATASETS_FILE_BUILDERS[path.suffix.lower()]
            ds = datasets.load_dataset(builder, data_files=str(path), split=split, **kwargs)
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"datasets.load_dataset failed: {first}", where=where) from exc
    n = 0
    for i, row in enumerate(ds):
        n += 1
        yield Location(where, i, row=True), row
    if n == 0:
        raise DataError("empty dataset: no records", where=where)


def _datasets_available() -> bool:
    """Whether the optional ``datasets`` package can be imported (without importing it)."""
    import importlib.util
    import sys

    if sys.modules.get("datasets") is not None:
        return True
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def iter_records(source: str | Path, *, split: str | None = None) -> Iterator[tuple[Location, Any]]:
    """``(location, record)`` for every record of ``source``; ``record`` may be a :class:`DataError` (bad line).

    A local file is read as JSON Lines (blank lines skipped, location ``"file:line"``) unless its suffix is
    one of :data:`DATASETS_FILE_BUILDERS` (Parquet, CSV, TSV, Arrow). Those files, directories and anything that
    is not a local path (a hub dataset name) go to ``datasets.load_dataset(..., split=split or "train")`` when the
    optional ``datasets`` package is installed (location ``"source[split] row i"``, 0-based); without it they
    are a :class:`DataError`. ``split`` is ignored for JSONL files.
    """
    path = Path(source)
    if path.is_file() and path.suffix.lower() not in DATASETS_FILE_BUILDERS:
        for lineno, rec in _iter_jsonl(path):
            yield Location(str(path), lineno), rec
        return
    if _datasets_available():
        yield from _iter_hf_dataset(str(source), split)
        return
    if path.exists():
        kind = "a directory" if path.is_dir() else f"{path.suffix} files"
        raise DataError(f"reading {kind} needs the optional 'datasets' package (pip install datasets); "
                        "or convert the data to JSONL", path=path)
    raise DataError("no such file (hub dataset names need the optional 'datasets' package: pip install datasets)",
                    path=path)


def load_examples(source: str | Path | Iterable[Mapping], tokenizer: Any, *, max_seq_len: int | None = None,
                  train_on_all: bool = False, skip_bad: bool = False, split: str | None = None,
                  chat_template: str | None = None, pairs_as_chat: bool | None = None,
                  max_skip_reasons: int = 5) -> TokenizedDataset:
    """Load and tokenize a data source into a :class:`TokenizedDataset` (``.report`` says what happened).

    Args:
        source: a JSONL file, a ``datasets``-loadable path or hub name (see :func:`iter_records`), or an
            iterable of records already in memory (located as ``"<records>:i"``, 1-based).
        tokenizer: the model's tokenizer.
        max_seq_len: truncate longer examples (tail dropped) and count them in ``report.truncated``.
        train_on_all: loss on all tokens instead of assistant/completion tokens only.
        skip_bad: skip bad records (counted in ``report.skipped``, first ``max_skip_reasons`` messages kept in
            ``report.skip_reasons``) instead of raising :class:`DataError` at the first one.
        split: split for ``datasets`` sources.
        chat_template, pairs_as_chat: see :class:`ExampleEncoder`.

    Raises:
        DataError: a bad record (``"file:line: problem"``), an empty or missing file, or no usable example.
    """
    encoder = ExampleEncoder(tokenizer, max_seq_len=max_seq_len, train_on_all=train_on_all,
                             chat_template=chat_template, pairs_as_chat=pairs_as_chat)
    if isinstance(source, (str, Path)):
        name, records = str(source), iter_records(source, split=split)
    else:
        name, records = "<records>", ((Location("<records>", i), rec) for i, rec in enumerate(source, 1))
    report = DataReport(max_seq_len=max_seq_len)
    examples: list[Example] = []
    for loc, rec in records:
        try:
            if isinstance(rec, DataError):
                raise rec
            try:
                ex = encoder.encode(rec)
            except DataError as exc:
                raise exc.at(loc) from None
        except DataError as exc:
            if not skip_bad:
                raise
            report.skipped += 1
            if len(report.skip_reasons) < max_skip_reasons:
                report.skip_reasons.append(str(exc))
            continue
        ex.source = str(loc)
        examples.append(ex)
        _add_to_report(report, ex)
    if not examples:
        hint = f" ({report.skipped} bad records skipped; first: {report.skip_reasons[0]})" if report.skipped else ""
        raise DataError(f"no usable examples{hint}", where=name)
    if report.skipped:
        logger.warning("%s: skipped %d bad records; first: %s", name, report.skipped, " | ".join(report.skip_reasons))
    if report.truncated:
        logger.warning("%s: %d of %d examples truncated to max_seq_len=%s", name, report.truncated,
                       report.examples, max_seq_len)
    logger.info("%s: %s", name, report.summary())
    return TokenizedDataset(examples, report)


# ----------------------------------------------------------------------------------------------- splitting


def split_indices(n: int, *, eval_fraction: float = 0.05, eval_size: int | None = None,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic held-out split of ``range(n)``: ``(train_indices, eval_indices)``, each sorted ascending.

    The eval set has ``eval_size`` items if given, else ``max(1, round(n * eval_fraction))``; it is the first
    ones of a permutation seeded by ``seed`` alone (same n, size and seed → same split on every run/machine).
    At least one item always stays in train.
    """
    if n < 2:
        raise ValueError(f"need at least 2 examples to hold some out for eval, got {n}")
    if eval_size is None:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        eval_size = max(1, round(n * eval_fraction))
    if not 1 <= eval_size < n:
        raise ValueError(f"eval_size must be in [1, {n - 1}] for {n} examples, got {eval_size}")
    perm = list(range(n))
    _rng(seed, "split").shuffle(perm)
    return sorted(perm[eval_size:]), sorted(perm[:eval_size])


def train_eval_split(dataset: Sequence[T], *, eval_fraction: float = 0.05, eval_size: int | None = None,
                     seed: int = 0) -> tuple[Any, Any]:
    """Split ``dataset`` with :func:`split_indices`. A :class:`TokenizedDataset` gives two TokenizedDatasets
    (reports recomputed); any other sequence gives two lists (original order kept)."""
    train_idx, eval_idx = split_indices(len(dataset), eval_fraction=eval_fraction, eval_size=eval_size, seed=seed)
    if isinstance(dataset, TokenizedDataset):
        return dataset.subset(train_idx), dataset.subset(eval_idx)
    return [dataset[i] for i in train_idx], [dataset[i] for i in eval_idx]


# ----------------------------------------------------------------------------------------------- samplers


def _rng(seed: int, *salt: Any) -> random.Random:
    """A ``random.Random`` that is a pure function of (seed, salt): sha256-derived, so stable across processes,
    platforms and Python versions (unlike ``hash()``), and independent of torch's RNG algorithms."""
    digest = hashlib.sha256(repr(("loratune", int(seed)) + salt).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class _EpochBatchSampler(Sampler[list[int]]):
    """Base: ``batches(epoch)`` is a pure function of the constructor arguments and ``epoch``; iteration yields
    ``batches(self.epoch)[self.skip:]``. Resume: ``set_epoch(epoch, skip_batches=k)`` skips the k batches that
    were already consumed in that epoch (the skip applies to that epoch only)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.epoch = 0
        self.skip = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batches_cached(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.batches(epoch))
        return self._cache[1]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch to iterate (its order is fixed by seed + epoch) and how many of its first batches to
        skip (to resume mid-epoch)."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self._batches_cached(self.epoch)[self.skip:])

    def __len__(self) -> int:
        """Batches that ``__iter__`` yields for the current epoch (after the skip)."""
        return max(0, len(self._batches_cached(self.epoch)) - self.skip)


class LengthGroupedBatchSampler(_EpochBatchSampler):
    """Batches of examples of similar length (less padding), in a seeded order that depends only on
    (seed, epoch).

    Per epoch: shuffle all indices; cut them into groups of ``batch_size * group_batches``; sort each group by
    length (longest first, ties by shuffled position); cut groups into batches; shuffle the batch order. With
    ``drop_last``, batches smaller than ``batch_size`` (at most one, the tail of the last group) are dropped.
    Use as ``DataLoader(ds, batch_sampler=sampler, collate_fn=PaddingCollator(...))``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 group_batches: int = 64):
        super().__init__(seed)
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be >= 1, got {batch_size}, {group_batches}")
        self.lengths = [int(x) for x in lengths]
        self.batch_size, self.drop_last, self.group_batches = int(batch_size), bool(drop_last), int(group_batches)

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` in order (a pure function of the lengths, options, seed and epoch)."""
        rng = _rng(self.seed, "length-grouped", int(epoch))
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        group = self.batch_size * self.group_batches
        out: list[list[int]] = []
        for g in range(0, len(order), group):
            chunk = sorted(order[g: g + group], key=lambda i: -self.lengths[i])  # stable: ties keep shuffle order
            out.extend(chunk[b: b + self.batch_size] for b in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        rng.shuffle(out)
        return out


class PackedBatchSampler(_EpochBatchSampler):
    """Batches for :class:`PackingCollator`: groups of examples whose total length is ≤ ``max_tokens``.

    Per epoch: shuffle all indices; cut them into windows of ``window`` examples; pack each window by best-fit
    decreasing; shuffle the packs. A pure function of (lengths, options, seed, epoch), like
    :class:`LengthGroupedBatchSampler`, with the same ``set_epoch(epoch, skip_batches)`` resume.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, seed: int = 0, window: int = 1024,
                 max_examples: int | None = None):
        super().__init__(seed)
        self.lengths = [int(x) for x in lengths]
        too_long = [i for i, n in enumerate(self.lengths) if n > max_tokens]
        if too_long:
            raise ValueError(f"{len(too_long)} examples are longer than max_tokens={max_tokens} (e.g. index "
                             f"{too_long[0]}: {self.lengths[too_long[0]]} tokens); set max_seq_len <= max_tokens")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_tokens, self.window, self.max_examples = int(max_tokens), int(window), max_examples

    def batches(self, epoch: int) -> list[list[int]]:
        """All packs of ``epoch`` in order; each pack lists example indices (longest first)."""
        rng = _rng(self.seed, "packed", int(epoch))
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        packs: list[list[int]] = []
        for w in range(0, len(order), self.window):
            items = sorted(order[w: w + self.window], key=lambda i: -self.lengths[i])
            free: list[tuple[int, int]] = []  # (remaining tokens, pack id) sorted ascending
            local: list[list[int]] = []
            for i in items:
                n = self.lengths[i]
                k = bisect.bisect_left(free, (n, -1))
                if k < len(free):  # the fullest pack that still fits
                    room, pid = free.pop(k)
                else:
                    room, pid = self.max_tokens, len(local)
                    local.append([])
                local[pid].append(i)
                room -= n
                if room > 0 and (self.max_examples is None or len(local[pid]) < self.max_examples):
                    bisect.insort(free, (room, pid))
            packs.extend(local)
        rng.shuffle(packs)
        return packs


# ----------------------------------------------------------------------------------------------- collators


def _ids_labels(item: Example | Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, Example):
        ids, labels = item.input_ids, item.labels
    else:
        ids = item["input_ids"]
        labels = item.get("labels", ids)
    ids, labels = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
    if ids.dim() != 1 or ids.shape != labels.shape:
        raise ValueError(f"input_ids and labels must be 1-D of the same length, got {tuple(ids.shape)} "
                         f"and {tuple(labels.shape)}")
    return ids, labels


class PaddingCollator:
    """Pads a batch to its longest example (right padding).

    Returns ``input_ids`` [B, L] long (pad id where padded), ``attention_mask`` [B, L] long (1 = real token),
    ``labels`` [B, L] long (-100 where padded); L = longest length, rounded up to ``pad_to_multiple_of``.
    Items are :class:`Example` or mappings with ``input_ids`` (and ``labels``; default: the ids).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[Example | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("empty batch")
        pairs = [_ids_labels(item) for item in batch]
        width = max(ids.numel() for ids, _ in pairs)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)   # [B, L]
        labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)           # [B, L]
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)                # [B, L]
        for row, (ids, lab) in enumerate(pairs):
            n = ids.numel()
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = ids, lab, 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackingCollator:
    """Padding-free packing: the whole batch concatenated into one row.

    Returns, for a batch of n examples of lengths l_1..l_n (T = Σ l_i, T ≤ ``max_tokens`` if given):

    - ``input_ids`` [1, T] long: the examples back to back, no padding;
    - ``labels`` [1, T] long: their labels, with the first token of every example set to -100, so that the
      usual shifted loss (position t predicts t+1) never predicts an example's first token from the previous
      example (pass ``position_ids`` to :func:`loratune.loss.causal_lm_loss` as a second guard);
    - ``position_ids`` [1, T] long: 0..l_i-1 for each example (restarting at 0 at every boundary);
    - ``seq_lens`` [n] int32: l_1..l_n;
    - ``cu_seqlens`` [n+1] int32: 0, l_1, l_1+l_2, ..., T (flash-attn varlen layout: example i is
      ``[cu_seqlens[i], cu_seqlens[i+1])``);
    - ``max_seqlen`` int: max l_i.

    There is no ``attention_mask``: attention must be kept inside each example by the attention path
    (varlen kernels from ``cu_seqlens``, or a block-diagonal mask); plain causal attention over the row would
    let examples see each other. Use with :class:`PackedBatchSampler`.
    """

    def __init__(self, max_tokens: int | None = None):
        self.max_tokens = max_tokens

    def __call__(self, batch: Sequence[Example | Mapping[str, Any]]) -> dict[str, Any]:
        if not batch:
            raise ValueError("empty batch")
        pairs = [_ids_labels(item) for item in batch]
        lens = [ids.numel() for ids, _ in pairs]
        total = sum(lens)
        if self.max_tokens is not None and total > self.max_tokens:
            raise ValueError(f"batch has {total} tokens, more than max_tokens={self.max_tokens}")
        if min(lens) == 0:
            raise ValueError("cannot pack an empty example")
        labels = []
        for _, lab in pairs:
            lab = lab.clone()
            lab[0] = IGNORE_INDEX
            labels.append(lab)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        cu_seqlens = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(seq_lens, 0)
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])
        return {
            "input_ids": torch.cat([ids for ids, _ in pairs]).unsqueeze(0),
            "labels": torch.cat(labels).unsqueeze(0),
            "position_ids": position_ids.unsqueeze(0),
            "seq_lens": seq_lens,
            "cu_seqlens": cu_seqlens,
            "max_seqlen": max(lens),
        }


__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "DATASETS_FILE_BUILDERS", "DataError", "DataReport", "Example", "ExampleEncoder", "FORMATS",
    "IGNORE_INDEX", "LengthGroupedBatchSampler", "Location", "PackedBatchSampler", "PackingCollator", "PaddingCollator",
    "ROLES", "TokenizedDataset", "detect_format", "iter_records", "load_examples", "pad_token_id_for",
    "split_indices", "train_eval_split",
]
