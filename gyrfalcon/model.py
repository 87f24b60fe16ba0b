"""The Falcon-H1 network in readable PyTorch. All compute goes through `gyrfalcon.ops`.

Every decoder layer runs a Mamba-2 mixer and a grouped-query attention in parallel on the same normalised input,
scales each by its µP multiplier and adds both to the residual; then an RMSNorm and a SwiGLU MLP:

    h = x + ssm_out_mult * Mamba(norm(x)) + attn_out_mult * Attention(attn_in_mult * norm(x))
    y = h + down_mult * down(up(norm(h)) * silu(gate_mult * gate(norm(h))))

Parameter names are the checkpoints' own (`model.layers.N.mamba.in_proj.weight`, ...), so Hugging Face
checkpoints load with no conversion (see checkpoint.py). transformers' FalconH1ForCausalLM is the numerical oracle.

Shapes: input_ids (b, l); attention_mask (b, l) with 1 for tokens and 0 for (left) padding; logits (b, l, vocab).

Decoding: `forward(..., cache=HybridCache)` appends the tokens to a cache (a prefill, in one piece or several) and
`decode_step(ids (b,), cache, kv_len)` runs one token per row without reading anything back (CUDA-graph safe); see
cache.py. Without a cache, nothing of that path runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from . import ops
from .activation_offload import offloaded_checkpoint
from .config import FalconH1Config
from .lora_autograd import LoRAParts, group_parts, lora_group, project

if TYPE_CHECKING:
    from .cache import HybridCache, LayerCache

# Tiny per-head parameters kept in fp32 whatever the model dtype: they set the SSM's decay and step size.
FP32_PARAMETERS = ("A_log", "D", "dt_bias")


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class CausalConv1d(nn.Module):
    """Holds the depthwise conv's parameters under the checkpoint's names: weight (channels, 1, kernel), bias."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None


