"""Training data: files or a hub dataset -> token rows with loss labels -> (packed) batches.

Sources: local JSONL / JSON / CSV / TSV / Parquet files, a Hugging Face `datasets` name (needs `pip install
datasets`), or rows in memory (a list of dicts, a `datasets.Dataset`). Row numbers in messages count from 1:
lines of a JSONL file, records of the other formats.

Formats (`auto` picks by the first row's keys):
- text: {"text": "..."}: every token is trained; the tokenizer's EOS is appended.
- prompt_completion: {"prompt": "...", "completion": "..."}: the text is prompt + completion (+ EOS); only the
  completion is trained unless train_on_prompt. A prompt given as a list of chat messages (and a completion as a
  string or messages) goes through the chat template instead.
- chat: {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]} (ShareGPT's
  "conversations" with from/value are read too), rendered by the tokenizer's chat template; only the assistant turns
  are trained (each turn as the template renders it, its end-of-turn tokens included) unless train_on_prompt.

Labels are -100 where no loss is taken, and on each example's first token (nothing before it may predict it),
so examples can be packed: several per row, with the document index of each token (`seq_idx`) keeping attention,
the Mamba conv and the scan from crossing documents. An example longer than max_seq_length is cut to it and
counted. A malformed row stops with a DataError naming its row and what is wrong (bad_rows="skip": it is skipped
and counted instead).

    data = prepare_data("chat.jsonl", tokenizer, max_seq_length=2048, packing=True, eval_split=0.05)
    stream = BatchStream(data.train, batch_size=8, seed=0, pad_id=tokenizer.pad_token_id)
    batch = stream.batch(0)          # input_ids (b, l), labels (b, l), seq_idx (b, l) or None
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import math
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
FORMATS = ("auto", "text", "prompt_completion", "chat")
BAD_ROWS = ("error", "skip")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool"}
_TOKENIZE_BATCH = 512
_SHOWN_REASONS = 5


class DataError(ValueError):
    """Training data that cannot be read or used as asked; the message names the file, row and fix."""


class _RowError(Exception):
    """A problem with one row (turned into a DataError with the row number, or counted when skipping)."""


@dataclass
class Example:
    """One tokenized example: input_ids and labels (same length; -100 = no loss), and its source row."""
    input_ids: list[int]
    labels: list[int]
    row: int


@dataclass
class Row:
    """One training row: one example, or several packed (doc_lengths sums to len(input_ids))."""
    input_ids: list[int]
    labels: list[int]
    doc_lengths: list[int]

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class DataStats:
    """What reading and tokenizing a source did: counts reported to the user and written to run.json."""
    source: str
    format: str = "auto"
    rows: int = 0
    examples: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    truncated: int = 0
    no_target: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    packed_rows: int = 0

    def summary(self) -> str:
        parts = [f"{self.source}: {_count(self.rows, 'row')} read as {self.format}, "
                 f"{_count(self.examples, 'example')}, {_count(self.tokens, 'token')} "
                 f"({self.trained_tokens:,} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated to max_seq_length (longest was {self.longest:,} tokens)")
        if self.no_target:
            parts.append(f"{self.no_target:,} dropped: no trained token left within max_seq_length")
        if self.skipped:
            parts.append(f"{_count(self.skipped, 'malformed row')} skipped (first: "
                         f"{'; '.join(self.skip_reasons[:2])})")
        if self.packed_rows:
            parts.append(f"packed into {_count(self.packed_rows, 'row')}")
        return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    """'1 row', '2,048 rows'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------- reading rows
