"""Model facts without loading weights: parameter counts by block and memory estimates (bf16, 4-bit NF4).

Counts come from the real module tree built on the meta device, so they match what `from_pretrained` allocates.
"""

from __future__ import annotations

from collections import Counter

import torch

from .config import FalconH1Config

# Linears inside the decoder layers: the weights QLoRA stores in 4-bit.
QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj")
# NF4 with double quantisation: 4 bits per weight, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmax.
NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)
GIB = 1024 ** 3


def block_of(name: str) -> str:
    """The block a parameter belongs to, for the counts table."""
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".mamba." in name:
        leaf = name.split(".mamba.", 1)[1].split(".")[0]
        return "mamba." + (leaf if leaf in ("in_proj", "out_proj", "conv1d") else "A_log/D/dt_bias/norm")
    if ".self_attn." in name:
        return "attention"
    if ".feed_forward." in name:
        return "mlp"
    return "norms"


def parameter_counts(config: FalconH1Config) -> dict[str, int]:
    """Parameters per block (tied embeddings counted once, under embedding)."""
    from .model import FalconH1ForCausalLM

    with torch.device("meta"):
        model = FalconH1ForCausalLM(config)
    counts: Counter = Counter()
    for name, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        counts[block_of(name)] += p.numel()
    return dict(counts)


def memory_estimates(config: FalconH1Config) -> dict[str, float]:
    """GiB of weights: all in bf16; and QLoRA-style with the layers' linears in NF4 and the rest in bf16."""
    from .model import FalconH1ForCausalLM

    with torch.device("meta"):
        model = FalconH1ForCausalLM(config)
    total = quant = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name.endswith(".weight") and name.split(".")[-2] in QUANTIZABLE:
            quant += p.numel()
    return {"bf16_gib": total * 2 / GIB, "nf4_gib": (quant * NF4_BITS_PER_WEIGHT / 8 + (total - quant) * 2) / GIB}


def config_summary(config: FalconH1Config) -> dict[str, object]:
    c = config
    rope = c.rope
    return {
        "hidden_size": c.hidden_size, "layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
        "attention": f"{c.num_attention_heads} heads x {c.attn_head_dim}, {c.num_key_value_heads} KV heads",
        "mamba": (f"{c.mamba_n_heads} heads x {c.mamba_head_dim}, d_state {c.mamba_d_state}, "
                  f"{c.mamba_n_groups} group(s), conv {c.mamba_d_conv}, chunk {c.mamba_chunk_size}"),
        "mamba_norm": ("gated RMSNorm, " + ("norm then gate" if c.mamba_norm_before_gate else "gate then norm"))
        if c.mamba_rms_norm else "y * silu(z)",
        "mlp": f"SwiGLU {c.hidden_size} -> {c.intermediate_size}",
        "rope": f"{rope['rope_type']}, theta {rope['rope_theta']:g}"
        + (f", factor {rope['factor']}" if "factor" in rope else ""),
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "multipliers": {
            "embedding": c.embedding_multiplier, "lm_head": c.lm_head_multiplier, "key": c.key_multiplier,
            "attention_in": c.attention_in_multiplier, "attention_out": c.attention_out_multiplier,
            "ssm_in": c.ssm_in_multiplier, "ssm_out": c.ssm_out_multiplier, "mlp (gate, down)": c.mlp_multipliers,
            "ssm (z, x, B, C, dt)": c.ssm_multipliers,
        },
    }
