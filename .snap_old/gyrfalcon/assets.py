"""The built-in tiny model's assets, shipped with the package: its tokenizer (with a chat template) and a small
synthetic chat dataset (gyrfalcon/resources/tiny, made by scripts/make_tiny_assets.py). They let `gyrfalcon demo`,
`finetune`, `generate` and `chat` run end to end with no download."""

from __future__ import annotations

from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent / "resources" / "tiny"
TINY_CHAT_DATA = TINY_DIR / "chat.jsonl"


def load_tiny_tokenizer():
    """The tiny model's tokenizer (a transformers fast tokenizer; vocabulary 512, pad 0, bos 1, eos 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_DIR))
