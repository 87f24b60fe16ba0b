"""Checkpoint I/O: round trips (single file and sharded), loading on the meta device, precision policy, atomic and
non-destructive saving, and an error naming the problem for every kind of bad checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import gyrfalcon.model
from gyrfalcon import CheckpointError, FalconH1ForCausalLM
from gyrfalcon.checkpoint import parse_size
from helpers import randomize_, rel_err, tiny_config


@pytest.fixture
def saved(tmp_path):
    """A random tiny gyrfalcon model saved as a checkpoint folder; returns (model, folder)."""
    model = randomize_(FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu"), seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_round_trip_is_exact(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = FalconH1ForCausalLM.from_pretrained(folder, dtype=torch.float32, device="cpu")
    assert same_weights(model, loaded)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["FalconH1ForCausalLM"]


def test_sharded_save_loads_in_gyrfalcon_and_transformers(tmp_path):
    model = randomize_(FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu"), seed=1)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "sharded" / s).exists() for s in shards)
    assert same_weights(model, FalconH1ForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32,
                                                                    device="cpu"))
    hf = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(input_ids=ids).logits) <= 1e-5


def test_loads_on_meta_without_random_init(saved, monkeypatch):
    """from_pretrained builds the module tree on the meta device: no initialisation ever touches real memory."""
    _, folder = saved
    real_memory_inits = []

    def spy(original):
        def reset_parameters(module):
            if not module.weight.is_meta:
                real_memory_inits.append(type(module).__name__)
            return original(module)
        return reset_parameters

    def forbidden(*args, **kwargs):
        raise AssertionError("from_pretrained initialised weights randomly")

    monkeypatch.setattr(gyrfalcon.model.FalconH1ForCausalLM, "init_weights", forbidden)
    for cls in (torch.nn.Linear, torch.nn.Embedding):
        monkeypatch.setattr(cls, "reset_parameters", spy(cls.reset_parameters))
    FalconH1ForCausalLM.from_pretrained(folder, device="cpu")
    assert real_memory_inits == []


def test_dtype_policy(saved):
    _, folder = saved
    default = FalconH1ForCausalLM.from_pretrained(folder, device="cpu")
    assert default.dtype == torch.float32  # CPU default
    bf16 = FalconH1ForCausalLM.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in bf16.named_parameters()}
    assert dtypes["model.layers.0.mamba.A_log"] == torch.float32  # SSM decay/step parameters stay fp32
    assert dtypes["model.layers.0.mamba.D"] == dtypes["model.layers.0.mamba.dt_bias"] == torch.float32
    assert dtypes["model.layers.0.mamba.in_proj.weight"] == dtypes["lm_head.weight"] == torch.bfloat16


def test_tied_embeddings_saved_once_and_tied_after_load(tmp_path):
    model = FalconH1ForCausalLM.from_config(tiny_config(tie_word_embeddings=True), dtype=torch.float32, device="cpu")
    model.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    loaded = FalconH1ForCausalLM.from_pretrained(tmp_path / "tied", device="cpu")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_refuses_to_overwrite_and_replaces_when_asked(saved):
    model, folder = saved
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists.*overwrite=True"):
        model.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    model.save_pretrained(folder, overwrite=True)
    assert not (folder / "notes.txt").exists() and (folder / "model.safetensors").exists()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gyrfalcon.checkpoint, "_write_config", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mamba.A_log"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing.*model\.layers\.1\.mamba\.A_log"):
        FalconH1ForCausalLM.from_pretrained(folder, device="cpu")


def test_unexpected_tensor_is_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.mamba.extra_thing": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.0\.mamba\.extra_thing"):
        FalconH1ForCausalLM.from_pretrained(folder, device="cpu")


def test_wrong_shape_is_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 64)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[32, 64\].*"
                                              r"implies \[64, 64\]"):
        FalconH1ForCausalLM.from_pretrained(folder, device="cpu")


def test_truncated_file_is_named(saved):
    _, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file, truncated or corrupt"):
        FalconH1ForCausalLM.from_pretrained(folder, device="cpu")


def test_corrupt_header_is_named(saved):
    _, folder = saved
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:16] = b"#garbage"
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        FalconH1ForCausalLM.from_pretrained(folder, device="cpu")


def test_missing_shard_is_named(tmp_path):
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu")
    model.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    second = sorted((tmp_path / "s").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=rf"{second.name}: shard named in .* is missing"):
        FalconH1ForCausalLM.from_pretrained(tmp_path / "s", device="cpu")


def test_pickle_checkpoints_are_refused(saved):
    _, folder = saved
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*safetensors only"):
        FalconH1ForCausalLM.from_pretrained(folder, device="cpu")


def test_bad_locations(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no such folder, and not a hub id"):
        FalconH1ForCausalLM.from_pretrained(tmp_path / "nowhere" / "deeper", device="cpu")
    with pytest.raises(CheckpointError, match="is a file"):
        FalconH1ForCausalLM.from_pretrained(saved[1] / "config.json", device="cpu")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((saved[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        FalconH1ForCausalLM.from_pretrained(tmp_path / "empty", device="cpu")
    # HF_HUB_OFFLINE is set for the tests: a hub id that is not cached fails with advice, not a traceback
    with pytest.raises(CheckpointError, match="could not fetch 'tiiuae/not-a-model' from the Hugging Face hub"):
        FalconH1ForCausalLM.from_pretrained("tiiuae/not-a-model", device="cpu")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3 and parse_size(123) == 123
    assert parse_size("100KB") == 100_000
    with pytest.raises(ValueError, match="cannot read a size"):
        parse_size("lots")
