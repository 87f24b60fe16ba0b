"""Mamba-2 SSD (state-space duality) scan: the chunked form for whole sequences, and the one-token step.

Recurrence, per head h (head dim p, state n), with B/C shared by a group of heads:
    dt_t = clamp(softplus(dt_raw_t + dt_bias), *dt_limit)       A = -exp(A_log)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T          (p x n, kept in fp32)
    y_t  = S_t C_t + D * x_t
The chunked form computes the same thing in blocks of `chunk_size` tokens: inside a chunk as a masked
"attention" (C_i.B_j with decay), across chunks by passing the state. `seq_idx` marks documents packed in one row:
no state crosses from one document into the next.

Shapes: x (b, l, h, p); dt (b, l, h); A_log, D, dt_bias (h,); B, C (b, l, g, n) with h % g == 0;
initial_state / final state (b, h, p, n); seq_idx (b, l) integer, non-decreasing along each row.
The scan computes in float32 (float64 when x is float64, for references); y is returned in x's dtype and the
final state in the compute dtype (fp32: states are always kept in fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import kernels_enabled

INF_LIMIT = (0.0, math.inf)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_limit, dtype) -> torch.Tensor:
    """dt_raw -> clamp(softplus(dt_raw + dt_bias), *dt_limit), in `dtype`."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None and tuple(dt_limit) != INF_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_scan_ref(x, dt, A_log, B, C, D=None, dt_bias=None, *, chunk_size: int, dt_softplus: bool = True,
                 dt_limit=INF_LIMIT, initial_state=None, seq_idx=None, return_final_state: bool = False):
    """Chunked SSD scan in plain PyTorch. Returns y (b, l, h, p) in x's dtype [, final_state (b, h, p, n) fp32]."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"ssd_scan: {g} B/C groups do not divide {h} heads")
    hpg = h // g
    cdt = _compute_dtype(x)
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)               # (b, l, h)
    A = -torch.exp(A_log.to(cdt))                                               # (h,)
    xs, Bs, Cs = x.to(cdt), B.to(cdt), C.to(cdt)

    q = chunk_size
    pad = (-l) % q
    xdt = xs * dt[..., None]
    dA = dt * A
    if pad:  # padded steps have dt = 0: no decay, no input, so the final state is unchanged
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        Bs = F.pad(Bs, (0, 0, 0, 0, 0, pad))
        Cs = F.pad(Cs, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    nc = (l + pad) // q
    xdt = xdt.view(b, nc, q, g, hpg, p)
    Bs = Bs.view(b, nc, q, g, n)
    Cs = Cs.view(b, nc, q, g, n)
    dA = dA.view(b, nc, q, g, hpg).permute(0, 3, 4, 1, 2)                      # (b, g, k, c, q)
    a_cum = dA.cumsum(-1)
    si = seq_idx.view(b, nc, q) if seq_idx is not None else None

    # 1. Inside each chunk: y_i += sum_{j<=i} (C_i.B_j) exp(seg_ij) dt_j x_j, seg_ij = sum_{j<k<=i} dA_k.
    # seg is summed directly rather than as a_cum_i - a_cum_j: the difference of two long sums loses precision.
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    strictly_lower = causal.tril(-1)
    seg = dA[..., :, None].expand(*dA.shape, q).masked_fill(~strictly_lower, 0).cumsum(-2)  # [i, j]
    keep = causal if si is None else causal & (si[:, :, :, None] == si[:, :, None, :])[:, None, None]
    decay = torch.exp(seg.masked_fill(~keep, -math.inf))
    cb = torch.einsum("bcign,bcjgn->bgcij", Cs, Bs)                             # (b, g, c, q, q)
    y = torch.einsum("bgcij,bgkcij,bcjgkp->bcigkp", cb, decay, xdt)

    # 2. Each chunk's own contribution to the state at its last token: decay from j to the end = seg[last, j]
    to_end = torch.exp(seg[..., -1, :])                                         # (b, g, k, c, q)
    if si is not None:
        to_end = to_end * (si == si[..., -1:])[:, None, None]
    chunk_states = torch.einsum("bcjgn,bgkcj,bcjgkp->bcgkpn", Bs, to_end, xdt)

    # 3. Pass the state across chunks (sequential over chunks; the chunk count is l / chunk_size)
    state = (torch.zeros(b, g, hpg, p, n, dtype=cdt, device=x.device) if initial_state is None
             else initial_state.to(cdt).reshape(b, g, hpg, p, n))
    chunk_decay = torch.exp(a_cum[..., -1])                                     # (b, g, k, c)
    prev_doc = si[:, 0, 0] if si is not None else None
    entering, entering_doc = [], []
    for c in range(nc):
        entering.append(state)
        decay = chunk_decay[..., c]
        if si is not None:
            entering_doc.append(prev_doc)
            # the carried state survives the chunk only if the chunk ends in the same document
            decay = decay * (si[:, c, -1] == prev_doc)[:, None, None]
            prev_doc = si[:, c, -1]
        state = state * decay[..., None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)                                     # (b, c, g, k, p, n)

    # 4. The state entering a chunk, read by each of its tokens: y_i += exp(a_i) C_i . S_in
    from_start = torch.exp(a_cum)                                               # (b, g, k, c, q)
    if si is not None:
        same_doc = si == torch.stack(entering_doc, dim=1)[..., None]            # (b, c, q)
        from_start = from_start * same_doc[:, None, None]
    y = y + torch.einsum("bcign,bcgkpn,bgkci->bcigkp", Cs, entering, from_start)

    y = y.reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + D.to(cdt)[:, None] * xs
    y = y.to(x.dtype)
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y


def ssd_scan(x, dt, A_log, B, C, D=None, dt_bias=None, *, chunk_size: int, dt_softplus: bool = True,
             dt_limit=INF_LIMIT, initial_state=None, seq_idx=None, return_final_state: bool = False):
    """The chunked SSD scan (see module docstring): the Triton kernels (ssd_triton.py) for bf16/fp16/fp32 CUDA
    tensors, the reference otherwise."""
    if kernels_enabled(x, dt, B, C) and x.dtype != torch.float64:
        from .ssd_triton import ssd_scan_triton

        return ssd_scan_triton(x, dt, A_log, B, C, D, dt_bias, chunk_size=chunk_size, dt_softplus=dt_softplus,
                               dt_limit=dt_limit, initial_state=initial_state, seq_idx=seq_idx,
                               return_final_state=return_final_state)
    return ssd_scan_ref(x, dt, A_log, B, C, D, dt_bias, chunk_size=chunk_size, dt_softplus=dt_softplus,
                        dt_limit=dt_limit, initial_state=initial_state, seq_idx=seq_idx,
                        return_final_state=return_final_state)


def ssd_step_ref(state, x, dt, A_log, B, C, D=None, dt_bias=None, *, dt_softplus: bool = True,
                 dt_limit=INF_LIMIT, dt_scale: float = 1.0):
    """One token of the recurrence. state (b, h, p, n); x (b, h, p); dt (b, h), times dt_scale (taken in the
    state's dtype); B, C (b, g, n). Returns (y (b, h, p), new_state (b, h, p, n)), both in the state's dtype."""
    b, h, p = x.shape
    g = B.shape[1]
    cdt = state.dtype
    if dt_scale != 1.0:
        dt = dt.to(cdt) * dt_scale
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)                 # (b, h)
    A = -torch.exp(A_log.to(cdt))
    Bh = B.to(cdt).repeat_interleave(h // g, dim=1)                             # (b, h, n)
    Ch = C.to(cdt).repeat_interleave(h // g, dim=1)
    xs = x.to(cdt)
    new_state = (torch.exp(dt * A)[..., None, None] * state
                 + (dt[..., None] * xs)[..., None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xs
    return y, new_state


def ssd_step(state, x, dt, A_log, B, C, D=None, dt_bias=None, *, dt_softplus: bool = True, dt_limit=INF_LIMIT,
             z=None, state_indices=None, dt_scale: float = 1.0, z_scale: float = 1.0):
    """One decode token for a batch. state (num_slots, h, p, n) fp32 is updated IN PLACE: row i uses slot
    state_indices[i] (slot i when None); x (b, h, p); dt (b, h), times dt_scale (the dt block's µP factor, applied
    as dt is read); B, C (b, g, n); z (b, h, p) optional gate, times z_scale (the z block's µP factor).
    Returns y (b, h, p) in x's dtype (times silu(z_scale z) when z is given). Triton kernel on CUDA, ssd_step_ref
    otherwise."""
    if kernels_enabled(state, x) and state.dtype == torch.float32 and x.dtype != torch.float64:
        from .ssd_triton import ssd_step_triton

        return ssd_step_triton(state, x, dt, A_log, B, C, D, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                               z=z, state_indices=state_indices, dt_scale=dt_scale, z_scale=z_scale)
    slots = state_indices if state_indices is not None else torch.arange(x.shape[0], device=state.device)
    y, new_state = ssd_step_ref(state[slots], x, dt, A_log, B, C, D, dt_bias, dt_softplus=dt_softplus,
                                dt_limit=dt_limit, dt_scale=dt_scale)
    state[slots] = new_state.to(state.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype) * z_scale)
    return y.to(x.dtype)


def ssd_sequential_ref(x, dt, A_log, B, C, D=None, dt_bias=None, *, dt_softplus: bool = True,
                       dt_limit=INF_LIMIT, initial_state=None, seq_idx=None):
    """The recurrence token by token: the definition the chunked scan and the kernels are checked against.
    Returns (y (b, l, h, p), final_state (b, h, p, n)) in the compute dtype."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt = _compute_dtype(x)
    state = (torch.zeros(b, h, p, n, dtype=cdt, device=x.device) if initial_state is None
             else initial_state.to(cdt))
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).to(cdt)[:, None, None, None]
            state = state * (1 - new_doc)
        y, state = ssd_step_ref(state, x[:, t], dt[:, t], A_log, B[:, t], C[:, t], D, dt_bias,
                                dt_softplus=dt_softplus, dt_limit=dt_limit)
        ys.append(y)
    return torch.stack(ys, dim=1), state
