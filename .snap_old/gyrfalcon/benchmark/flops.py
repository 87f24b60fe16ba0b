"""Model FLOPs and decode bytes counted from a FalconH1Config: the roofline denominators of the benchmarks.

Forward FLOPs per token, at sequence length l (a multiply-add counts 2):
    matmuls     2 x (weights of every linear of the layers: q, k, v, o, in_proj, out_proj, gate, up, down)
                + 2 x hidden x vocab for the lm_head, for each position whose logits are computed
    attention   per layer 2 * l * head_dim * n_heads: QK^T and PV of one query against l keys is 4*l*d per
                head; causal masking halves it (a query sees l/2 keys on average)
    SSD         per layer, chunk q = min(chunk_size, l), h heads of size p, state n, g groups:
                  g*q*n          C_i.B_j inside the chunk (q/2 pairs per token, causal, 2n each)
                + h*q*p          the masked product (C.B * decay) @ (dt x) inside the chunk (q/2 pairs, 2p each)
                + 2*h*p*n        the chunk's own state: sum_j decay_j dt_j x_j B_j^T
                + 2*h*p*n / q    passing the state from chunk to chunk
                + 2*h*p*n        state -> output: C_i . S_in
Not counted: the embedding gather, norms, activations, RoPE, the depthwise conv, softmax, the loss, the decay
factors' exponentials: all O(width) per token, under 1% of the total at the released shapes.

Training FLOPs = 3 x forward, the usual model-FLOPs convention (backward = activation gradients + weight gradients,
each about one forward). With LoRA the frozen base weights get no weight gradient, but activation checkpointing
recomputes the forward, so the work done is again about 3 x forward; the count excludes that recomputation and the
rank-16 adapters (under 1%), exactly as model-FLOPs utilisation of full fine-tuning would.

Decode bytes per step (batch b, KV context t), the memory a one-token step must move at least:
    weights     every parameter once at `weight_bytes` (the embedding table only for the b rows gathered,
                unless it is tied to the lm_head, which reads it whole)
    KV cache    per layer: read t positions and write 1, of K and V: 2 * kv_heads * head_dim * (t + 1) * b
    SSM state   per layer: read and write b * h * p * n at `state_bytes` (fp32)
    conv state  per layer: read and write b * conv_dim * (d_conv - 1)
Activations and logits are not counted (O(b * width), under 1%).
"""

from __future__ import annotations

from ..config import FalconH1Config

# Dense bf16 peak of one H100 SXM (no sparsity) and its HBM3 bandwidth: the default roofline denominators.
H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12


def layer_linear_weights(cfg: FalconH1Config) -> int:
    """Weights (no biases) of the nn.Linear modules of one decoder layer."""
    hidden, d = cfg.hidden_size, cfg.attn_head_dim
    attention = hidden * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)   # q, o + k, v
    mamba = hidden * cfg.in_proj_size + cfg.d_ssm * hidden                                # in_proj, out_proj
    mlp = 3 * hidden * cfg.intermediate_size                                              # gate, up, down
    return attention + mamba + mlp


def parameter_count(cfg: FalconH1Config) -> int:
    """All parameters of FalconH1ForCausalLM, tied embeddings counted once (checked against the module tree)."""
    hidden = cfg.hidden_size
    d = cfg.attn_head_dim
    biases = 0
    if cfg.attention_bias:
        biases += d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + hidden   # q, k, v + o
    if cfg.mamba_proj_bias:
        biases += cfg.in_proj_size
    if cfg.projectors_bias:
        biases += hidden
    if cfg.mlp_bias:
        biases += 2 * cfg.intermediate_size + hidden
    conv = cfg.conv_dim * cfg.mamba_d_conv + (cfg.conv_dim if cfg.mamba_conv_bias else 0)
    per_head = 3 * cfg.mamba_n_heads                                            # dt_bias, A_log, D
    norms = 2 * hidden + (cfg.d_ssm if cfg.mamba_rms_norm else 0)
    layer = layer_linear_weights(cfg) + biases + conv + per_head + norms
    embedding = cfg.vocab_size * hidden
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * hidden
    return embedding + cfg.num_hidden_layers * layer + hidden + lm_head


def attention_flops_per_token(cfg: FalconH1Config, seqlen: int) -> float:
    """Causal attention of all layers, per token, averaged over a sequence of `seqlen` tokens."""
    return cfg.num_hidden_layers * 2.0 * seqlen * cfg.attn_head_dim * cfg.num_attention_heads


def ssd_flops_per_token(cfg: FalconH1Config, seqlen: int) -> float:
    """The chunked SSD scan of all layers, per token (see the module docstring for the terms)."""
    q = min(cfg.mamba_chunk_size, seqlen)
    h, p, n, g = cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_d_state, cfg.mamba_n_groups
    per_layer = g * q * n + h * q * p + 4.0 * h * p * n + 2.0 * h * p * n / q
    return cfg.num_hidden_layers * per_layer


def forward_flops(cfg: FalconH1Config, batch: int, seqlen: int, *, logits: str = "all") -> float:
    """FLOPs of one forward over `batch` sequences of `seqlen` tokens. logits: "all" positions (training) or
    "last" (prefill with logits_to_keep=1)."""
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    tokens = batch * seqlen
    per_token = (2.0 * cfg.num_hidden_layers * layer_linear_weights(cfg)
                 + attention_flops_per_token(cfg, seqlen) + ssd_flops_per_token(cfg, seqlen))
    logit_rows = tokens if logits == "all" else batch
    return tokens * per_token + logit_rows * 2.0 * cfg.hidden_size * cfg.vocab_size


def train_flops(cfg: FalconH1Config, batch: int, seqlen: int) -> float:
    """Model FLOPs of one training step: 3 x the forward with all logits (see the module docstring)."""
    return 3.0 * forward_flops(cfg, batch, seqlen, logits="all")


def decode_bytes_per_step(cfg: FalconH1Config, batch: int, context: float, *, weight_bytes: int = 2,
                          cache_bytes: int = 2, state_bytes: int = 4) -> dict[str, float]:
    """Bytes one decode step must move for `batch` rows with `context` cached positions; a dict with the parts
    (weights, kv_cache, ssm_state, conv_state) and their `total`."""
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    params = parameter_count(cfg)
    gathered = 0 if cfg.tie_word_embeddings else cfg.vocab_size * hidden       # the table, read by rows only
    weights = (params - gathered) * weight_bytes + batch * hidden * weight_bytes
    kv = layers * 2 * cfg.num_key_value_heads * cfg.attn_head_dim * (context + 1) * batch * cache_bytes
    ssm = layers * 2 * batch * cfg.mamba_n_heads * cfg.mamba_head_dim * cfg.mamba_d_state * state_bytes
    conv = layers * 2 * batch * cfg.conv_dim * (cfg.mamba_d_conv - 1) * cache_bytes
    parts = {"weights": float(weights), "kv_cache": float(kv), "ssm_state": float(ssm), "conv_state": float(conv)}
    parts["total"] = sum(parts.values())
    return parts


def mean_decode_context(prompt: int, new_tokens: int) -> float:
    """Mean KV context of the steps a decode timing covers: (T(new) - T(1)) / (new - 1) times the steps that
    produce tokens 2..new, whose contexts run from prompt + 1 to prompt + new - 1."""
    return prompt + new_tokens / 2.0
