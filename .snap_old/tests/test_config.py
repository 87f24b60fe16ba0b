"""FalconH1Config: fields and defaults as transformers reads them, lossless config.json round trips, derived sizes,
presets, and clear errors for configs that do not describe a Falcon-H1."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from gyrfalcon import PRESETS, ConfigError, FalconH1Config, FalconH1ForCausalLM
from helpers import tiny_config


def test_transformers_written_config_reads_with_same_meaning(tmp_path):
    hf = transformers.FalconH1Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, mamba_d_ssm=96, mamba_n_heads=6, mamba_d_state=8,
                                     mamba_n_groups=3, vocab_size=300, ssm_multipliers=[1.0, 2.0, 3.0, 4.0, 5.0],
                                     mlp_multipliers=[0.5, 2.0], key_multiplier=0.25, mamba_rms_norm=True)
    hf.save_pretrained(tmp_path)
    ours = FalconH1Config.from_pretrained(tmp_path)
    assert ours.mamba_head_dim == hf.mamba_d_head == 16
    assert ours.d_ssm == 96 and ours.conv_dim == 96 + 2 * 3 * 8 and ours.in_proj_size == 96 + ours.conv_dim + 6
    assert ours.ssm_multipliers == [1, 2, 3, 4, 5] and ours.mlp_multipliers == [0.5, 2.0]
    assert ours.time_step_limit == (0.0, math.inf)  # written by transformers 5 as {"__float__": "Infinity"}
    assert ours.rope["rope_type"] == "default" and ours.rope["rope_theta"] == hf.rope_parameters["rope_theta"]
    for key, value in json.loads((tmp_path / "config.json").read_text()).items():
        if key not in ("time_step_limit",):
            assert ours.to_dict()[key] == value, key


def test_round_trip_keeps_unknown_keys_and_values(tmp_path):
    data = tiny_config().to_dict()
    data.update({"architectures": ["FalconH1ForCausalLM"], "torch_dtype": "bfloat16", "mamba_use_mlp": True,
                 "attn_layer_indices": None, "custom_field": {"nested": [1, 2]}, "mamba_d_head": "auto"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    config = FalconH1Config.from_pretrained(path)
    assert config.extra["custom_field"] == {"nested": [1, 2]}
    config.to_json_file(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())


def test_gyrfalcon_config_reads_in_transformers_with_same_derived_sizes():
    for name in PRESETS:
        ours = FalconH1Config.from_preset(name)
        hf = transformers.FalconH1Config.from_dict(ours.to_dict())
        assert hf.mamba_d_head == ours.mamba_head_dim, name
        assert hf.head_dim == ours.attn_head_dim, name
        assert hf.rope_parameters["rope_theta"] == ours.rope["rope_theta"], name


def test_derived_sizes_auto_head_and_expand():
    config = tiny_config(mamba_d_ssm=None, mamba_expand=3, mamba_n_heads=6, mamba_d_head="auto")
    assert config.d_ssm == 3 * 64 and config.mamba_head_dim == 32
    assert tiny_config(head_dim=None).attn_head_dim == 64 // 4


def test_rope_forms():
    assert tiny_config(rope_theta=5e5).rope == {"rope_type": "default", "rope_theta": 5e5}
    legacy = tiny_config(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope == {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    new = tiny_config(rope_theta=None, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    assert new.rope["original_max_position_embeddings"] == new.max_position_embeddings
    assert new.to_dict()["rope_parameters"]["rope_type"] == "yarn" and "rope_theta" not in new.to_dict()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_are_consistent(name):
    config = FalconH1Config.from_preset(name)
    assert config.mamba_n_heads * config.mamba_head_dim == config.d_ssm
    with torch.device("meta"):
        model = FalconH1ForCausalLM(config)
    layer = model.model.layers[0]
    assert layer.mamba.in_proj.weight.shape == (config.in_proj_size, config.hidden_size)
    assert layer.self_attn.q_proj.weight.shape == (config.num_attention_heads * config.attn_head_dim,
                                                   config.hidden_size)


def test_released_shapes_match_the_reference_table():
    # spot checks against the published Falcon-H1 table (layers, width, heads, Mamba heads x head dim, d_state)
    assert (PRESETS["0.5B"]["num_hidden_layers"], PRESETS["0.5B"]["hidden_size"]) == (36, 1024)
    assert (PRESETS["7B"]["mamba_n_heads"], PRESETS["7B"]["mamba_d_head"], PRESETS["7B"]["mamba_d_state"]) == (24, 128,
                                                                                                              256)
    assert PRESETS["34B"]["mamba_n_groups"] == 2 and PRESETS["34B"]["num_hidden_layers"] == 72


def test_tiny_preset_exercises_every_multiplier():
    config = FalconH1Config.from_preset("tiny")
    scalars = [config.embedding_multiplier, config.lm_head_multiplier, config.key_multiplier,
               config.attention_out_multiplier, config.ssm_in_multiplier, config.ssm_out_multiplier]
    assert all(v != 1.0 for v in scalars + config.mlp_multipliers + config.ssm_multipliers)


@pytest.mark.parametrize("changes, message", [
    ({"mamba_n_heads": 5}, "mamba_n_heads (5) must divide"),
    ({"num_key_value_heads": 3}, "num_key_value_heads (3) must divide num_attention_heads"),
    ({"mamba_n_groups": 3}, "mamba_n_groups (3) must divide mamba_n_heads"),
    ({"mamba_d_head": 8}, "mamba_d_head (8) * mamba_n_heads (4) must equal d_ssm (64)"),
    ({"head_dim": None, "num_attention_heads": 5, "num_key_value_heads": 5}, "num_attention_heads (5) must divide"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"ssm_multipliers": [1.0, 1.0]}, "ssm_multipliers must hold 5 values"),
    ({"mlp_multipliers": [1.0]}, "mlp_multipliers must hold 2 values"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope type 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a positive 'factor'"),
    ({"time_step_limit": [1.0, 0.5]}, "time_step_limit must be (min, max)"),
])
def test_invalid_configs_name_the_problem(changes, message):
    data = tiny_config().to_dict()
    data.update(changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        FalconH1Config.from_dict(data)


def test_wrong_model_type_and_missing_fields(tmp_path):
    data = tiny_config().to_dict()
    with pytest.raises(ConfigError, match="model_type is 'llama'.*Falcon-H1"):
        FalconH1Config.from_dict({**data, "model_type": "llama"})
    del data["hidden_size"], data["vocab_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config.json: required field\(s\) missing: vocab_size, hidden_size"):
        FalconH1Config.from_pretrained(tmp_path)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        FalconH1Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        FalconH1Config.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        FalconH1Config.from_preset("huge")
