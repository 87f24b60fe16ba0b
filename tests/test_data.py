"""Training data: every file format, the three row formats, response-only labels checked token by token, truncation
and skip counts, malformed rows named, packing (a packed row's loss and gradients equal the examples run one by
one), and the batch stream's seeded, resumable order."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.assets import TINY_CHAT_DATA, load_tiny_tokenizer
from gyrfalcon.data import (IGNORE_INDEX, BatchStream, DataError, Fields, collate, pack, prepare_data, split_eval,
                            tokenize_source, unpacked)
from helpers import randomize_, rel_err, tiny_config

CHAT = [
    {"messages": [{"role": "user", "content": "What is 3 plus 4?"},
                  {"role": "assistant", "content": "3 plus 4 is 7."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "1 2 3."}, {"role": "user", "content": "Spell 'cat' backwards."},
                  {"role": "assistant", "content": "'cat' backwards is 'tac'."}]},
]


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- labels
def test_chat_labels_cover_assistant_turns_only(tok, tmp_path):
    examples, stats = tokenize_source(write_jsonl(tmp_path / "c.jsonl", CHAT), tok)
    assert stats.format == "chat" and stats.examples == 2
    # Expected labels built from the template's pieces: prompt parts untrained, each assistant turn (its <|eos|>
    # and newline included) trained. The tiny tokenizer splits at special tokens and newlines, so the pieces'
    # tokens concatenate to the whole conversation's tokens (checked first).
    for example, row in zip(examples, CHAT):
        messages = row["messages"]
        pieces, expected_labels = [], []
        rendered = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                pieces.append((prompt[len(rendered):], False))
                rendered = tok.apply_chat_template(messages[: i + 1], tokenize=False)
                pieces.append((rendered[len(prompt):], True))
        ids = []
        for text, trained in pieces:
            piece_ids = ids_of(tok, text)
            ids += piece_ids
            expected_labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        assert example.input_ids == ids
        expected_labels[0] = IGNORE_INDEX
        assert example.labels == expected_labels
        trained_text = tok.decode([t for t in example.labels if t != IGNORE_INDEX])
        for m in messages:
            assert (m["content"] in trained_text) == (m["role"] == "assistant")


def test_train_on_prompt_trains_every_token(tok, tmp_path):
    (example,), _ = tokenize_source(write_jsonl(tmp_path / "c.jsonl", CHAT[:1]), tok, train_on_prompt=True)
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]


def test_prompt_completion_labels_and_eos(tok, tmp_path):
    rows = [{"prompt": "Q: What colour is the sky?\nA:", "completion": " The sky is blue."}]
    (example,), stats = tokenize_source(write_jsonl(tmp_path / "pc.jsonl", rows), tok)
    assert stats.format == "prompt_completion"
    prompt_ids, completion_ids = ids_of(tok, rows[0]["prompt"]), ids_of(tok, rows[0]["completion"])
    assert example.input_ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tok.eos_token_id]


def test_prompt_completion_as_messages_goes_through_the_template(tok, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Count to two."}], "completion": "1 2."}]
    (example,), stats = tokenize_source(write_jsonl(tmp_path / "pc.jsonl", rows), tok)
    assert stats.format == "prompt_completion"
    assert tok.decode([t for t in example.labels if t != IGNORE_INDEX]) == "1 2.<|eos|>\n"


def test_text_format_trains_everything_and_appends_eos(tok, tmp_path):
    (example,), stats = tokenize_source(write_jsonl(tmp_path / "t.jsonl", [{"text": "The moon is white."}]), tok)
    assert stats.format == "text"
    assert example.input_ids == ids_of(tok, "The moon is white.") + [tok.eos_token_id]
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]


# ---------------------------------------------------------------------------------------------- file formats
def test_every_file_format_reads_the_same_rows(tok, tmp_path):
    rows = [{"prompt": f"Q{i}: sky?", "completion": f" blue {i}."} for i in range(5)]
    expected, _ = tokenize_source(rows, tok)  # in memory
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON lines named .json
    for name, delimiter in (("d.csv", ","), ("d.tsv", "\t")):
        with (tmp_path / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "completion"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    names = ["d.jsonl", "d.json", "wrapped.json", "lines.json", "d.csv", "d.tsv"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
        names.append("d.parquet")
    except ImportError:
        pass
    for name in names:
        examples, stats = tokenize_source(tmp_path / name, tok)
        assert [(e.input_ids, e.labels, e.row) for e in examples] == \
               [(e.input_ids, e.labels, e.row) for e in expected], name
        assert stats.rows == 5


def test_chat_in_csv_and_sharegpt_conversations(tok, tmp_path):
    with (tmp_path / "chat.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["messages"])
        writer.writeheader()
        writer.writerow({"messages": json.dumps(CHAT[0]["messages"])})
    (from_csv,), _ = tokenize_source(tmp_path / "chat.csv", tok)
    sharegpt = [{"conversations": [{"from": "human", "value": "What is 3 plus 4?"},
                                   {"from": "gpt", "value": "3 plus 4 is 7."}]}]
    (from_sharegpt,), _ = tokenize_source(sharegpt, tok)
    (reference,), _ = tokenize_source(CHAT[:1], tok)
    assert from_csv.input_ids == from_sharegpt.input_ids == reference.input_ids
    assert from_csv.labels == from_sharegpt.labels == reference.labels


def test_custom_field_names(tok):
    rows = [{"question": "sky?", "answer": " blue."}]
    (example,), _ = tokenize_source(rows, tok, data_format="prompt_completion",
                                    fields=Fields(prompt="question", completion="answer"))
    assert tok.decode([t for t in example.labels if t != IGNORE_INDEX]) == " blue.<|eos|>"


def test_parquet_and_hub_need_their_packages(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"needs pyarrow \(pip install pyarrow\)"):
        tokenize_source(tmp_path / "d.parquet", tok)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(DataError, match=r"some-org/some-set: not a local file; .*pip install datasets"):
        tokenize_source("some-org/some-set", tok)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        tokenize_source(tmp_path / "missing.jsonl", tok)


def test_hub_dataset_name_reads_its_split(tok, monkeypatch):
    """A name that is not a local file goes to datasets.load_dataset with the split and token (a stand-in module
    here: no network), its rows are numbered from 1 like a file's, and a loading failure is a DataError naming the
    dataset and split."""
    import types

    calls = []

    def load_dataset(name, split, token):
        calls.append((name, split, token))
        if name == "some-org/offline":
            raise ConnectionError("no route to the hub")
        return [CHAT[0], CHAT[1], {"messages": [{"role": "user", "content": "hi"}]}]

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples, stats = tokenize_source("some-org/chat", tok, split="train[:3]", token="tok-123", bad_rows="skip")
    assert calls == [("some-org/chat", "train[:3]", "tok-123")]
    assert len(examples) == 2 and stats.source == "some-org/chat" and stats.skipped == 1
    ref, _ = tokenize_source(CHAT[:2], tok)
    assert [e.input_ids for e in examples] == [e.input_ids for e in ref]
    with pytest.raises(DataError, match=r"some-org/chat: row 3: has no assistant message"):
        tokenize_source("some-org/chat", tok)
    with pytest.raises(DataError, match=r"some-org/offline: could not load split 'train' .*ConnectionError"):
        tokenize_source("some-org/offline", tok)


# ---------------------------------------------------------------------------------------------- bad rows
BAD = [
    ({"messages": CHAT[0]["messages"]}, None),
    ("{not json", r"row 2: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"row 3: has no assistant message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     r"row 4: 'messages' message 1 \(user\) has no text 'content'"),
    ({"prompt": "x"}, r"row 5: missing 'messages' \(needed by the chat format; the row has prompt\)"),
    ({"messages": []}, r"row 6: 'messages' must be a non-empty list"),
]


def write_bad(path):
    lines = [row if isinstance(row, str) else json.dumps(row) for row, _ in BAD]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", range(1, len(BAD)))
def test_malformed_row_stops_naming_the_row(tok, tmp_path, case):
    bad_row, pattern = BAD[case]
    lines = [json.dumps(BAD[0][0])] * case + [bad_row if isinstance(bad_row, str) else json.dumps(bad_row)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=pattern) as info:
        tokenize_source(path, tok)
    assert "bad.jsonl" in str(info.value) and "bad_rows: skip" in str(info.value)


def test_skip_mode_counts_bad_rows(tok, tmp_path):
    examples, stats = tokenize_source(write_bad(tmp_path / "bad.jsonl"), tok, bad_rows="skip")
    assert len(examples) == 1 and stats.skipped == len(BAD) - 1 and stats.rows == len(BAD)
    assert stats.skip_reasons[0].startswith("row 2: not valid JSON")
    assert "5 malformed rows skipped" in stats.summary()


def test_unknown_columns_and_csv_width(tok, tmp_path):
    with pytest.raises(DataError, match=r"row 1: cannot tell the data format .*\(question, answer\)"):
        tokenize_source([{"question": "a", "answer": "b"}], tok)
    (tmp_path / "d.csv").write_text("prompt,completion\nq1,a1\nq2,a2,extra\n")
    with pytest.raises(DataError, match=r"row 2: has 3 fields, the header has 2"):
        tokenize_source(tmp_path / "d.csv", tok)


def test_chat_templates_that_cannot_locate_turns_are_clear_errors(tmp_path):
    tok = load_tiny_tokenizer()
    # a template that states the number of messages up front: shorter chats are not prefixes of longer ones
    tok.chat_template = "{{ messages | length }}" + tok.chat_template
    with pytest.raises(DataError, match="row 1: the tokenizer's chat template does not render this conversation turn "
                                        "by turn"):
        tokenize_source(CHAT[1:], tok)
    (example,), _ = tokenize_source(CHAT[1:], tok, train_on_prompt=True)  # the way out the message names
    assert example.labels[1:] == example.input_ids[1:]
    tok.chat_template = None
    with pytest.raises(DataError, match="chat data needs a tokenizer with a chat template"):
        tokenize_source(CHAT, tok)


def test_truncation_is_counted_and_untrainable_rows_dropped(tok):
    rows = [{"text": "one two three four five six seven eight nine ten " * 3}, {"text": "short."}]
    examples, stats = tokenize_source(rows, tok, max_seq_length=12)
    assert stats.truncated == 1 and max(len(e.input_ids) for e in examples) == 12
    assert stats.longest > 12 and "1 truncated" in stats.summary()
    long_prompt = [{"prompt": "word " * 40, "completion": " end."}, {"prompt": "q", "completion": " a."}]
    examples, stats = tokenize_source(long_prompt, tok, max_seq_length=16)
    assert stats.no_target == 1 and stats.truncated == 1 and len(examples) == 1
    with pytest.raises(DataError, match="no usable example"):
        tokenize_source(long_prompt[:1], tok, max_seq_length=16)


# ---------------------------------------------------------------------------------------------- packing
def test_pack_keeps_every_example_once_within_the_length(tok):
    examples, _ = tokenize_source(TINY_CHAT_DATA, tok, max_seq_length=64)
    examples = examples[:300]
    rows = pack(examples, 100)
    assert all(len(r.input_ids) <= 100 and sum(r.doc_lengths) == len(r.input_ids) for r in rows)
    docs = sorted(tuple(r.input_ids[s:s + n]) for r in rows
                  for s, n in zip([0, *torch.tensor(r.doc_lengths).cumsum(0).tolist()[:-1]], r.doc_lengths))
    assert docs == sorted(tuple(e.input_ids) for e in examples)
    assert len(rows) <= 1.15 * sum(len(e.input_ids) for e in examples) / 100 + 1  # near-full rows
    assert [r.input_ids for r in pack(examples, 100)] == [r.input_ids for r in rows]  # deterministic


def test_packed_batch_loss_and_grads_equal_examples_run_separately(tok):
    """The examples packed into rows (several documents per row, padding as a document of its own) give the
    token-weighted loss and the gradients of the same examples run one at a time."""
    config = tiny_config()
    model = randomize_(FalconH1ForCausalLM.from_config(config, dtype=torch.float64, device="cpu"), seed=0)
    examples, _ = tokenize_source(CHAT * 3, tok, max_seq_length=64)
    rows = pack(examples, 70)
    assert any(len(r.doc_lengths) > 1 for r in rows)
    batch = collate(rows, pad_id=0, packed=True)
    assert batch.seq_idx is not None and batch.input_ids.shape[1] > min(len(r.input_ids) for r in rows)
    packed = model(batch.input_ids, labels=batch.labels, seq_idx=batch.seq_idx, return_logits=False)
    packed.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total, count = 0.0, 0
    for ex in examples:
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
        n = int((labels != IGNORE_INDEX).sum())
        total = total + model(ids, labels=labels).loss * n
        count += n
    separate = total / count
    separate.backward()
    assert count == batch.n_targets
    assert abs(packed.loss.item() - separate.item()) <= 1e-12
    for name, p in model.named_parameters():
        assert rel_err(packed_grads[name], p.grad) <= 1e-10, name


def test_unpacked_batches_are_right_padded_without_seq_idx(tok):
    examples, _ = tokenize_source(CHAT, tok)
    batch = collate(unpacked(examples), pad_id=0, packed=False)
    assert batch.seq_idx is None and batch.input_ids.shape == (2, max(len(e.input_ids) for e in examples))
    short = min(range(2), key=lambda i: len(examples[i].input_ids))
    n = len(examples[short].input_ids)
    assert (batch.input_ids[short, n:] == 0).all() and (batch.labels[short, n:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------- order, split
def test_batch_stream_is_seeded_and_random_access():
    rows = [r for r in unpacked([type("E", (), {"input_ids": [i, i + 1], "labels": [-100, i + 1]})()
                                 for i in range(10)])]
    a = BatchStream(rows, batch_size=3, seed=1, pad_id=0, packed=False)
    b = BatchStream(rows, batch_size=3, seed=1, pad_id=0, packed=False)
    c = BatchStream(rows, batch_size=3, seed=2, pad_id=0, packed=False)
    assert a.per_epoch == 4
    seen = [a.batch(i).input_ids[:, 0].tolist() for i in range(8)]
    assert seen == [b.batch(i).input_ids[:, 0].tolist() for i in reversed(range(8))][::-1]
    assert sorted(sum(seen[:4], [])) == list(range(10))  # an epoch sees every row once
    assert seen[:4] != seen[4:8]  # a new order each epoch
    assert seen != [c.batch(i).input_ids[:, 0].tolist() for i in range(8)]


def test_eval_split_share_and_count_are_disjoint_and_seeded(tok):
    examples, _ = tokenize_source(TINY_CHAT_DATA, tok, max_seq_length=64)
    train, held = split_eval(examples, 0.1, seed=3)
    assert len(held) == 200 and len(train) == 1800
    assert not {e.row for e in train} & {e.row for e in held}
    assert [e.row for e in split_eval(examples, 0.1, seed=3)[1]] == [e.row for e in held]
    assert len(split_eval(examples, 25, seed=3)[1]) == 25
    with pytest.raises(DataError, match="would leave no training example"):
        split_eval(examples[:5], 5, seed=0)


def test_prepare_data_counts_and_fingerprint(tok):
    data = prepare_data(TINY_CHAT_DATA, tok, max_seq_length=128, packing=True, eval_split=50)
    assert data.eval_stats.examples == 50 and data.train_stats.examples == 1950
    assert data.train_stats.packed_rows == len(data.train)
    again = prepare_data(TINY_CHAT_DATA, tok, max_seq_length=128, packing=True, eval_split=50)
    assert again.fingerprint() == data.fingerprint()
    other = prepare_data(TINY_CHAT_DATA, tok, max_seq_length=128, packing=True, eval_split=51)
    assert other.fingerprint() != data.fingerprint()