def read_rows(source, *, split: str = "train", token: str | None = None) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(a name for messages, an iterator of (row number, row)). A row that cannot even be parsed comes as a
    _RowError instance in place of the row."""
    if isinstance(source, (str, Path)):
        path = check_source(source)
        if path is not None:
            return str(path), _read_file(path)
        return str(source), _read_hub(str(source), split, token)
    if isinstance(source, Mapping):
        raise DataError("pass the rows as a list of dicts (or a datasets.Dataset), not a single dict")
    if isinstance(source, Iterable):
        return "data", enumerate(source, start=1)
    raise DataError(f"cannot read training data from a {type(source).__name__}; pass a file path, a dataset "
                    "name, or a list of dicts")


def check_source(source: str | Path) -> Path | None:
    """The local file a data source names (None: a `datasets` hub name), checked before anything is read or loaded:
    a folder, or a missing file (a name with a data file's suffix or a path-like start), is an error."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a .jsonl, .json, .csv, .tsv or .parquet file")
    if path.suffix.lower() in FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file")
    return None


def _read_file(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, _RowError(f"not valid JSON ({err.msg} at column {err.colno})")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines in a .json file, as `datasets` accepts
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) != 1 or len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding one list of rows), got an "
                            f"object with keys {', '.join(list(data)[:5])}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file (no header row)")
        width = len(reader.fieldnames)
        for number, row in enumerate(reader, start=1):
            if None in row or any(v is None for v in row.values()):
                n = width + len(row.get(None, [])) if None in row else sum(v is not None for v in row.values())
                yield number, _RowError(f"has {n} fields, the header has {width}")
                continue
            yield number, {k: _maybe_json(v) for k, v in row.items()}


def _maybe_json(value: str):
    """CSV cells holding chat messages are JSON lists; parse those, keep other text as is."""
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable Parquet file ({err})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_hub(name: str, split: str, token: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: not a local file; loading it from the Hugging Face hub needs the `datasets` "
                        "package (pip install datasets), or pass a .jsonl/.json/.csv/.parquet file") from None
    try:
        dataset = datasets.load_dataset(name, split=split, token=token)
    except (FileNotFoundError, ValueError, OSError, ConnectionError) as err:
        raise DataError(f"{name}: could not load split {split!r} from the Hugging Face hub "
                        f"({type(err).__name__}: {err})") from None
    yield from enumerate(dataset, start=1)


# ---------------------------------------------------------------------------------------------- formats
@dataclass
class Fields:
    """Which columns hold the text of each format."""
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def detect_format(row: Any, fields: Fields) -> str:
    if not isinstance(row, Mapping):
        raise _RowError(f"is a {type(row).__name__}, not an object with named fields")
    if fields.messages in row or "conversations" in row:
        return "chat"
    if fields.prompt in row and fields.completion in row:
        return "prompt_completion"
    if fields.text in row:
        return "text"
    raise _RowError(f"cannot tell the data format from its keys ({', '.join(map(str, row)) or 'none'}): expected "
                    f"{fields.text!r}, {fields.prompt!r} + {fields.completion!r}, or {fields.messages!r}; set "
                    "data_format and the *_field options to name your columns")


def _field(row: Any, name: str, fmt: str):
    if not isinstance(row, Mapping):
        raise _RowError(f"is a {type(row).__name__}, not an object with named fields")
    if name not in row or row[name] is None:
        raise _RowError(f"missing {name!r} (needed by the {fmt} format; the row has "
                        f"{', '.join(map(str, row)) or 'no fields'})")
    return row[name]


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"{name!r} is empty")
    return value


def normalize_messages(value, name: str = "messages") -> list[dict]:
    """A chat as [{"role", "content"}] (ShareGPT from/value accepted), checked."""
    if not isinstance(value, list) or not value:
        raise _RowError(f"{name!r} must be a non-empty list of messages, got "
                        f"{'an empty list' if value == [] else type(value).__name__}")
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise _RowError(f"{name!r} message {i} is a {type(message).__name__}, not an object")
        if "role" in message or "content" in message:
            role, content = message.get("role"), message.get("content")
        else:
            role, content = _SHAREGPT_ROLES.get(message.get("from"), message.get("from")), message.get("value")
        if not isinstance(role, str) or not role:
            raise _RowError(f"{name!r} message {i} has no 'role'")
        if not isinstance(content, str):
            raise _RowError(f"{name!r} message {i} ({role}) has no text 'content' "
                            f"(got {type(content).__name__})")
        out.append({"role": role, "content": content})
    return out


# ---------------------------------------------------------------------------------------------- tokenizing
@dataclass
class _Pending:
    """A row rendered to text, with the character spans that carry loss (None: every token)."""
    row: int
    text: str
    spans: list[tuple[int, int]] | None
    special: bool  # add the tokenizer's own special tokens (text and plain prompt/completion)
    eos: bool


