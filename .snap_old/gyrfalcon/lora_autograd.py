"""A LoRA linear layer's forward and backward as one autograd function, so that its backward adds nothing.

    y = x W^T + b + scale (x A^T) B^T          x (..., in), W (out, in), b (out,) or None, A (r, in), B (out, r)

Left to autograd, the backward of that expression writes two gradients for x, the base's dy W and the adapter's
(scale dy B) A, and sums them with an elementwise kernel: a full (tokens x in) pass for every adapted projection
(nine per decoder layer). Here the adapter's part is accumulated into the
base's by the second product itself (addmm in place: cuBLAS reads and adds the tensor in its epilogue), and the
adapter's scale rides in the products' alpha instead of elementwise multiplications:

    forward:   y = x W^T (+ b);  h = x A^T (tokens, r);  y += scale h B^T
    backward:  dh = scale dy B;  dx = dy W, then dx += dh A;  dA = dh^T x;  dB = scale dy^T h;
               dW = dy^T x and db = sum dy only when they require a gradient (full fine-tuning of a LoRA layer)

Saved for the backward: x, h (tokens x r) and the weights (no copies). The adapter may be stored in another dtype
(float32 adapters on a bf16 base): it is cast to x's dtype for the products and its gradients are cast back.
Dropout on the adapter's input is not handled here (the layer then keeps its plain expression).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b) in one product: addmm with beta 0 never reads its input, and alpha scales in the epilogue."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return torch.addmm(out, a, b, beta=0, alpha=scale, out=out)


class LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)         # no-ops when the dtypes agree
        y = F.linear(x2, weight, bias)                          # (tokens, out)
        h = torch.mm(x2, a.t())                                 # (tokens, r)
        y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, h, a, b)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, h, a, b = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        scale = ctx.scale
        dx = dw = db = da = dlb = None
        dh = _scaled_mm(dy2, b, scale) if (need_x or need_a) else None        # (tokens, r)
        if need_x:
            dx = torch.mm(dy2, weight.to(dy2.dtype))
            dx.addmm_(dh, a)
            dx = dx.view(ctx.x_shape)
        if need_a:
            da = torch.mm(dh.t(), x2).to(ctx.adapter_dtypes[0])
        if need_lb:
            dlb = _scaled_mm(dy2.t(), h, scale).to(ctx.adapter_dtypes[1])
        if need_w:
            dw = torch.mm(dy2.t(), x2).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, da, dlb, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """x (..., in) -> x W^T + b + scale (x A^T) B^T (..., out), in x's dtype (the module docstring)."""
    return LoRALinearFn.apply(x, weight, bias, lora_A, lora_B, float(scale))
