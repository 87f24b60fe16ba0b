"""PEFT adapter files both ways: a gyrfalcon adapter loaded by PEFT + transformers, and a PEFT-written adapter
(rank_pattern / alpha_pattern, rsLoRA) loaded by gyrfalcon, give the same logits; adapters on the Mamba out_proj
round-trip in gyrfalcon; gyrfalcon's adapter folders record whether their base was 4-bit (PEFT's have no record);
merge writes a checkpoint transformers loads with the adapter model's logits; bad adapter folders are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.api import merge, save_merged
from gyrfalcon.lora import ALL_TARGETS, apply_lora, lora_layers, lora_parameters
from gyrfalcon.peft_io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_INFO, AdapterError, adapter_config,
                              base_was_4bit, load_adapter, save_adapter)
from helpers import hf_model, rel_err, tiny_config

NO_OUT_PROJ = [t for t in ALL_TARGETS if t != "out_proj"]  # PEFT refuses the Mamba out_proj on Falcon-H1


def randomize_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture()
def base(tmp_path):
    """A random tiny transformers model saved as a checkpoint; returns (config, folder)."""
    config = tiny_config()
    hf_model(config, seed=0).save_pretrained(tmp_path / "base")
    return config, tmp_path / "base"


def ours_from(folder):
    return FalconH1ForCausalLM.from_pretrained(folder, device="cpu", dtype=torch.float32)


def ids_for(config):
    return torch.randint(0, config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("rslora", [False, True])
def test_gyrfalcon_adapter_loads_in_peft_with_the_same_logits(base, tmp_path, rslora):
    peft = pytest.importorskip("peft")
    import transformers

    config, folder = base
    ours = apply_lora(ours_from(folder), r=4, alpha=8, targets=NO_OUT_PROJ, rslora=rslora, dropout=0.05)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["use_rslora"] is rslora and saved["r"] == 4 and saved["lora_alpha"] == 8
    assert sorted(saved["target_modules"]) == sorted(NO_OUT_PROJ) and saved["lora_dropout"] == 0.05

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = ids_for(config)
    with torch.no_grad():
        expected = ours.eval()(ids).logits
        assert rel_err(peft_model(input_ids=ids).logits, expected) <= 1e-5


def test_peft_adapter_with_patterns_loads_in_gyrfalcon_with_the_same_logits(base, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    config, folder = base
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "in_proj", "down_proj"],
                                  rank_pattern={"layers.1.mamba.in_proj": 6}, alpha_pattern={"down_proj": 3},
                                  use_rslora=True, layers_to_transform=[0, 1])
    peft_model = peft.get_peft_model(hf, lora_config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    assert base_was_4bit(tmp_path / "peft-adapter") is None  # PEFT writes no record: merge must be told or assume
    ours = load_adapter(ours_from(folder), tmp_path / "peft-adapter")
    layers = lora_layers(ours)
    assert layers["model.layers.1.mamba.in_proj"].r == 6 and layers["model.layers.0.mamba.in_proj"].r == 4
    assert layers["model.layers.0.feed_forward.down_proj"].alpha == 3
    assert not any(p.requires_grad for p in ours.parameters())
    ids = ids_for(config)
    with torch.no_grad():
        assert rel_err(ours.eval()(ids).logits, peft_model.eval()(input_ids=ids).logits) <= 1e-5


def test_out_proj_adapter_round_trips_in_gyrfalcon(tmp_path):
    config = tiny_config()
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=0)
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, r=3, alpha=5, targets=("out_proj", "gate_proj"))
    randomize_adapters(model, seed=1)
    save_adapter(model, tmp_path / "adapter")
    config_file = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config_file["target_modules"] == ["gate_proj", "out_proj"]
    assert json.loads((tmp_path / "adapter" / TRAINING_INFO).read_text()) == {"method": "lora", "base_model": None}
    assert base_was_4bit(tmp_path / "adapter") is False
    reloaded = load_adapter(ours_from(tmp_path / "base"), tmp_path / "adapter", trainable=True)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == set(lora_parameters(model))
    ids = ids_for(config)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_merge_gives_a_checkpoint_transformers_loads_with_the_adapter_models_logits(base, tmp_path):
    import transformers

    config, folder = base
    ours = apply_lora(ours_from(folder), r=4, alpha=8)  # every target, the Mamba out_proj included
    randomize_adapters(ours, seed=5)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    ids = ids_for(config)
    with torch.no_grad():
        expected = ours.eval()(ids).logits
    merge(tmp_path / "adapter", tmp_path / "merged", console=None)
    save_merged(ours, tmp_path / "merged-copy")  # the API path: the model in memory stays as it was
    assert lora_layers(ours) and not any(layer.merged for layer in lora_layers(ours).values())
    for out in ("merged", "merged-copy"):
        files = {p.name for p in (tmp_path / out).iterdir()}
        assert "model.safetensors" in files and not any("adapter" in f for f in files)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert rel_err(hf(input_ids=ids).logits, expected) <= 1e-5, out
    with pytest.raises(Exception, match="already exists"):
        merge(tmp_path / "adapter", tmp_path / "merged")


def test_bad_adapter_folders(tmp_path):
    config = tiny_config()
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=0)
    apply_lora(model, r=2, alpha=2, targets=("q_proj",))
    save_adapter(model, tmp_path / "a")

    def fresh(**changes):
        return FalconH1ForCausalLM.from_config(tiny_config(**changes), dtype=torch.float32, device="cpu")

    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="already has LoRA adapters"):
        load_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="trained on a different base model"):
        load_adapter(fresh(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    with pytest.raises(AdapterError, match="no adapter_config.json.*full model checkpoint"):
        load_adapter(fresh(), tmp_path / "b")
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="uses DoRA"):
        load_adapter(fresh(), tmp_path / "dora")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="only pickle adapter weights"):
        load_adapter(fresh(), tmp_path / "pickle")
    (tmp_path / "a" / TRAINING_INFO).write_text("{not json")
    with pytest.raises(AdapterError, match="gyrfalcon_training.json: not valid JSON"):
        base_was_4bit(tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes(b"truncated")
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(fresh(), tmp_path / "a")
    with pytest.raises(AdapterError, match="no LoRA adapters to save"):
        adapter_config(fresh())