class Tokenize:
    """Render and tokenize rows of one format; used by prepare_data."""

    def __init__(self, tokenizer, fmt: str, fields: Fields, *, train_on_prompt: bool):
        self.tokenizer, self.format, self.fields, self.train_on_prompt = tokenizer, fmt, fields, train_on_prompt
        self.eos_id = tokenizer.eos_token_id

    def render(self, number: int, row: Any) -> _Pending:
        if self.format == "text":
            return _Pending(number, _text(_field(row, self.fields.text, "text"), self.fields.text), None, True,
                            True)
        if self.format == "prompt_completion":
            prompt = _field(row, self.fields.prompt, "prompt_completion")
            completion = _field(row, self.fields.completion, "prompt_completion")
            if isinstance(prompt, list):
                messages = normalize_messages(prompt, self.fields.prompt)
                if isinstance(completion, str):
                    completion = [{"role": "assistant", "content": _text(completion, self.fields.completion)}]
                return self._chat(number, messages + normalize_messages(completion, self.fields.completion),
                                  train_from=len(messages))
            prompt, completion = _text(prompt, self.fields.prompt), _text(completion, self.fields.completion)
            text = prompt + completion
            return _Pending(number, text, None if self.train_on_prompt else [(len(prompt), len(text))], True, True)
        row_messages = row.get(self.fields.messages) if isinstance(row, Mapping) else None
        if row_messages is None and isinstance(row, Mapping) and "conversations" in row:
            return self._chat(number, normalize_messages(row["conversations"], "conversations"), train_from=0)
        return self._chat(number, normalize_messages(_field(row, self.fields.messages, "chat"),
                                                     self.fields.messages), train_from=0)

    def _render_chat(self, messages, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as err:  # noqa: BLE001 - a template raises whatever its Jinja code raises
            raise _RowError(f"the chat template failed on it ({type(err).__name__}: {err})") from None

    def _chat(self, number: int, messages: list[dict], train_from: int) -> _Pending:
        full = self._render_chat(messages, False)
        if self.train_on_prompt:
            return _Pending(number, full, None, False, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < train_from:
                continue
            before = self._render_chat(messages[:i], True) if i else ""
            through = full if i == len(messages) - 1 else self._render_chat(messages[: i + 1], False)
            if not (full.startswith(through) and through.startswith(before)):
                raise _RowError("the tokenizer's chat template does not render this conversation turn by turn "
                                "(a shorter conversation is not a prefix of the longer one), so its assistant "
                                "turns cannot be located; set train_on_prompt to train on every token")
            spans.append((len(before), len(through)))
        if not spans:
            raise _RowError("has no assistant message to train on (set train_on_prompt to train on every token)")
        return _Pending(number, full, spans, False, False)

    def tokenize(self, pending: list[_Pending]) -> list[tuple[int, list[int], list[int]] | tuple[int, _RowError]]:
        """[(row, input_ids, labels)] in order (labels -100 outside the spans and on the first token)."""
        out = []
        for special in (True, False):
            group = [p for p in pending if p.special == special]
            for start in range(0, len(group), _TOKENIZE_BATCH):
                out.extend(self._tokenize_group(group[start:start + _TOKENIZE_BATCH], special))
        order = {p.row: i for i, p in enumerate(pending)}
        return sorted(out, key=lambda item: order[item[0]])

    def _tokenize_group(self, group: list[_Pending], special: bool):
        if not group:
            return []
        need_offsets = any(p.spans is not None for p in group)
        try:
            encoded = self.tokenizer([p.text for p in group], add_special_tokens=special,
                                     return_offsets_mapping=need_offsets)
        except NotImplementedError:
            raise DataError("training on responses only needs a fast (Rust) tokenizer, which maps tokens to "
                            "characters; this one is a slow tokenizer. Use a fast tokenizer or set "
                            "train_on_prompt") from None
        out = []
        for i, p in enumerate(group):
            ids = list(encoded["input_ids"][i])
            if p.spans is None:
                labels = list(ids)
            else:
                labels = [t if any(s < end and e > start for start, end in p.spans) else IGNORE_INDEX
                          for t, (s, e) in zip(ids, encoded["offset_mapping"][i])]
            if p.eos and self.eos_id is not None:
                if not ids or ids[-1] != self.eos_id:
                    ids.append(self.eos_id)
                    labels.append(self.eos_id)
                else:  # the tokenizer added EOS itself (offsets (0, 0)): it still ends the completion, train it
                    labels[-1] = self.eos_id
            if len(ids) < 2:
                out.append((p.row, _RowError("has fewer than 2 tokens")))
                continue
            labels[0] = IGNORE_INDEX
            out.append((p.row, ids, labels))
        return out


def tokenize_source(source, tokenizer, *, data_format: str = "auto", fields: Fields | None = None,
                    max_seq_length: int = 2048, train_on_prompt: bool = False, bad_rows: str = "error",
                    split: str = "train", token: str | None = None) -> tuple[list[Example], DataStats]:
    """Read, check, render and tokenize every row of a source. Returns the examples and the counts."""
    if data_format not in FORMATS:
        raise DataError(f"data_format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    if bad_rows not in BAD_ROWS:
        raise DataError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be at least 2, got {max_seq_length}")
    fields = fields or Fields()
    name, rows = read_rows(source, split=split, token=token)
    stats = DataStats(source=name, format=data_format)

    def bad(number: int, err: _RowError):
        message = f"{name}: row {number}: {err}"
        if bad_rows == "error":
            raise DataError(message + " (--bad-rows skip, or bad_rows: skip in a recipe, skips such rows and "
                            "counts them)")
        stats.skipped += 1
        if len(stats.skip_reasons) < _SHOWN_REASONS:
            stats.skip_reasons.append(f"row {number}: {err}")

    renderer = None
    pending = []
    for number, row in rows:
        stats.rows += 1
        try:
            if isinstance(row, _RowError):
                raise row
            if renderer is None:
                fmt = detect_format(row, fields) if data_format == "auto" else data_format
                if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
                    raise DataError(f"{name}: chat data needs a tokenizer with a chat template; this tokenizer has "
                                    "none (set one, or use the text or prompt_completion format)")
                stats.format = fmt
                renderer = Tokenize(tokenizer, fmt, fields, train_on_prompt=train_on_prompt)
            pending.append(renderer.render(number, row))
        except _RowError as err:
            bad(number, err)
    if stats.rows == 0:
        raise DataError(f"{name}: no rows")
    examples = []
    for item in renderer.tokenize(pending) if renderer else []:
        if isinstance(item[1], _RowError):
            bad(item[0], item[1])
            continue
        number, ids, labels = item
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            stats.truncated += 1
        n_targets = sum(1 for t in labels if t != IGNORE_INDEX)
        if n_targets == 0:
            stats.no_target += 1
            continue
        stats.tokens += len(ids)
        stats.trained_tokens += n_targets
        examples.append(Example(ids, labels, number))
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"{name}: no usable example ({stats.summary()})")
    return examples, stats


# ---------------------------------------------------------------------------------------------- packing
def pack(examples: list[Example], max_seq_length: int) -> list[Row]:
    """Best-fit decreasing: each example goes into the fullest row that still has room for it. Deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        ex = examples[i]
        n = len(ex.input_ids)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            _, index = free.pop(at)
            row = rows[index]
            row.input_ids += ex.input_ids
            row.labels += ex.labels
            row.doc_lengths.append(n)
        else:
            index = len(rows)
            rows.append(Row(list(ex.input_ids), list(ex.labels), [n]))
        room = max_seq_length - len(rows[index].input_ids)
        if room >= 2:
            bisect.insort(free, (room, index))
    return rows


def unpacked(examples: list[Example]) -> list[Row]:
    return [Row(list(ex.input_ids), list(ex.labels), [len(ex.input_ids)]) for ex in examples]


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    input_ids: torch.Tensor           # (b, l)
    labels: torch.Tensor              # (b, l), -100 = no loss
    seq_idx: torch.Tensor | None      # (b, l) document index, packed batches only
    n_targets: int                    # labels that carry loss
    n_tokens: int                     # real (non-padding) tokens

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     None if self.seq_idx is None else self.seq_idx.to(device, non_blocking=True),
                     self.n_targets, self.n_tokens)


def collate(rows: list[Row], pad_id: int, packed: bool, length: int | None = None) -> Batch:
    """Right-pad rows to the longest (or to `length`, when given and no shorter). Packed rows carry seq_idx; the
    padding is one more document of its own."""
    length = max([len(r.input_ids) for r in rows] + [length or 0])
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    seq_idx = torch.zeros((len(rows), length), dtype=torch.int32) if packed else None
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        if packed:
            docs = torch.repeat_interleave(torch.arange(len(r.doc_lengths), dtype=torch.int32),
                                           torch.tensor(r.doc_lengths))
            seq_idx[i, :n] = docs
            seq_idx[i, n:] = len(r.doc_lengths)
    return Batch(ids, labels, seq_idx, int((labels != IGNORE_INDEX).sum()), sum(len(r.input_ids) for r in rows))


class BatchStream:
    """Micro-batches by global index: index i is batch i % per_epoch of epoch i // per_epoch, whose row order is a
    permutation seeded by (seed, epoch). Random access makes resuming exact: the position is one integer."""

    def __init__(self, rows: list[Row], *, batch_size: int, seed: int, pad_id: int, packed: bool,
                 shuffle: bool = True, pad_to: int | None = None):
        """pad_to: pad every batch to at least this length (a CUDA-graph step needs one shape)."""
        if not rows:
            raise DataError("no rows to make batches from")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.packed, self.shuffle, self.pad_to = packed, shuffle, pad_to
        self.per_epoch = math.ceil(len(rows) / batch_size)
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.rows), generator=generator).tolist())
        return self._order[1]

    def batch(self, index: int) -> Batch:
        epoch, j = divmod(index, self.per_epoch)
        picked = self.order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        return collate([self.rows[k] for k in picked], self.pad_id, self.packed, self.pad_to)

    def __iter__(self) -> Iterator[Batch]:
        """One pass in order (evaluation)."""
        return (self.batch(i) for i in range(self.per_epoch))


# ---------------------------------------------------------------------------------------------- all together
@dataclass
class PreparedData:
    train: list[Row]
    eval: list[Row]
    train_stats: DataStats
    eval_stats: DataStats | None
    packed: bool

    def fingerprint(self) -> str:
        """A hash of every token and label (train and eval): resuming checks the data did not change."""
        digest = hashlib.sha256()
        for part in (self.train, self.eval):
            for row in part:
                for values in (row.input_ids, row.labels, row.doc_lengths):
                    digest.update(array("q", values).tobytes())
                    digest.update(b",")
            digest.update(b"|")
        return digest.hexdigest()[:16]


def split_eval(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random share (0 < eval_split < 1) or count (eval_split >= 1) of the examples."""
    if eval_split <= 0:
        return examples, []
    n_eval = int(eval_split) if eval_split >= 1 else max(1, round(eval_split * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"eval_split {eval_split} would leave no training example out of {len(examples)}")
    generator = torch.Generator().manual_seed(seed * 7919 + 17)
    perm = torch.randperm(len(examples), generator=generator).tolist()
    held = set(perm[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def prepare_data(source, tokenizer, *, eval_source=None, eval_split: float = 0.0, data_format: str = "auto",
                 fields: Fields | None = None, max_seq_length: int = 2048, packing: bool = True,
                 train_on_prompt: bool = False, bad_rows: str = "error", split: str = "train",
                 eval_data_split: str | None = None, seed: int = 0, token: str | None = None) -> PreparedData:
    """Training (and evaluation) rows from a source; see the module docstring."""
    options = dict(data_format=data_format, fields=fields, max_seq_length=max_seq_length,
                   train_on_prompt=train_on_prompt, bad_rows=bad_rows, token=token)
    examples, stats = tokenize_source(source, tokenizer, split=split, **options)
    eval_stats = None
    if eval_source is not None:
        if eval_split:
            raise DataError("give either eval_data (a separate source) or eval_split (a share held out), not both")
        eval_examples, eval_stats = tokenize_source(eval_source, tokenizer, split=eval_data_split or split,
                                                    **options)
    else:
        examples, eval_examples = split_eval(examples, eval_split, seed)
        if eval_examples:
            eval_stats = DataStats(source=f"{stats.source} (held out)", format=stats.format, rows=len(eval_examples),
                                   examples=len(eval_examples),
                                   tokens=sum(len(e.input_ids) for e in eval_examples),
                                   trained_tokens=sum(1 for e in eval_examples for t in e.labels
                                                      if t != IGNORE_INDEX))
            stats.examples -= len(eval_examples)
            stats.tokens -= eval_stats.tokens
            stats.trained_tokens -= eval_stats.trained_tokens
    train = pack(examples, max_seq_length) if packing else unpacked(examples)
    evaluation = (pack(eval_examples, max_seq_length) if packing else unpacked(eval_examples))
    if packing:
        stats.packed_rows = len(train)
        if eval_stats:
            eval_stats.packed_rows = len(evaluation)
    return PreparedData(train, evaluation, stats, eval_stats, packing)
