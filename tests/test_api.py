"""The notebook API: from_pretrained -> get_peft_model -> Trainer.train -> save_pretrained / save_pretrained_merged,
reloading an adapter folder with from_pretrained and generating with it, full fine-tuning through the same Trainer,
the Trainer's checkpointing settings, a QLoRA adapter saved by the API merged onto its 4-bit base, finetune reading
the data before the weights, and clear errors."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from rich.console import Console

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.api import (DataError, FastLanguageModel, LoraModel, QLoRAUnavailable, Trainer, from_pretrained,
                           get_peft_model, merge, train)
from gyrfalcon.assets import TINY_CHAT_DATA, load_tiny_tokenizer
from gyrfalcon.generate import generate, generate_ids, stream
from gyrfalcon.lora import lora_layers, lora_parameters
from helpers import rel_err, tiny_config

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
    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")  # Unsloth's call
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


def randomize_adapters(model, seed=0):
    """Adapters that change the model's function (a fresh one is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def saved_base(folder, seed=0):
    """A tiny checkpoint with the tiny tokenizer, as from_pretrained loads a real one; returns the folder."""
    FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu", seed=seed).save_pretrained(folder)
    load_tiny_tokenizer().save_pretrained(str(folder))
    return folder


@torch.no_grad()
def greedy_by_forwards(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens recomputing the whole sequence each step: what any decoding must reproduce."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_generate_from_an_adapter_folder(tmp_path):
    model, tokenizer = from_pretrained(str(saved_base(tmp_path / "base")), device="cpu")
    plain = FalconH1ForCausalLM.from_pretrained(tmp_path / "base", device="cpu").eval()
    model = get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    randomize_adapters(model.base_model)
    model.save_pretrained(tmp_path / "adapter", tokenizer)

    reloaded, tokenizer = from_pretrained(str(tmp_path / "adapter"), device="cpu")
    assert isinstance(reloaded, LoraModel)
    prompt = list(tokenizer("The snow is").input_ids)
    expected = greedy_by_forwards(reloaded.eval(), prompt, 6)
    assert expected != greedy_by_forwards(plain, prompt, 6)  # the adapter changes the answer: it must be used
    completion = generate(reloaded, tokenizer, "The snow is", max_new_tokens=6, eos_token_id=[])
    assert completion.token_ids == expected and completion.prompt_tokens == len(prompt)
    streamed = list(stream(reloaded, tokenizer, "The snow is", max_new_tokens=6, eos_token_id=[]))
    assert "".join(event.text for event in streamed) == completion.text and streamed[-1].finished
    out = generate_ids(reloaded, torch.tensor([prompt]), max_new_tokens=6, eos_token_id=[])
    assert out.new_tokens == [expected]


def test_trainer_applies_the_checkpointing_settings_and_records_what_ran(tmp_path):
    model, tokenizer = from_pretrained(max_seq_length=64, device="cpu")

    def run(model, **settings):
        """(gradient checkpointing, offload) as the model trained, and as run.json records them."""
        output, seen = tmp_path / f"run{len(list(tmp_path.iterdir()))}", []

        def spy(loop, record):
            seen.append((loop.model.model.gradient_checkpointing, loop.model.model.offload_checkpoints))

        Trainer(model, tokenizer, ROWS, output=str(output), console=quiet(), callbacks=[spy],
                **{**FAST, "max_steps": 1}, **settings).train()
        config = json.loads((output / "run.json").read_text())["config"]
        return seen[0], (config["gradient_checkpointing"], config["offload_activations"])

    # given to the Trainer: applied (full fine-tuning: no get_peft_model to set it) and recorded
    assert run(model, gradient_checkpointing=True, offload_activations=True) == ((True, True),) * 2
    assert run(model, gradient_checkpointing=False) == ((False, False),) * 2
    # not given: get_peft_model's setting stands, and run.json records it; given: the Trainer's wins
    lora = get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    assert run(lora) == ((True, False),) * 2
    assert run(lora, gradient_checkpointing=False) == ((False, False),) * 2


def test_finetune_reads_the_data_before_loading_the_model(tmp_path, monkeypatch):
    import gyrfalcon.api as api

    bad = tmp_path / "bad.jsonl"
    bad.write_text(TINY_CHAT_DATA.read_text().splitlines()[0] + '\n{"messages": [{"role": "user"}]}\n')
    loads = []

    def loader(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the model was loaded before the data was read")

    monkeypatch.setattr(api, "load_base_model", loader)
    with pytest.raises(DataError, match="row 2"):
        api.finetune({"data": str(bad), "output": str(tmp_path / "run"), "progress": False}, console=quiet())
    assert loads == []


def test_qlora_adapter_saved_by_the_api_merges_onto_the_4bit_base(tmp_path, capsys):
    """An adapter from LoraModel.save_pretrained on a 4-bit base records it, so merge folds it into the dequantized
    4-bit weights (the QLoRA model's logits to fp32 rounding, the bound of tests/test_quant.py's QLoRA merge);
    without the record, merge takes the dense base and says so, and base_4bit=True forces the 4-bit one.
    from_pretrained of the folder says when it attaches such an adapter to the dense base."""
    pytest.importorskip("bitsandbytes")
    model, tokenizer = from_pretrained(str(saved_base(tmp_path / "base")), load_in_4bit=True, device="cpu")
    model = get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "in_proj", "out_proj", "down_proj"])
    randomize_adapters(model.base_model)
    with torch.no_grad():
        expected = model.eval()(ids()).logits
    model.save_pretrained(tmp_path / "adapter", tokenizer)
    record = tmp_path / "adapter" / "gyrfalcon_training.json"
    assert json.loads(record.read_text())["method"] == "qlora"
    capsys.readouterr()
    reloaded, _ = from_pretrained(str(tmp_path / "adapter"), load_in_4bit=True, device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids()).logits, expected)
    assert "load_in_4bit" not in capsys.readouterr().out
    from_pretrained(str(tmp_path / "adapter"), device="cpu")
    assert "trained on a 4-bit (QLoRA) base" in capsys.readouterr().out

    def merged(name, **options):
        console = quiet()
        merge(tmp_path / "adapter", tmp_path / name, console=console, **options)
        with torch.no_grad():
            logits = FalconH1ForCausalLM.from_pretrained(tmp_path / name, device="cpu")(ids()).logits
        return rel_err(logits, expected), " ".join(console.file.getvalue().split())

    error, said = merged("merged")
    assert error <= 1e-5 and "merged onto the dequantized 4-bit (NF4) base weights" in said
    assert "records a 4-bit (QLoRA) base" in said
    record.unlink()  # as an adapter written by another tool, or by gyrfalcon before the record
    error, said = merged("dense")
    assert error > 1e-2 and "merged onto the dense (unquantized) base weights" in said and "--base-4bit" in said
    error, said = merged("forced", base_4bit=True)
    assert error <= 1e-5 and "merged onto the dequantized 4-bit (NF4) base weights (as asked: --base-4bit)" in said


def test_save_pretrained_merged_takes_unsloths_save_method(tmp_path):
    model, tokenizer = from_pretrained(device="cpu")
    model = get_peft_model(model, r=2, target_modules=["q_proj"])
    for method, advice in (("lora", r"model.save_pretrained\(directory, tokenizer\)"),
                           ("merged_4bit", "load_in_4bit=True"), ("merged_4bit_forced", "load_in_4bit=True"),
                           ("gguf", "must be 'merged_16bit'")):
        with pytest.raises(ValueError, match=advice):
            model.save_pretrained_merged(tmp_path / method, tokenizer, save_method=method)
        assert not (tmp_path / method).exists()
    model.save_pretrained_merged(tmp_path / "merged", tokenizer, "merged_16bit")  # positional, as Unsloth allows
    assert (tmp_path / "merged" / "model.safetensors").exists()
