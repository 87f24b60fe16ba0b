"""The notebook API: from_pretrained -> get_peft_model -> Trainer.train -> save_pretrained / save_pretrained_merged,
reloading an adapter folder with from_pretrained, full fine-tuning through the same Trainer, and clear errors."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from rich.console import Console

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.api import (FastLanguageModel, LoraModel, QLoRAUnavailable, Trainer, from_pretrained, get_peft_model,
                           train)
from gyrfalcon.assets import TINY_CHAT_DATA
from gyrfalcon.lora import lora_layers
from helpers import rel_err

ROWS = [json.loads(line) for line in TINY_CHAT_DATA.read_text().splitlines()[:48]]
FAST = dict(max_steps=4, batch_size=4, progress=False, plot=False, log_every=100)


def quiet():
    return Console(file=io.StringIO(), width=200, soft_wrap=True)


def ids():
    return torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))


def test_lora_workflow(tmp_path):
    model, tokenizer = from_pretrained(max_seq_length=96, device="cpu")
    assert tokenizer.model_max_length == 96 and isinstance(model, FalconH1ForCausalLM)
    model = get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0.0, bias="none", random_state=3)
    assert isinstance(model, LoraModel) and len(lora_layers(model.base_model)) == 2 * 9
    trainable, total = model.trainable_parameters()
    assert 0 < trainable < total
    result = Trainer(model, tokenizer, train_dataset=ROWS, output=str(tmp_path / "run"), learning_rate=1e-2,
                     console=quiet(), **FAST).train()
    assert result.steps == 4 and len(result.losses) == 4
    run_config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert run_config["max_seq_length"] == 96 and run_config["method"] == "lora"
    # the random-init base was saved beside the adapter, which points at it
    adapter_config = json.loads((result.result_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "run" / "base").resolve())

    with torch.no_grad():
        expected = model.eval()(ids()).logits
    model.save_pretrained(tmp_path / "adapter", tokenizer)
    model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    assert lora_layers(model.base_model)  # the model in memory keeps its adapters
    with pytest.raises(Exception, match="already exists"):
        model.save_pretrained(tmp_path / "adapter")

    reloaded, reloaded_tokenizer = from_pretrained(str(tmp_path / "adapter"), device="cpu")
    assert isinstance(reloaded, LoraModel) and len(reloaded_tokenizer) == len(tokenizer)
    merged, _ = FastLanguageModel.from_pretrained(str(tmp_path / "merged"), device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids()).logits, expected)
        assert rel_err(merged.eval()(ids()).logits, expected) <= 1e-5


def test_full_fine_tuning_trains_every_weight(tmp_path):
    model, tokenizer = from_pretrained(max_seq_length=96, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, tokenizer, ROWS, output=str(tmp_path / "full"), learning_rate=1e-2, console=quiet(),
                   **FAST)
    assert (result.result_dir / "model.safetensors").exists()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_api_errors(tmp_path, monkeypatch):
    model, tokenizer = from_pretrained(device="cpu")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
        with pytest.raises(QLoRAUnavailable, match="needs bitsandbytes"):
            from_pretrained(load_in_4bit=True, device="cpu")
    with pytest.raises(TypeError, match="per_device_train_batch_size: gyrfalcon calls this setting 'batch_size'"):
        Trainer(model, tokenizer, ROWS, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="adapters train no biases"):
        get_peft_model(model, bias="all")
    with pytest.raises(Exception, match="method='full'"):
        Trainer(model, tokenizer, ROWS, method="lora")
