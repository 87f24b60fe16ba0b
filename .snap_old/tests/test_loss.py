"""The chunked linear + cross-entropy loss equals the loss of the full logits (value and gradients, float64), also
when chunks split the tokens unevenly and targets are ignored; the model's return_logits=False path uses it."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.ops import causal_lm_loss_ref, linear_cross_entropy
from helpers import compile_script_last_line, randomize_, rel_err, tiny_config


def test_chunked_loss_equals_full_logits_loss():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37), generator=gen)
    labels[0, :5] = -100
    full = causal_lm_loss_ref((hidden @ weight.T) * 0.7, labels)
    g_full = torch.autograd.grad(full, [hidden, weight])
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    chunked = linear_cross_entropy(hidden.reshape(-1, 16), weight, targets, 0.7, chunk=10)
    g_chunked = torch.autograd.grad(chunked, [hidden, weight])
    assert abs(full.item() - chunked.item()) <= 1e-12
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(g_chunked, g_full))


def test_model_loss_without_logits_matches():
    model = randomize_(FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float64, device="cpu"), seed=1)
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(ids, labels=ids)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lean = model(ids, labels=ids, return_logits=False)
    lean.loss.backward()
    assert lean.logits is None and abs(lean.loss.item() - full.loss.item()) <= 1e-12
    assert all(rel_err(p.grad, grads[n]) <= 1e-10 for n, p in model.named_parameters())


def test_bf16_odd_vocabulary_within_eager_error():
    """bf16 with an odd vocabulary (row-aligned buffers; the last v mod 16 rows in a product of their own): the
    loss and gradients are as close to float64 as eager bf16 (full logits, cross_entropy in fp32) is, within 2x."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(45, 32, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(101, 32, generator=gen) * 0.3).to(torch.bfloat16)
    targets = torch.randint(0, 101, (45,), generator=gen)
    targets[::7] = -100

    def run(fn, dtype):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        loss = fn(h, w)
        return (loss.detach().double(), *(g.double() for g in torch.autograd.grad(loss, [h, w])))

    exact = run(lambda h, w: torch.nn.functional.cross_entropy((h @ w.T) * 0.7, targets), torch.float64)
    eager = run(lambda h, w: torch.nn.functional.cross_entropy(((h @ w.T).float()) * 0.7, targets), torch.bfloat16)
    chunked = run(lambda h, w: linear_cross_entropy(h, w, targets, 0.7, chunk=16), torch.bfloat16)
    for got, base, ref in zip(chunked, eager, exact):
        assert rel_err(got, ref) <= 2 * rel_err(base, ref) + 1e-6


def test_chunk_size_follows_the_vocabulary():
    from gyrfalcon.ops.loss import chunk_tokens

    assert chunk_tokens(130049) == 256 and chunk_tokens(32768) == 1024 and chunk_tokens(261120) == 128
    assert chunk_tokens(10_000_000) == 128  # never below the floor
    assert all(chunk_tokens(v) % 64 == 0 for v in (512, 1000, 65536, 130049))


def _fused(hidden, weight, targets, scale, chunk, want_grad=True):
    """The Triton path (run by the CPU interpreter here; on CUDA linear_cross_entropy picks it for a frozen weight)."""
    pytest.importorskip("triton")
    from gyrfalcon.ops.loss import _FusedLinearCrossEntropy
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, scale, -100, chunk, want_grad)


@pytest.mark.parametrize("grad_out", [1.0, 1.5])
def test_fused_loss_and_hidden_gradient_match_float64(grad_out):
    """Loss and hidden-state gradient of the fused kernel (fp32 and bf16; an odd vocabulary spanning several column
    blocks; chunks splitting the tokens unevenly; ignored targets) against float64 full logits; bf16 within 2x eager
    bf16's error. grad_out multiplies the gradient stored in the model dtype in the backward: one more bf16 rounding
    (up to 2^-8 relative) unless it is a power of two. Without a gradient the kernel gives the same loss."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(45, 32, generator=gen)
    weight = torch.randn(227, 32, generator=gen) * 0.3
    targets = torch.randint(0, 227, (45,), generator=gen)
    targets[::7] = -100

    def run(fn, dtype):
        h = hidden.to(dtype).requires_grad_()
        loss = fn(h, weight.to(dtype))
        (g,) = torch.autograd.grad(loss * grad_out, [h])
        return loss.detach().double(), g.double()

    exact = run(lambda h, w: torch.nn.functional.cross_entropy((h @ w.T) * 0.7, targets), torch.float64)
    eager = run(lambda h, w: torch.nn.functional.cross_entropy(((h @ w.T).float()) * 0.7, targets), torch.bfloat16)
    fused32 = run(lambda h, w: _fused(h, w, targets, 0.7, chunk=16), torch.float32)
    fused16 = run(lambda h, w: _fused(h, w, targets, 0.7, chunk=16), torch.bfloat16)
    for got, ref in zip(fused32, exact):
        assert rel_err(got, ref) <= 1e-5
    extra = 0.0 if grad_out == 1.0 else 2.0 ** -8
    for got, base, ref in zip(fused16, eager, exact):
        assert rel_err(got, ref) <= 2 * rel_err(base, ref) + extra + 1e-6
    with torch.no_grad():
        no_grad = _fused(hidden, weight, targets, 0.7, chunk=16, want_grad=False)
    assert rel_err(no_grad.double(), exact[0]) <= 1e-5


def test_fused_loss_all_targets_ignored_is_nan_with_zero_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    loss = _fused(hidden, torch.randn(70, 8), torch.full((5,), -100), 1.0, chunk=4)
    (g,) = torch.autograd.grad(loss, [hidden])
    assert torch.isnan(loss) and not g.abs().any()


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gyrfalcon.ops.loss_triton import _ce_rows_kernel
sig = {"logits_ptr": "*bf16", "stride": "i32", "targets_ptr": "*i64", "loss_ptr": "*fp32", "count_ptr": "*i64",
       "V": "i32", "scale": "fp32", "ignore_index": "i32", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr",
       "INTERP": "constexpr"}
for grad in (True, False):
    triton.compile(ASTSource(fn=_ce_rows_kernel, signature=sig,
                             constexprs={"WRITE_GRAD": grad, "BLOCK_V": 4096, "INTERP": False}),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print("ok")
"""


def test_fused_loss_kernel_compiles_for_h100():
    """The interpreter does not type-check as the compiler does: compile the kernel for sm_90 (no GPU needed)."""
    assert compile_script_last_line(_COMPILE_SCRIPT, timeout=300) == "ok"
