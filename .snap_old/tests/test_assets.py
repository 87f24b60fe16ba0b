"""The tiny model's bundled tokenizer and dataset agree with the tiny preset and are installed with the package."""

import json

from gyrfalcon import FalconH1Config
from gyrfalcon.assets import TINY_CHAT_DATA, load_tiny_tokenizer


def test_tokenizer_matches_tiny_preset_and_applies_chat_template():
    tokenizer, config = load_tiny_tokenizer(), FalconH1Config.from_preset("tiny")
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.pad_token_id, config.bos_token_id, config.eos_token_id)
    messages = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 plus 4 is 7."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|user|>\nWhat is 3 plus 4?<|eos|>\n<|assistant|>\n3 plus 4 is 7.<|eos|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == config.bos_token_id and config.eos_token_id in ids and max(ids) < config.vocab_size
    assert tokenizer.decode(ids) == text


def test_dataset_rows_are_chats():
    rows = [json.loads(line) for line in TINY_CHAT_DATA.read_text().splitlines()]
    assert len(rows) == 2000
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user" for r in rows)
