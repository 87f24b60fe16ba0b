"""Build the assets of the built-in tiny model: a small chat dataset and a 512-token BPE tokenizer trained on it.

    python scripts/make_tiny_assets.py        # rewrites gyrfalcon/resources/tiny/ (deterministic)

The dataset is synthetic (arithmetic, word lengths, colours, counting, reversing short words), so it is ours to
ship and a 170K-parameter model learns its patterns in a minute on a CPU: enough to show a loss curve fall and
generation change after fine-tuning. The tokenizer has the tiny preset's special ids: 0 <|pad|>, 1 <|bos|>,
2 <|eos|>, then the chat role markers, and a chat template that transformers' tokenizers apply.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "gyrfalcon" / "resources" / "tiny"
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|eos|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red",
           "sea": "blue", "leaf": "green", "milk": "white", "night": "black", "lemon": "yellow", "rose": "red"}
WORDS = ["cat", "dog", "fish", "bird", "tree", "lamp", "book", "moon", "star", "rain", "wind", "fire", "stone",
         "river", "cloud", "apple", "bread", "chair", "table", "house"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def example(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(20), rng.randrange(20)
        q, a_text = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        word = rng.choice(WORDS)
        q, a_text = f"How many letters are in '{word}'?", f"'{word}' has {len(word)} letters."
    elif kind == 2:
        thing = rng.choice(sorted(COLOURS))
        q, a_text = f"What colour is the {thing}?", f"The {thing} is {COLOURS[thing]}."
    elif kind == 3:
        n = rng.randrange(1, 10)
        q, a_text = f"Count to {NUMBER_WORDS[n]}.", " ".join(str(i) for i in range(1, n + 1)) + "."
    else:
        word = rng.choice(WORDS)
        q, a_text = f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a_text}]
    if rng.random() < 0.2:
        messages.insert(0, {"role": "system", "content": "You are a tiny, precise assistant."})
    return {"messages": messages}


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    rows = [example(rng) for _ in range(2000)]
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "chat.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for row in rows for m in row["messages"]]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(OUT / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
              "pad_token": "<|pad|>", "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
              "add_bos_token": False, "clean_up_tokenization_spaces": False}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT}: {len(rows)} conversations, vocabulary {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()