class Attention(nn.Module):
    def __init__(self, config: FalconH1Config):
        super().__init__()
        d, hq, hk = config.attn_head_dim, config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.num_heads, self.num_kv_heads = d, hq, hk
        self.q_proj = nn.Linear(config.hidden_size, hq * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, hk * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, hk * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(hq * d, config.hidden_size, bias=config.attention_bias)
        self.key_multiplier = config.key_multiplier
        self.in_multiplier = config.attention_in_multiplier
        self.dropout = config.attention_dropout

    def forward(self, x, cos, sin, padding_mask=None, seq_idx=None, cache: LayerCache | None = None):
        """x (b, l, hidden): the normed input, before the attention_in multiplier (applied here)."""
        if cache is not None and cache.decoding:
            return self._decode(x, cos, sin, cache)
        q, k, v = self._rotated_qkv(x * self.in_multiplier, cos, sin, self.key_multiplier)
        if cache is not None:
            # The cache stores the new keys (rotated, multiplied) and values, then attends over all cached ones.
            o = cache.attend(q, k, v, scale=self.head_dim ** -0.5)
        else:
            o = self._attention(q, k, v, self.head_dim ** -0.5, padding_mask, seq_idx)
        return self._out(o)

    def unscaled(self, x, cos, sin, padding_mask=None, seq_idx=None) -> tuple[torch.Tensor, float]:
        """(out, factor) with forward(x) == out * factor, without a cache. With bias-free projections (all released
        Falcon-H1 models) they are linear, so the input factor a need not scale x: a on q and a * key_multiplier on
        k go into the softmax scale, and a on v becomes the returned factor (which the decoder layer folds into the
        attention_out factor of its residual mix). That saves the passes over x and k (forward, recomputation and
        backward) that the factors would otherwise cost in training."""
        if not self._bias_free():
            return self.forward(x, cos, sin, padding_mask, seq_idx), 1.0
        return self.unscaled_from_projections(*project(x, [self.q_proj, self.k_proj, self.v_proj]), cos, sin,
                                              padding_mask, seq_idx)

    def unscaled_from_projections(self, q, k, v, cos, sin, padding_mask=None, seq_idx=None):
        """unscaled(x) from the bias-free projections of x: q (b, l, hq * d), k, v (b, l, hk * d) (a caller may make
        them in one group with other projections of x: DecoderLayer)."""
        a = self.in_multiplier
        q, k, v = self._rotate(q, k, v, cos, sin, None)
        o = self._attention(q, k, v, self.head_dim ** -0.5 * a * a * self.key_multiplier, padding_mask, seq_idx)
        return self._out(o), a

    def _bias_free(self) -> bool:
        return self.q_proj.bias is None and self.k_proj.bias is None and self.v_proj.bias is None

    def _rotated_qkv(self, x, cos, sin, key_factor: float | None):
        """q (b, hq, l, d), k, v (b, hk, l, d) from x (b, l, hidden): RoPE on q and k, k times key_factor (if any)
        before it."""
        return self._rotate(*project(x, [self.q_proj, self.k_proj, self.v_proj]), cos, sin, key_factor)

    def _rotate(self, q, k, v, cos, sin, key_factor: float | None):
        """Heads of the projections q (b, l, hq * d), k, v (b, l, hk * d) -> q (b, hq, l, d), k, v (b, hk, l, d):
        RoPE on q and k, k times key_factor (if any) before it."""
        b, l, _ = q.shape
        q = q.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if key_factor is not None:
            k = k * key_factor
        v = v.view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = ops.apply_rope(q, k, cos, sin)
        return q, k, v

    def _attention(self, q, k, v, scale: float, padding_mask, seq_idx):
        return ops.attention(q, k, v, scale=scale, key_padding_mask=padding_mask, doc_ids=seq_idx,
                             dropout_p=self.dropout if self.training else 0.0)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj of the heads' outputs o (b, hq, l, d), back to (b, l, hidden)."""
        b, _, l, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, l, -1))

    def _decode(self, x, cos, sin, cache: LayerCache):
        """One token per row: the projections (with an input bias, after the input factor), then decode_attend."""
        b = x.shape[0]
        a = self.in_multiplier
        if not self._bias_free():
            x, a = x * a, 1.0
        o = self.decode_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, cache, a)
        return self.o_proj(o.reshape(b, 1, -1))

    def decode_attend(self, q, k, v, cos, sin, cache: LayerCache, in_factor: float) -> torch.Tensor:
        """A decode step's attention from the projections q (b, [1,] hq * d), k, v (b, [1,] hk * d) (last dim
        contiguous): RoPE, the µP factors and the cache writes in one fused op, then attention. Without biases the
        projections are linear, so the input factor a (in_factor) is applied to their outputs inside that op (q and
        v times a, k times a * key_multiplier) rather than in a pass of its own over x. Returns (b, hq, 1, d)."""
        b = q.shape[0]
        return cache.decode_attend(q.view(b, self.num_heads, self.head_dim),
                                   k.view(b, self.num_kv_heads, self.head_dim),
                                   v.view(b, self.num_kv_heads, self.head_dim),
                                   cos[:, 0], sin[:, 0], q_factor=in_factor, key_factor=in_factor * self.key_multiplier,
                                   v_factor=in_factor, scale=self.head_dim ** -0.5)


