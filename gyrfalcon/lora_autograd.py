"""LoRA linear layers' forward and backward as two autograd functions, for one projection or for a group of
projections that share their input (in_proj, q, k, v; gate, up), so that the backward adds nothing elementwise.

    y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T       x (..., in), W_i (out_i, in), b_i (out_i,) or None,
                                                   A_i (r_i, in), B_i (out_i, r_i), s_i the adapter's scale

Left to autograd, that expression's backward writes one gradient of x per term and per projection and sums them
with elementwise kernels: full (tokens x in) passes, several per projection. Here every term of x's gradient is
accumulated by the products themselves (cuBLAS adds into its output in the epilogue), the scales ride in the products'
alpha, and a group reads x once for all of its adapters. With A = [A_1; A_2; ...] (R = sum r_i rows) and
h = x A^T (tokens, R), h_i its columns of projection i:

    forward:   h = x A^T;  y_i = s_i h_i B_i^T, then y_i += x W_i^T (+ b_i)
    backward:  dh_i = s_i dy_i B_i;  dx = dh A, then dx += dy_i W_i for each i;  dA = dh^T x;  dB_i = s_i dy_i^T h_i;
               dW_i = dy_i^T x and db_i = sum dy_i only where they require a gradient (full fine-tuning)

The thin low-rank product writes y_i and the base product adds into it, not the other way round: the base product
is compute-bound, so reading y_i in its epilogue costs little, where an addmm of rank r over y_i is a whole pass.

Two nodes, for activation checkpointing:
- LoRAInputFn: h = x A^T. Saves x, the only activation the adapters need (for dA), and gives dA in the backward;
  x's gradient comes whole from the product node (it includes the dh A term), so this node returns none for x.
- LoRAProductFn: the y_i. Saves h (tokens x R) for dB. For the projection that ends a layer (down_proj:
  `layer_end=True`) it keeps h on its context instead, so that it saves no activation through autograd's saved
  tensors: non-reentrant checkpointing (torch.utils.checkpoint) stops recomputing a layer once the last tensor that
  its forward saved is recomputed, so such a layer is recomputed up to that projection's LoRAInputFn and its base
  product, the largest of the layer, is not run again. The price is h kept from the forward to the backward
  (tokens x r per layer, 0.5% of a 7B layer's checkpointed input at rank 16) where it would have been recomputed.
  When a base weight trains (full fine-tuning of a LoRA layer) the node saves x as well, and that skip is lost.

The adapters may be stored in another dtype (float32 adapters on a bf16 base): they are cast to x's dtype for the
products and their gradients are cast back. Dropout on the adapters' input is not handled here (the layer then
keeps its plain expression).

A 4-bit base (QLoRA: W_i stored as NF4 codes with a bitsandbytes quant state, LoRAParts.quant_state) runs through
the same two nodes: each product dequantizes its weight into a temporary dense one just before using it, in the
forward and again in the backward (as bitsandbytes' own matmul does), so no dense copy outlives a product. The
dequantization is a plain kernel on the current stream, so such a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAParts:
    """One adapted projection's tensors: weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r), and
    the adapter's scale. quant_state: None for a dense weight; for a 4-bit base (quant.Linear4bit), bitsandbytes'
    QuantState, and weight holds the packed NF4 codes (frozen)."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    quant_state: object | None = None


def _dense_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight a product uses, in dtype: the weight itself (cast if needed), or a 4-bit weight's
    dequantization (a temporary)."""
    if quant_state is None:
        return weight.to(dtype)
    from .quant import dequantize_codes  # quant imports the model, which imports this module
    return dequantize_codes(weight, quant_state).to(dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b) in one product: addmm with beta 0 never reads its input, and alpha scales in the epilogue."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return torch.addmm(out, a, b, beta=0, alpha=scale, out=out)


class LoRAInputFn(torch.autograd.Function):
    """h = x A^T: x (tokens, in), a (R, in) already in x's dtype -> (tokens, R). Backward: dA = dh^T x only (x's
    gradient comes from LoRAProductFn, which includes this node's dh A term)."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.save_for_backward(x)
        return torch.mm(x, a.t())

    @staticmethod
    def backward(ctx, dh):
        (x,) = ctx.saved_tensors
        da = torch.mm(dh.t(), x) if ctx.needs_input_grad[1] else None
        return None, da


