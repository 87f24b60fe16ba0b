"""Presets: the shapes of every released Falcon-H1 size, plus `tiny` for tests and the demo.

Used to build random-init models for benchmarks and tests (no checkpoint needed) and by `gyrfalcon info`.
Where the public sources do not give a value, a stand-in is used and marked in `PRESET_NOTES`: the µP multipliers
are known for 0.5B only and serve every size; vocab and intermediate sizes of 1.5B and 3B are guesses.
A real checkpoint's own config.json always wins over a preset.
"""

from __future__ import annotations

# µP multipliers of Falcon-H1-0.5B; stand-ins for the other sizes (their own config.json carries theirs).
_MULTIPLIERS_05B = {
    "embedding_multiplier": 5.656854, "lm_head_multiplier": 0.0390625, "key_multiplier": 0.390625,
    "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375, "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.2357023, "mlp_multipliers": [0.8838835, 0.5859375],
    "ssm_multipliers": [0.3535534, 0.25, 0.3535534, 0.5, 0.3535534],
}

_COMMON = {
    "mamba_d_conv": 4, "mamba_d_head": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False,
    "rope_theta": 1e11, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "time_step_limit": [0.0, float("inf")],
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 11, "attention_bias": False, "mlp_bias": False,
    "projectors_bias": False, "hidden_act": "silu",
}


def _shape(vocab, hidden, layers, heads, kv, head_dim, inter, d_ssm, m_heads, m_head, state, groups, chunk,
           rms_norm, max_pos):
    return {**_COMMON, **_MULTIPLIERS_05B, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "intermediate_size": inter, "mamba_d_ssm": d_ssm, "mamba_n_heads": m_heads, "mamba_d_head": m_head,
            "mamba_d_state": state, "mamba_n_groups": groups, "mamba_chunk_size": chunk,
            "mamba_rms_norm": rms_norm, "mamba_norm_before_gate": False, "max_position_embeddings": max_pos}


PRESETS: dict[str, dict] = {
    #                  vocab   hidden layers heads kv hd  inter  d_ssm mh  mhd state g  chunk rmsnorm max_pos
    "0.5B": _shape(32784, 1024, 36, 8, 2, 64, 2048, 1536, 24, 64, 128, 1, 128, False, 16384),
    "1.5B": _shape(65537, 2048, 24, 8, 2, 128, 6144, 3072, 48, 64, 256, 1, 128, True, 131072),
    "1.5B-Deep": _shape(65537, 1280, 66, 6, 2, 128, 3072, 1536, 24, 64, 256, 1, 128, True, 131072),
    "3B": _shape(65537, 2560, 32, 10, 2, 128, 10240, 4096, 32, 128, 256, 1, 128, True, 131072),
    "7B": _shape(130049, 3072, 44, 12, 2, 128, 12288, 3072, 24, 128, 256, 1, 256, True, 262144),
    "34B": _shape(261120, 5120, 72, 20, 4, 128, 21504, 4096, 32, 128, 256, 2, 128, True, 262144),
    # Small enough for CPU tests and the demo; several chunks at short lengths; every multiplier non-unit.
    "tiny": {**_shape(512, 64, 2, 4, 2, 16, 128, 64, 4, 16, 16, 1, 16, True, 4096),
             "eos_token_id": 2},  # the ids of its bundled tokenizer (gyrfalcon/resources/tiny): pad 0, bos 1, eos 2
}

PRESET_NOTES: dict[str, str] = {
    "0.5B": "eos_token_id 11 as released",
    "1.5B": "vocab_size and intermediate_size are guesses; multipliers are 0.5B's",
    "1.5B-Deep": "multipliers are 0.5B's",
    "3B": "vocab_size and intermediate_size are guesses; multipliers are 0.5B's",
    "7B": "multipliers are 0.5B's",
    "34B": "mamba_n_groups 2 (one source says 1); multipliers are 0.5B's",
    "tiny": "test and demo model; its tokenizer and chat dataset ship in gyrfalcon/resources/tiny",
}