class MambaMixer(nn.Module):
    """in_proj -> z | xBC | dt (each block scaled by its ssm_multiplier) -> causal conv + SiLU on xBC ->
    SSD scan -> gate (y * silu(z), or the gated grouped RMSNorm) -> out_proj."""

    def __init__(self, config: FalconH1Config):
        super().__init__()
        self.config = config
        self.d_ssm, self.n_heads, self.head_dim = config.d_ssm, config.mamba_n_heads, config.mamba_head_dim
        self.n_groups, self.d_state = config.mamba_n_groups, config.mamba_d_state
        self.in_proj = nn.Linear(config.hidden_size, config.in_proj_size, bias=config.mamba_proj_bias)
        self.conv1d = CausalConv1d(config.conv_dim, config.mamba_d_conv, config.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        if config.mamba_rms_norm:
            self.norm = RMSNorm(self.d_ssm, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_ssm, config.hidden_size, bias=config.projectors_bias)
        self.ssm_in_multiplier = config.ssm_in_multiplier

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """With a cache: a prefill continues from and updates its conv / SSM states; a decode step (one token per
        row) runs the recurrent updates in place."""
        if padding_mask is not None:
            x = x * padding_mask[..., None].to(x.dtype)
        # with no in_proj bias, in_proj is linear: its input factor joins the per-block µP factors (block_factors)
        zxbcdt = self.in_proj(x) if self.in_proj.bias is None else self.in_proj(x * self.ssm_in_multiplier)
        return self.out_proj(self.mix(zxbcdt, padding_mask, seq_idx, cache))

    def mix(self, zxbcdt: torch.Tensor, padding_mask: torch.Tensor | None = None,
            seq_idx: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """in_proj's output (b, l, in_proj_size) (any row stride, last dim contiguous) -> the gated SSM output
        (b, l, d_ssm) that out_proj takes. The µP factors of the z, x, B, C and dt blocks cost no pass: x, B, C go
        into the conv weight, z into the gated norm (or the decode step's gate), dt into the scan or step."""
        if cache is not None and cache.decoding:  # one real token per row (HybridCache.decode_step: no padding)
            y, norm_weight = self.decode_gated(zxbcdt[:, 0], cache)
            if norm_weight is not None:
                y = ops.rms_norm(y, norm_weight, self.norm.eps)
            return y[:, None]
        b, l, _ = zxbcdt.shape
        cfg = self.config
        s_z, s_x, s_b, s_c, s_dt = self.block_factors()
        z, xbc, dt = zxbcdt.split([self.d_ssm, cfg.conv_dim, self.n_heads], dim=-1)
        if padding_mask is not None:
            # Zero padding before the conv too: with in_proj bias, padding would otherwise leak into real tokens.
            xbc = xbc * padding_mask[..., None].to(xbc.dtype)
        gs = self.n_groups * self.d_state
        if cache is not None:
            y = self._prefill(xbc, dt * s_dt, self.scaled_conv_weight(s_x, s_b, s_c), padding_mask, cache)
        else:
            weight = self.scaled_conv_weight(s_x, s_b, s_c)
            xbc = ops.causal_conv1d(xbc, weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx)
            if padding_mask is not None:
                xbc = xbc * padding_mask[..., None].to(xbc.dtype)
            xs, B, C = xbc.split([self.d_ssm, gs, gs], dim=-1)
            y = ops.ssd_scan(xs.view(b, l, self.n_heads, self.head_dim), dt * s_dt, self.A_log,
                             B.view(b, l, self.n_groups, self.d_state), C.view(b, l, self.n_groups, self.d_state),
                             self.D, self.dt_bias, chunk_size=cfg.mamba_chunk_size, dt_limit=cfg.time_step_limit,
                             seq_idx=seq_idx)
        return ops.gated_rms_norm(y.reshape(b, l, self.d_ssm), z, self.norm.weight if cfg.mamba_rms_norm else None,
                                  eps=cfg.rms_norm_eps, n_groups=self.n_groups,
                                  norm_before_gate=cfg.mamba_norm_before_gate, out_dtype=zxbcdt.dtype, z_scale=s_z)

    def block_factors(self) -> list[float]:
        """The µP factors of in_proj's z, x, B, C and dt blocks as forward applies them: with no in_proj bias, the
        ssm_in factor joins them (in_proj is linear), else it scales in_proj's input."""
        if self.in_proj.bias is None:
            return [m * self.ssm_in_multiplier for m in self.config.ssm_multipliers]
        return list(self.config.ssm_multipliers)

    def scaled_conv_weight(self, s_x: float, s_b: float, s_c: float) -> torch.Tensor:
        """(conv_dim, k) conv weight with the x, B, C factors folded in. The conv is depthwise, so scaling a channel's
        input equals scaling its weights: the factors go into the (tiny) weight instead of a pass over the
        activations. Kept in fp32: a bf16 rounding of the scaled weight would be the same error at every token, a
        bias that does not average out."""
        gs, device = self.n_groups * self.d_state, self.conv1d.weight.device
        channel_scale = torch.cat([torch.full((self.d_ssm,), s_x, device=device),
                                   torch.full((gs,), s_b, device=device), torch.full((gs,), s_c, device=device)])
        weight = self.conv1d.weight[:, 0, :].to(torch.promote_types(self.conv1d.weight.dtype, torch.float32))
        return weight * channel_scale[:, None]

    def _prefill(self, xbc, dt, weight, padding_mask, cache: LayerCache):
        """Chunked conv + scan continuing from the cached states, which then hold the states after the last token.
        xbc (b, l, conv_dim) unscaled in_proj outputs (padding zeroed); dt (b, l, h) scaled. Returns y (b, l, h, p).
        Padding precedes a row's first token, so it meets zero states and leaves them zero."""
        b, l, _ = xbc.shape
        gs = self.n_groups * self.d_state
        xbc, conv_state = ops.causal_conv1d(xbc, weight, self.conv1d.bias, activation="silu",
                                            initial_state=cache.conv_state, return_final_state=True)
        cache.conv_state.copy_(conv_state)
        if padding_mask is not None:
            xbc = xbc * padding_mask[..., None].to(xbc.dtype)
        xs, B, C = xbc.split([self.d_ssm, gs, gs], dim=-1)
        y, ssm_state = ops.ssd_scan(xs.view(b, l, self.n_heads, self.head_dim), dt, self.A_log,
                                    B.view(b, l, self.n_groups, self.d_state),
                                    C.view(b, l, self.n_groups, self.d_state), self.D, self.dt_bias,
                                    chunk_size=self.config.mamba_chunk_size, dt_limit=self.config.time_step_limit,
                                    initial_state=cache.ssm_state, return_final_state=True)
        cache.ssm_state.copy_(ssm_state)
        return y

    def decode_gated(self, zxbcdt: torch.Tensor, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decode step from in_proj's output zxbcdt (b, in_proj_size) (last dim contiguous) in one fused op
        (ops.mamba_step: conv update, SSD step, gate; the cache's states updated in place). Returns (y (b, d_ssm),
        norm_weight): norm_weight None means y is the mixer's output; a tensor means y is gated and still needs an
        RMSNorm over the whole row with that weight (the mixer's norm after the gate, with one group), which the
        caller may fold into out_proj's product (DecoderLayer._skinny_decode)."""
        cfg = self.config
        b = zxbcdt.shape[0]
        s_z, s_x, s_b, s_c, s_dt = self.block_factors()
        # the cache holds the scaled weight when its owner computed it once per call (see scaled_conv_weight)
        weight = cache.conv_weight if cache.conv_weight is not None else self.scaled_conv_weight(s_x, s_b, s_c)
        norm_left = cfg.mamba_rms_norm and not cfg.mamba_norm_before_gate and self.n_groups == 1
        gate = not cfg.mamba_rms_norm or norm_left
        y = ops.mamba_step(zxbcdt, cache.conv_state, cache.ssm_state, weight, self.conv1d.bias, self.A_log, self.D,
                           self.dt_bias, n_groups=self.n_groups, d_state=self.d_state, dt_limit=cfg.time_step_limit,
                           dt_scale=s_dt, z_scale=s_z, gate=gate, sync=cache.mamba_sync).reshape(b, self.d_ssm)
        if gate:
            return y, (self.norm.weight if norm_left else None)
        z = zxbcdt[:, :self.d_ssm]
        return ops.gated_rms_norm(y, z, self.norm.weight, eps=cfg.rms_norm_eps, n_groups=self.n_groups,
                                  norm_before_gate=cfg.mamba_norm_before_gate, out_dtype=zxbcdt.dtype,
                                  z_scale=s_z), None


class MLP(nn.Module):
    def __init__(self, config: FalconH1Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unscaled(x) * self.down_multiplier

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP before its down_multiplier (the decoder layer applies it in the residual add)."""
        gate, up = project(x, [self.gate_proj, self.up_proj])
        # down_proj ends the decoder layer: with LoRA, a checkpointed layer's recomputation stops before its products
        return project(ops.swiglu(gate, up, self.gate_multiplier), [self.down_proj], layer_end=True)[0]


class DecoderLayer(nn.Module):
    def __init__(self, config: FalconH1Config):
        super().__init__()
        self.feed_forward = MLP(config)
        self.mamba = MambaMixer(config)
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_out_multiplier = config.attention_out_multiplier
        self.ssm_out_multiplier = config.ssm_out_multiplier

    def forward(self, x, cos, sin, padding_mask=None, seq_idx=None, cache: LayerCache | None = None):
        if cache is not None and cache.decoding and self._skinny_decode_ok(x):
            return self._skinny_decode(x, cos, sin, cache)
        h = self.input_layernorm(x)
        group = self._input_group() if cache is None and padding_mask is None else None
        if group is not None:
            mamba_out, attn_out, attn_factor = self._grouped_mixers(h, group, cos, sin, seq_idx)
        elif cache is None:   # the attention_in factor comes back as a factor on its output (Attention.unscaled)
            mamba_out = self.mamba(h, padding_mask, seq_idx)
            attn_out, attn_factor = self.self_attn.unscaled(h, cos, sin, padding_mask, seq_idx)
        else:
            mamba_out = self.mamba(h, padding_mask, seq_idx, cache)
            attn_out, attn_factor = self.self_attn(h, cos, sin, padding_mask, seq_idx, cache), 1.0
        # x + (mamba * ssm_out + attention * attention_out) with the MLP's input norm of it, then x + mlp * down:
        # one fused kernel each on CUDA (ops/fused.py; with a one-kernel backward in training).
        norm = self.pre_ff_layernorm
        x, h = ops.residual_mix_norm(x, mamba_out, attn_out, self.ssm_out_multiplier,
                                     self.attention_out_multiplier * attn_factor, norm.weight, norm.eps)
        return ops.residual_add(x, self.feed_forward.unscaled(h), self.feed_forward.down_multiplier)

    def _input_group(self) -> list[LoRAParts] | None:
        """The LoRAParts of in_proj, q, k and v where they take the normed input as it is (no input bias on any of
        them: the µP input factors then move to their outputs, MambaMixer.block_factors, Attention.unscaled) and
        form one LoRA group (lora_autograd.group_parts); else None. Padding, which in_proj's input has zeroed, is the
        caller's condition."""
        mamba, attn = self.mamba, self.self_attn
        if mamba.in_proj.bias is not None or not attn._bias_free():
            return None
        return group_parts([mamba.in_proj, attn.q_proj, attn.k_proj, attn.v_proj])

    def _grouped_mixers(self, h, group: list[LoRAParts], cos, sin, seq_idx):
        """(mamba_out, attn_out, attn_factor) as forward's uncached path makes them, with in_proj, q, k and v of h
        in one LoRA group (`group`, from _input_group: one adapter product for the four, their input gradients
        summed by the products)."""
        mamba, attn = self.mamba, self.self_attn
        zxbcdt, q, k, v = lora_group(h, group)
        mamba_out = mamba.out_proj(mamba.mix(zxbcdt, None, seq_idx))
        del zxbcdt  # not held through the attention: at long sequences it is one of the layer's largest tensors
        attn_out, attn_factor = attn.unscaled_from_projections(q, k, v, cos, sin, None, seq_idx)
        return mamba_out, attn_out, attn_factor

    def _projections(self) -> tuple[nn.Module, ...]:
        attn, mamba, mlp = self.self_attn, self.mamba, self.feed_forward
        return (mamba.in_proj, attn.q_proj, attn.k_proj, attn.v_proj, mamba.out_proj, attn.o_proj, mlp.gate_proj,
                mlp.up_proj, mlp.down_proj)

    def _skinny_decode_ok(self, x: torch.Tensor) -> bool:
        """The fused few-row path takes plain bias-free projections (not LoRA or 4-bit layers: those keep the
        module path) where ops.skinny's kernels run."""
        projections = self._projections()
        return (all(type(p) is nn.Linear and p.bias is None for p in projections)
                and ops.skinny_ok(x[:, 0], *(p.weight for p in projections)))

    def _skinny_decode(self, x, cos, sin, cache: LayerCache) -> torch.Tensor:
        """A decode step of a few rows, x (b, 1, hidden), in 7 kernels (8 when the attention splits its keys)
        instead of 18: the input norm folded into one product for in_proj, q, k and v; the Mamba step (conv, scan,
        gate) in one; RoPE + KV store and the attention; out_proj and o_proj (with their µP factors, and the Mamba
        norm folded in where it is a plain RMSNorm of the gated row) added into the residual by one; the MLP's norm,
        gate and up products and SwiGLU in one; down_proj into the residual in one (ops/skinny.py). Each weight is
        read once, at memory speed."""
        attn, mamba, mlp = self.self_attn, self.mamba, self.feed_forward
        in_norm, ff_norm = self.input_layernorm, self.pre_ff_layernorm
        proj = ops.multi_linear(x[:, 0], [mamba.in_proj.weight, attn.q_proj.weight, attn.k_proj.weight,
                                          attn.v_proj.weight], norm_weight=in_norm.weight, eps=in_norm.eps)
        zxbcdt, q, k, v = proj.split([mamba.in_proj.out_features, attn.q_proj.out_features,
                                      attn.k_proj.out_features, attn.v_proj.out_features], dim=-1)
        y, y_norm = mamba.decode_gated(zxbcdt, cache)
        o = attn.decode_attend(q, k, v, cos, sin, cache, attn.in_multiplier).reshape(x.shape[0], -1)
        x = ops.dual_linear_residual(x[:, 0], y, mamba.out_proj.weight, self.ssm_out_multiplier, o,
                                     attn.o_proj.weight, self.attention_out_multiplier, norm_weight=y_norm,
                                     eps=mamba.norm.eps if y_norm is not None else 0.0)
        u = ops.linear_swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.gate_multiplier,
                              norm_weight=ff_norm.weight, eps=ff_norm.eps)
        return ops.linear_residual(x, u, mlp.down_proj.weight, mlp.down_multiplier)[:, None]


class FalconH1Model(nn.Module):
    def __init__(self, config: FalconH1Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # Recomputing a checkpointed layer replays the RNG state it first ran with (dropout masks match). A
        # caller that runs no random op may turn this off: a CUDA graph cannot read the RNG state while capturing.
        self.checkpoint_preserves_rng = True
        self.offload_checkpoints = False  # saved layer inputs in host memory (enable_gradient_checkpointing)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # padding_idx as in transformers: the pad token's embedding row gets no gradient.
        pad = self.config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < self.config.vocab_size else None
        return F.embedding(input_ids, self.embed_tokens.weight, padding_idx=pad) * self.config.embedding_multiplier

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        cfg = self.config
        seq_len = int(position_ids.max()) + 1 if cfg.rope["rope_type"] == "dynamic" else None
        inv_freq, scaling = ops.rope_inv_freq(cfg.rope, cfg.attn_head_dim, cfg.max_position_embeddings, seq_len,
                                              device=position_ids.device)
        return ops.rope_cos_sin(position_ids, inv_freq, scaling, dtype)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, padding_mask: torch.Tensor | None,
                seq_idx: torch.Tensor | None = None):
        cos, sin = self.rope(position_ids, hidden.dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute and self.offload_checkpoints:
                # The input must carry a gradient for the layer's backward to run (a frozen embedding gives none).
                if not hidden.requires_grad:
                    hidden = hidden.detach().requires_grad_()
                hidden = offloaded_checkpoint(layer, hidden, cos, sin, padding_mask, seq_idx,
                                              preserve_rng_state=self.checkpoint_preserves_rng)
            elif recompute:
                # Early stop (torch's default, made explicit): the recomputation ends at the last op that saved a
                # tensor, so what follows it (down_proj's products, the residual add) is not run again.
                with set_checkpoint_early_stop(True):
                    hidden = checkpoint(layer, hidden, cos, sin, padding_mask, seq_idx, use_reentrant=False,
                                        preserve_rng_state=self.checkpoint_preserves_rng)
            else:
                hidden = layer(hidden, cos, sin, padding_mask, seq_idx)
        return self.final_layernorm(hidden)

    def forward_cached(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None, step,
                       final_norm: bool = True) -> torch.Tensor:
        """The layers over a CacheStep (cache.py): positions and RoPE frequencies come from the cache. final_norm=False
        leaves the final RMSNorm to the caller (a decode step folds it into the lm_head product)."""
        cache = step.cache
        cos, sin = ops.rope_cos_sin(step.positions, cache.rope_inv_freq(step.positions), cache.rope_scaling,
                                    hidden.dtype)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, padding_mask, None, step.layer(i))
        step.finish()
        return self.final_layernorm(hidden) if final_norm else hidden


def check_document_order(seq_idx: torch.Tensor) -> None:
    """Raise unless seq_idx (b, l) is non-decreasing along each row (documents are contiguous). Reads the result
    back to the host."""
    if seq_idx.shape[-1] > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along each row (documents are contiguous)")


def positions_within_documents(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) position of each token inside its packed document: 0 at each document's first token."""
    b, l = seq_idx.shape
    index = torch.arange(l, device=seq_idx.device).expand(b, l)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


class FalconH1ForCausalLM(nn.Module):
    """Falcon-H1 language model. `from_pretrained` / `save_pretrained` read and write Hugging Face checkpoints;
    `from_config` builds a random-init model (tests, benchmarks)."""

    def __init__(self, config: FalconH1Config):
        super().__init__()
        self.config = config
        self.model = FalconH1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: FalconH1Config, *, dtype: torch.dtype | None = None, device=None,
                    seed: int | None = None) -> "FalconH1ForCausalLM":
        """A random-init model, built directly on `device` (float32 on CPU, bf16 on CUDA by default)."""
        from .checkpoint import default_device, default_dtype
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.tie_weights()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
        model.init_weights(generator)
        return model.to_model_dtype(dtype)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' initialisation: normal(0, initializer_range) linears/embeddings/conv, zero biases, unit
        norms; A_log = log(1..H), D = 1, dt_bias = 1."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
            elif leaf in ("D", "dt_bias") or name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        pad = self.config.pad_token_id
        if pad is not None and 0 <= pad < self.config.vocab_size:
            self.model.embed_tokens.weight[pad].zero_()

    def to_model_dtype(self, dtype: torch.dtype) -> "FalconH1ForCausalLM":
        """Cast to `dtype`, keeping A_log, D and dt_bias in fp32 (they set the scan's decay and step size)."""
        for name, p in self.named_parameters():
            target = torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMETERS and dtype != torch.float64 else dtype
            if p.dtype != target:
                p.data = p.data.to(target)
        return self

    @classmethod
    def from_pretrained(cls, path_or_id, *, dtype: torch.dtype | None = None, device=None, token: str | None = None,
                        revision: str | None = None) -> "FalconH1ForCausalLM":
        """Load a Hugging Face Falcon-H1 checkpoint (local folder or hub id); see checkpoint.load_model."""
        from .checkpoint import load_model
        return load_model(cls, path_or_id, dtype=dtype, device=device, token=token, revision=revision)

    def save_pretrained(self, directory, *, max_shard_size: int | str = "5GB", overwrite: bool = False) -> None:
        """Write config.json + safetensors shards (+ index) that transformers loads as is; atomic."""
        from .checkpoint import save_model
        save_model(self, directory, max_shard_size=max_shard_size, overwrite=overwrite)

    def enable_gradient_checkpointing(self, enabled: bool = True, *, offload: bool = False) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations. offload: keep
        the layers' saved inputs in (pinned) host memory until the backward (activation_offload.py)."""
        if offload and not enabled:
            raise ValueError("offloading the saved layer inputs needs gradient checkpointing on")
        self.model.gradient_checkpointing = enabled
        self.model.offload_checkpoints = offload

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                seq_idx: torch.Tensor | None = None, return_logits: bool = True,
                cache: HybridCache | None = None) -> CausalLMOutput:
        """input_ids (b, l) or inputs_embeds (b, l, hidden) (used as given: the embedding multiplier is not
        applied, as in transformers); attention_mask (b, l): 1 = token, 0 = left padding; position_ids (b, l)
        (default: counted over real tokens, restarting at each packed document); labels (b, l): shifted inside,
        -100 ignored, loss on the multiplied logits; logits_to_keep: 0 = all positions, k = the last k, or a
        tensor of positions; seq_idx (b, l): document index of each token when several documents are packed in a
        row (non-decreasing along the row): no attention, conv or SSM state crosses from one document to the
        next. Label the first token of each document -100 too if the previous one must not predict it.
        return_logits=False (with labels; training): the loss is computed from the hidden states chunk by chunk
        and the logits are never materialised (`.logits` is None).
        cache (a HybridCache, inference only): append these tokens to the cache, continuing from what it holds
        (a prefill, whole or in pieces); attention_mask then covers the new tokens only, and its 0s (left padding)
        may only precede a row's first token; positions are counted by the cache."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if hidden.dim() != 3:
            raise ValueError(f"expected input_ids (batch, seq) or inputs_embeds (batch, seq, hidden); got "
                             f"{tuple((input_ids if input_ids is not None else inputs_embeds).shape)}")
        b, l = hidden.shape[:2]
        if cache is not None:
            return self._forward_cached(hidden, attention_mask, cache, position_ids, labels, seq_idx, return_logits,
                                        logits_to_keep)
        padding_mask = self._padding_mask(attention_mask, b, l)
        if seq_idx is not None:
            seq_idx = self._check_seq_idx(seq_idx, b, l, padding_mask)
        if position_ids is None:
            if seq_idx is not None:
                position_ids = positions_within_documents(seq_idx)
            elif padding_mask is None:
                position_ids = torch.arange(l, device=hidden.device).expand(b, l)
            else:
                position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif position_ids.shape[-1] != l:
            raise ValueError(f"position_ids has length {position_ids.shape[-1]}, the input has {l}")
        hidden = self.model(hidden, position_ids.expand(b, l), padding_mask, seq_idx)

        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
        if labels is not None and labels.shape != (b, l):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(b, l)}")
        if not return_logits:
            if labels is None:
                raise ValueError("return_logits=False computes only the loss: pass labels")
            loss = ops.linear_cross_entropy(hidden.reshape(b * l, -1), self.lm_head.weight,
                                            ops.shift_labels(labels).reshape(-1), self.config.lm_head_multiplier)
            return CausalLMOutput(logits=None, loss=loss)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep]) * self.config.lm_head_multiplier
        loss = ops.causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def _forward_cached(self, hidden, attention_mask, cache, position_ids, labels, seq_idx, return_logits,
                        logits_to_keep) -> CausalLMOutput:
        b, l = hidden.shape[:2]
        if labels is not None or seq_idx is not None or position_ids is not None or not return_logits:
            raise ValueError("with a cache, pass only input_ids / inputs_embeds, attention_mask and logits_to_keep "
                             "(positions come from the cache; labels, seq_idx and return_logits=False are for "
                             "training)")
        if b != cache.batch:
            raise ValueError(f"the cache has {cache.batch} rows, the input {b}")
        padding_mask = self._padding_mask(attention_mask, b, l)
        step = cache.prefill_step(l, padding_mask)
        hidden = self.model.forward_cached(hidden, padding_mask, step)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutput(logits=self.lm_head(hidden[:, keep]) * self.config.lm_head_multiplier)

    def decode_step(self, input_ids: torch.Tensor, cache: HybridCache, kv_len: int) -> torch.Tensor:
        """One token per row: input_ids (b,) -> logits (b, vocab), appended to `cache` (its device lengths grow by
        one; the caller records it on the host with `cache.advance_host`). kv_len: key columns the attention reads,
        at least every row's length + 1 (gyrfalcon.cache.kv_bucket: the CUDA-graph buckets). Reads nothing back to the
        host and changes no host state, so it can be captured in a CUDA graph (rope types other than dynamic)."""
        hidden = self.model.embed(input_ids[:, None])
        hidden = self.model.forward_cached(hidden, None, cache.decode_step(kv_len), final_norm=False)[:, 0]
        norm, head = self.model.final_layernorm, self.lm_head
        if type(head) is nn.Linear and head.bias is None and ops.skinny_ok(hidden, head.weight):
            # few rows: the final norm, the lm_head product and its µP factor in one kernel (ops/skinny.py)
            return ops.linear_scaled(hidden, head.weight, self.config.lm_head_multiplier, norm_weight=norm.weight,
                                     eps=norm.eps)
        return head(norm(hidden)) * self.config.lm_head_multiplier

    @staticmethod
    def _padding_mask(attention_mask: torch.Tensor | None, b: int, l: int) -> torch.Tensor | None:
        """(b, l) bool mask of real tokens, or None when there is no padding at all."""
        if attention_mask is None:
            return None
        if attention_mask.shape != (b, l):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, l)} "
                             "(1 for tokens, 0 for padding)")
        mask = attention_mask.bool()
        return None if bool(mask.all()) else mask

    @staticmethod
    def _check_seq_idx(seq_idx: torch.Tensor, b: int, l: int, padding_mask) -> torch.Tensor:
        if seq_idx.shape != (b, l) or seq_idx.is_floating_point():
            raise ValueError(f"seq_idx must be an integer tensor of shape {(b, l)}, got {seq_idx.dtype} "
                             f"{tuple(seq_idx.shape)}")
        if padding_mask is not None:
            raise ValueError("pass either attention_mask (padding) or seq_idx (packing), not both: a packed row "
                             "needs no padding")
        # Checked on the host, except while a CUDA graph captures the step (no host reads then; the graph's
        # caller, step_graph.GraphedTrainStep, checks each batch it copies in).
        if not (seq_idx.is_cuda and torch.cuda.is_current_stream_capturing()):
            check_document_order(seq_idx)
        return seq_idx.to(torch.int32)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

