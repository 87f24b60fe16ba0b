"""The Mamba mixer's whole decode step after in_proj, in one op: conv window update + SiLU on x|B|C, the SSD state
update and output, the D skip and (optionally) the y * silu(z) gate.

    mamba_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, *, n_groups, d_state,
               dt_limit, dt_scale, z_scale, gate, state_indices=None, sync=None) -> y (b, h, p)

    zxbcdt       (b, d_ssm + conv_dim + h)  in_proj's output for one token per row: z | x | B | C | dt, UNSCALED
                 (rows may be strided, the last dim contiguous); conv_dim = d_ssm + 2 * n_groups * d_state
    conv_state   (slots, conv_dim, k - 1)   the last k-1 x|B|C inputs per slot, updated in place
    ssm_state    (slots, h, p, d_state)     fp32, updated in place
    conv_weight  (conv_dim, k)              with the x/B/C µP factors folded in (MambaMixer.scaled_conv_weight)
    dt_scale, z_scale                       the dt and z blocks' µP factors, applied as those values are read
    gate         True: y * silu(z_scale * z); False: y alone (a gated RMSNorm follows elsewhere)
    state_indices (b,) int                  the slot of each row (row i uses slot i when None)
    sync         (b * n_groups,) int32 zeros, the kernel's workspace (left zero again); allocated when None

It is `causal_conv1d_update` followed by `ssd_step` (and the gate): the reference below is exactly that. The Triton
kernel (mamba_decode_triton.py) does it in one launch instead of two: at small batch every launch costs more than the
little data these ops touch (a layer's conv state is a few KB per row). At large batch the op is bound by the SSM
state's traffic, and there the fused kernel's per-program recomputation of the B/C conv and its counters cost more
than the launch they save (H100, bench/mamba_decode_kernels.py: 0.5B shape, batch 1: 4.6 us fused against 6.3 us
for the sequence; batch 64: 49-71 us against 46 us), so above FUSED_MAX_ROWS rows the two kernels run instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import causal_conv1d_update, causal_conv1d_update_ref
from .dispatch import KERNEL_DTYPES, kernels_enabled
from .ssd import INF_LIMIT, ssd_step, ssd_step_ref

FUSED_MAX_ROWS = 8  # rows up to which the fused kernel runs (see the module docstring)


def mamba_step_ref(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, *, n_groups: int,
                   d_state: int, dt_limit=INF_LIMIT, dt_scale: float = 1.0, z_scale: float = 1.0, gate: bool = True,
                   state_indices=None, sync=None):
    """The composition the kernel fuses (see the module docstring); sync is unused. Returns y (b, h, p) in zxbcdt's
    dtype, computed in the SSM state's dtype."""
    b = zxbcdt.shape[0]
    h = A_log.shape[0]
    conv_dim = conv_weight.shape[0]
    gs = n_groups * d_state
    d_ssm = conv_dim - 2 * gs
    p = d_ssm // h
    z, xbc, dt = zxbcdt.split([d_ssm, conv_dim, h], dim=-1)
    xbc = causal_conv1d_update_ref(xbc, conv_state, conv_weight, conv_bias, "silu", state_indices)
    xs, B, C = xbc.split([d_ssm, gs, gs], dim=-1)
    slots = state_indices.long() if state_indices is not None else torch.arange(b, device=ssm_state.device)
    y, new_state = ssd_step_ref(ssm_state[slots], xs.reshape(b, h, p), dt, A_log, B.reshape(b, n_groups, d_state),
                                C.reshape(b, n_groups, d_state), D, dt_bias, dt_limit=dt_limit, dt_scale=dt_scale)
    ssm_state[slots] = new_state.to(ssm_state.dtype)
    if gate:
        y = y * F.silu(z.reshape(b, h, p).to(y.dtype) * z_scale)
    return y.to(zxbcdt.dtype)


def mamba_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, *, n_groups: int,
               d_state: int, dt_limit=INF_LIMIT, dt_scale: float = 1.0, z_scale: float = 1.0, gate: bool = True,
               state_indices=None, sync=None):
    """Dispatching entry (contract in the module docstring): on CUDA, for fp32 states and 16/32-bit activations, the
    fused kernel up to FUSED_MAX_ROWS rows and the conv-update and SSD-step kernels above; the reference elsewhere."""
    if (kernels_enabled(zxbcdt, conv_state, ssm_state, conv_weight) and ssm_state.dtype == torch.float32
            and zxbcdt.dtype in KERNEL_DTYPES and conv_state.dtype in KERNEL_DTYPES):
        if zxbcdt.shape[0] > FUSED_MAX_ROWS:
            return _two_kernels(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                n_groups=n_groups, d_state=d_state, dt_limit=dt_limit, dt_scale=dt_scale,
                                z_scale=z_scale, gate=gate, state_indices=state_indices)
        from .mamba_decode_triton import mamba_step_triton
        return mamba_step_triton(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                 n_groups=n_groups, d_state=d_state, dt_limit=dt_limit, dt_scale=dt_scale,
                                 z_scale=z_scale, gate=gate, state_indices=state_indices, sync=sync)
    return mamba_step_ref(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                          n_groups=n_groups, d_state=d_state, dt_limit=dt_limit, dt_scale=dt_scale, z_scale=z_scale,
                          gate=gate, state_indices=state_indices)


def _two_kernels(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, *, n_groups, d_state,
                 dt_limit, dt_scale, z_scale, gate, state_indices, step_launch=None):
    """The large-batch path: the conv update, then the SSD step with the gate in its epilogue (step_launch: the
    step kernel's (BP, num_warps), for benchmarks)."""
    b = zxbcdt.shape[0]
    h = A_log.shape[0]
    conv_dim = conv_weight.shape[0]
    gs = n_groups * d_state
    d_ssm = conv_dim - 2 * gs
    z, xbc, dt = zxbcdt.split([d_ssm, conv_dim, h], dim=-1)
    xbc = causal_conv1d_update(xbc, conv_state, conv_weight, conv_bias, "silu", state_indices)
    xs, B, C = xbc.split([d_ssm, gs, gs], dim=-1)
    z = z.reshape(b, h, d_ssm // h) if gate else None
    if step_launch is not None:
        from .ssd_triton import ssd_step_triton
        return ssd_step_triton(ssm_state, xs.reshape(b, h, d_ssm // h), dt, A_log, B.reshape(b, n_groups, d_state),
                               C.reshape(b, n_groups, d_state), D, dt_bias, dt_limit=dt_limit, z=z,
                               state_indices=state_indices, dt_scale=dt_scale, z_scale=z_scale, launch=step_launch)
    return ssd_step(ssm_state, xs.reshape(b, h, d_ssm // h), dt, A_log, B.reshape(b, n_groups, d_state),
                    C.reshape(b, n_groups, d_state), D, dt_bias, dt_limit=dt_limit, z=z, state_indices=state_indices,
                    dt_scale=dt_scale, z_scale=z_scale)
