"""gyrfalcon.ops: the model's compute, one file per op, each with its pure-PyTorch `*_ref` beside any kernel.

`model.py` calls only the names exported here; `dispatch.py` picks the implementation per call.
"""

from .attention import attention, cached_prefill_attention, decode_attention, decode_attention_ref
from .conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from .dispatch import kernels_enabled, use_reference
from .fused import residual_add, residual_mix, residual_mix_norm, rope_store_decode, swiglu
from .loss import causal_lm_loss, causal_lm_loss_ref, linear_cross_entropy, shift_labels
from .mamba_decode import mamba_step, mamba_step_ref
from .norm import gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref
from .rope import apply_rope, apply_rope_ref, rope_cos_sin, rope_inv_freq
from .skinny import dual_linear_residual, linear_residual, linear_scaled, linear_swiglu, multi_linear, skinny_ok
from .ssd import ssd_scan, ssd_scan_ref, ssd_sequential_ref, ssd_step, ssd_step_ref

__all__ = [
    "attention", "cached_prefill_attention", "decode_attention", "decode_attention_ref",
    "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
    "kernels_enabled", "use_reference", "causal_lm_loss", "causal_lm_loss_ref",
    "linear_cross_entropy", "shift_labels", "gated_rms_norm",
    "gated_rms_norm_ref", "rms_norm", "rms_norm_ref", "apply_rope", "apply_rope_ref", "rope_cos_sin", "rope_inv_freq",
    "mamba_step", "mamba_step_ref", "ssd_scan", "ssd_scan_ref", "ssd_sequential_ref", "ssd_step", "ssd_step_ref",
    "residual_add", "residual_mix", "residual_mix_norm", "rope_store_decode", "swiglu",
    "dual_linear_residual", "linear_residual", "linear_scaled", "linear_swiglu", "multi_linear", "skinny_ok",
]