class LoRAProductFn(torch.autograd.Function):
    """y_i = s_i h_i B_i^T + x W_i^T (+ b_i) for the n projections of a group (the module docstring).

    apply(n, scales, quant_states, layer_end, x (tokens, in), h (tokens, R), a (R, in), *weights, *biases,
    *lora_Bs) -> n outputs (tokens, out_i); a is the group's stacked lora_A in x's dtype (no gradient here:
    LoRAInputFn gives it); quant_states: one per weight, None for a dense one (LoRAParts.quant_state); layer_end:
    keep h on the context rather than save it (the module docstring)."""

    @staticmethod
    def forward(ctx, n: int, scales: tuple[float, ...], quant_states: tuple, layer_end: bool, x, h, a, *tensors):
        weights, biases, lora_bs = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        bs = [b.to(x.dtype) for b in lora_bs]                     # no-ops when the dtypes agree
        ranks = [b.shape[1] for b in bs]
        outs = []
        for w, qs, bias, b, h_i, s in zip(weights, quant_states, biases, bs, h.split(ranks, dim=1), scales):
            if bias is None:
                y = _scaled_mm(h_i, b.t(), s)
            else:
                y = torch.addmm(bias.to(x.dtype), h_i, b.t(), alpha=s)
            outs.append(y.addmm_(x, _dense_weight(w, qs, x.dtype).t()))
        train_base = any(w.requires_grad for w in weights)
        # dW needs x; with a trained base the checkpointing skip of layer_end is lost (module docstring)
        ctx.save_for_backward(x if train_base else None, None if layer_end else h)
        ctx.kept_h = h.detach() if layer_end else None
        ctx.n, ctx.scales, ctx.ranks = n, scales, ranks
        ctx.x_dtype = x.dtype
        ctx.a, ctx.weights, ctx.bs, ctx.quant_states = a, weights, bs, quant_states
        # Tensors on the context escape autograd's check that nothing saved was modified in place before the
        # backward (an optimizer step between the two): the same check, by hand.
        ctx.versions = [t._version for t in (a, *weights, *bs)]
        ctx.b_dtypes = [b.dtype for b in lora_bs]
        ctx.bias_dtypes = [bias.dtype if bias is not None else None for bias in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n, scales = ctx.n, ctx.scales
        needs = ctx.needs_input_grad
        need_x, need_h = needs[4], needs[5]
        need_w, need_bias, need_b = needs[7:7 + n], needs[7 + n:7 + 2 * n], needs[7 + 2 * n:]
        dtype = ctx.x_dtype
        if [t._version for t in (ctx.a, *ctx.weights, *ctx.bs)] != ctx.versions:
            raise RuntimeError("a LoRA layer's weight or adapter was modified in place between the forward and the "
                               "backward: run the backward before changing the model's parameters")
        x, h = ctx.saved_tensors
        h = ctx.kept_h if h is None else h
        dys = [dy if dy.dtype == dtype else dy.to(dtype) for dy in dys]
        dh = None
        if need_x or need_h:
            dh = torch.cat([_scaled_mm(dy, b, s) for dy, b, s in zip(dys, ctx.bs, scales)], dim=1) if n > 1 \
                else _scaled_mm(dys[0], ctx.bs[0], scales[0])                                    # (tokens, R)
        dx = None
        if need_x:
            dx = torch.mm(dh, ctx.a)
            for dy, w, qs in zip(dys, ctx.weights, ctx.quant_states):
                dx.addmm_(dy, _dense_weight(w, qs, dtype))
        h_parts = h.split(ctx.ranks, dim=1)
        dws, dbiases, dbs = [None] * n, [None] * n, [None] * n
        for i, (dy, s) in enumerate(zip(dys, scales)):
            if need_b[i]:
                dbs[i] = _scaled_mm(dy.t(), h_parts[i], s).to(ctx.b_dtypes[i])
            if need_w[i]:
                dws[i] = torch.mm(dy.t(), x).to(ctx.weights[i].dtype)
            if need_bias[i] and ctx.bias_dtypes[i] is not None:
                dbiases[i] = dy.sum(0).to(ctx.bias_dtypes[i])
        return (None, None, None, None, dx, dh if need_h else None, None, *dws, *dbiases, *dbs)


def lora_group(x: torch.Tensor, parts: list[LoRAParts], *, layer_end: bool = False) -> list[torch.Tensor]:
    """x (..., in) -> [x W_i^T + b_i + s_i (x A_i^T) B_i^T (..., out_i)] for projections that share x, in x's
    dtype. layer_end: the outputs are the last products of a checkpointed layer (the module docstring)."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)
    a = [p.lora_A.to(x.dtype) for p in parts]                  # no-ops when the dtypes agree
    a = torch.cat(a) if len(a) > 1 else a[0]                    # (R, in)
    h = LoRAInputFn.apply(x2, a)
    outs = LoRAProductFn.apply(len(parts), tuple(float(p.scale) for p in parts), tuple(p.quant_state for p in parts),
                               layer_end, x2, h, a.detach(),
                               *(p.weight for p in parts), *(p.bias for p in parts), *(p.lora_B for p in parts))
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """x (..., in) -> x W^T + b + scale (x A^T) B^T (..., out), in x's dtype (one projection; see lora_group)."""
    return lora_group(x, [LoRAParts(weight, bias, lora_A, lora_B, scale)])[0]


def group_parts(layers) -> list[LoRAParts] | None:
    """Every layer's LoRAParts (`lora_parts()`, as a LoRA layer without dropout in training offers them), or None
    when one of them offers none: the layers can run as one lora_group."""
    parts = [getattr(layer, "lora_parts", lambda: None)() for layer in layers]
    return parts if all(p is not None for p in parts) else None


def project(x: torch.Tensor, layers, *, layer_end: bool = False) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], for linear layers that share their input x (..., in). Where every layer
    offers its adapter's tensors (group_parts), the group runs as one lora_group (with layer_end: see the module
    docstring), and the layers' own forward, with any hook on it, is not called; otherwise each layer runs on its
    own."""
    parts = group_parts(layers)
    if parts is not None and (len(layers) > 1 or layer_end):
        return lora_group(x, parts, layer_end=layer_end)
    return [layer(x) for layer in layers]
