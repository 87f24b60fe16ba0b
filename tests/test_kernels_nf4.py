"""NF4 dequantization (gyrfalcon/ops/nf4.py and its Triton kernel, nf4_triton.py) against bitsandbytes: the kernel
and the pure-PyTorch reference both equal `bitsandbytes.functional.dequantize_4bit` bit for bit (torch.equal), for
fp32, bf16 and fp16 weights, nested (double-quantized absmaxes, as gyrfalcon stores them) and plain states, odd
element counts (the last byte holds one weight), whole-word and byte-wise loads, several programs, more than one
nested scale, and blocksizes 32 to 4096; the reference also against a float64 recomputation written out here.
Weights are random normal, quantized by bitsandbytes.functional.quantize_4bit on the test device. Without a GPU the
kernel runs in Triton's CPU interpreter (tests/conftest.py). Also: the kernel compiled for an H100 carries no fused
multiply-add (bitsandbytes rounds the nested absmax's product before adding the offset) and stores 16-byte vectors;
the dispatching entry, `out=`, and the errors. The `gpu` tests: a 7B layer's weight shapes on CUDA, and the kernel
inside a captured CUDA graph:

    python -m pytest -m gpu tests/test_kernels_nf4.py
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes").functional
pytest.importorskip("triton")

from gyrfalcon.ops import nf4  # noqa: E402
from gyrfalcon.ops.nf4_triton import dequantize_nf4_triton  # noqa: E402
from helpers import DEV, compile_script_last_line  # noqa: E402

gpu = pytest.mark.gpu
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantized(shape, dtype, *, nested=True, blocksize=64, seed=0, scale=0.02):
    """(packed codes, QuantState) of a random normal weight (times scale) quantized by bitsandbytes on DEV."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen) * scale).to(DEV, dtype)
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def bnb_dense(packed, state):
    return bnb_functional.dequantize_4bit(packed, state)


def assert_bit_equal(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(expected).all() and expected.abs().max() > 0  # never a vacuous comparison
    mismatch = (got != expected).sum().item()
    assert torch.equal(got, expected), f"{mismatch} of {expected.numel()} values differ"


# (shape, blocksize): odd counts (byte-wise loads, a last byte of one weight), counts in whole 32-bit words, several
# programs (a program takes 4096 weights at blocksize 64), more than 256 blocks (a second nested scale). bitsandbytes'
# CPU kernel for even rows mis-places the absmaxes of some rows that are not whole blocks (e.g. (20, 96) at blocksize
# 64; its odd-row path and CUDA are right), so even rows here are whole blocks.
CASES = [((7, 9), 64), ((20, 128), 64), ((65, 131), 64), ((48, 192), 64), ((97, 101), 32), ((5, 3), 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize(("shape", "blocksize"), CASES, ids=str)
def test_kernel_and_reference_equal_bitsandbytes(shape, blocksize, nested, dtype):
    packed, state = quantized(shape, dtype, nested=nested, blocksize=blocksize, seed=shape[0])
    expected = bnb_dense(packed, state)
    assert_bit_equal(dequantize_nf4_triton(packed, state), expected)
    assert_bit_equal(nf4.dequantize_nf4_ref(packed, state), expected)


@pytest.mark.parametrize("blocksize", [128, 256, 4096])
def test_other_blocksizes(blocksize):
    """Larger blocks: several per program, and one block wider than a program's default span (4096)."""
    packed, state = quantized((33, 257), torch.bfloat16, blocksize=blocksize, seed=blocksize, scale=1.0)  # odd rows
    expected = bnb_dense(packed, state)
    assert_bit_equal(dequantize_nf4_triton(packed, state), expected)
    assert_bit_equal(nf4.dequantize_nf4_ref(packed, state), expected)


def float64_dequantize(packed, state) -> tuple[np.ndarray, np.ndarray]:
    """The definition in float64, element by element from the bytes: weight i is NF4[code] * absmax of its block,
    code the high four bits of byte i // 2 for even i, else the low four bits. Also, per weight, the bound on its
    block's fp32 absmax error: the nested product and offset sum each round (by at most 2^-24 of their size)."""
    n = int(np.prod(tuple(state.shape)))
    data = packed.cpu().numpy().reshape(-1)
    table = np.array(nf4.NF4_CODE, dtype=np.float64)
    i = np.arange(n)
    codes = np.where(i % 2 == 0, data[i // 2] >> 4, data[i // 2] & 15)
    block = i // state.blocksize
    if state.nested:
        q = state.absmax.cpu().numpy().reshape(-1).astype(np.int64)
        scales = state.state2.absmax.cpu().double().numpy()
        code2 = state.state2.code.cpu().double().numpy()
        blocks = np.arange(len(q))
        product = code2[q] * scales[blocks // state.state2.blocksize]
        absmax = product + float(state.offset)
        absmax_err = 2.0 ** -24 * (np.abs(product) + np.abs(absmax)) * 1.001
    else:
        absmax = state.absmax.cpu().double().numpy()
        absmax_err = np.zeros_like(absmax)
    shape = tuple(state.shape)
    return (table[codes] * absmax[block]).reshape(shape), (np.abs(table[codes]) * absmax_err[block]).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_reference_against_float64(nested, dtype):
    """Within the roundings: the nested absmax's two, the fp32 product's, then half an ulp of the output dtype."""
    packed, state = quantized((37, 129), dtype, nested=nested, blocksize=64, seed=3, scale=1.0)
    exact, absmax_err = float64_dequantize(packed, state)
    got = nf4.dequantize_nf4_ref(packed, state).double().cpu().numpy()
    assert np.isfinite(got).all() and np.abs(exact).max() > 0
    half_ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    tol = absmax_err + np.abs(exact) * (half_ulp + 2.0 ** -23)
    assert (np.abs(got - exact) <= tol).all(), np.abs(got - exact).max()
    assert (got != exact).any() or dtype == torch.float32  # 16-bit outputs do round


def test_codes_and_nf4_table():
    """The reference's table is the one bitsandbytes stores in the state (and its CUDA kernel has built in); the
    high four bits of a byte are the first weight."""
    packed, state = quantized((4, 64), torch.float32)
    assert torch.equal(state.code.cpu(), torch.tensor(nf4.NF4_CODE, dtype=torch.float32))
    codes = nf4.codes_ref(torch.tensor([0x1F, 0xA2], dtype=torch.uint8), 3)
    assert codes.tolist() == [1, 15, 10]


def test_dispatch_and_out():
    """The public entry: the reference off CUDA, the kernel on it; `out=` is filled and returned; a state of
    another quant_storage dtype reads the same bytes."""
    packed, state = quantized((9, 71), torch.bfloat16)
    expected = bnb_dense(packed, state)
    assert_bit_equal(nf4.dequantize_nf4(packed, state), expected)
    out = torch.full(tuple(state.shape), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert nf4.dequantize_nf4(packed, state, out=out) is out
    assert_bit_equal(out, expected)
    out.fill_(float("nan"))
    assert dequantize_nf4_triton(packed, state, out=out) is out
    assert_bit_equal(out, expected)
    codes = packed.reshape(-1)
    even = torch.cat([codes, codes.new_zeros(codes.numel() % 2)])
    wide = even.view(torch.int16).reshape(-1, 1)  # the same bytes, stored two by two
    assert_bit_equal(nf4.dequantize_nf4(wide, state), expected)


def test_errors():
    packed, state = quantized((8, 64), torch.float16)
    fp4_packed, fp4_state = bnb_functional.quantize_4bit(torch.randn(8, 64, device=DEV), quant_type="fp4")
    with pytest.raises(ValueError, match="dequantize_4bit for fp4"):
        nf4.dequantize_nf4(fp4_packed, fp4_state)
    with pytest.raises(ValueError, match="out is"):
        nf4.dequantize_nf4(packed, state, out=torch.empty(8, 64, dtype=torch.float32, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_nf4_triton(packed, state, out=torch.empty(64, 8, dtype=torch.float16, device=DEV).t())
    with pytest.raises(ValueError, match="holds"):
        nf4.dequantize_nf4(packed[:-1], state)


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gyrfalcon.ops import nf4_triton

    def sass_of(out_dtype, word_loads):
        k = nf4_triton._nf4_dequant_kernel
        sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
               "offset_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*" + out_dtype, "n": "i32",
               "n_bytes": "i32", "n_blocks": "i32"}
        consts = dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, NESTED=True, BLOCKS=nf4_triton.blocks_per_program(64),
                      WORD_LOADS=word_loads, BF16_BY_BITS=False)
        sig.update({name: "constexpr" for name in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(10)}
        ck = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": nf4_triton.NUM_WARPS, **nf4_triton.COMPILE_OPTIONS})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(ck.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout

    out = {}
    for dtype, words in (("bf16", True), ("fp32", True), ("fp16", False)):
        sass = sass_of(dtype, words)
        out[dtype] = {"ffma": "FFMA" in sass, "fadd": "FADD" in sass, "vector_store": "STG.E.128" in sass,
                      "vector_load": "LDG.E.128" in sass}
    print(json.dumps(out))
""")


def test_kernel_compiles_for_h100_without_fused_multiply_add():
    """Compiled for sm_90 (in a subprocess, no GPU needed) as the launcher compiles it: the nested absmax is a
    multiply and a separate add (a fused multiply-add would round once, bitsandbytes rounds twice), the stores are
    16-byte vectors, and whole-word loads of aligned codes are vectors too."""
    result = json.loads(compile_script_last_line(_COMPILE_SCRIPT))
    for dtype, found in result.items():
        assert not found["ffma"] and found["fadd"] and found["vector_store"], (dtype, found)
    assert result["bf16"]["vector_load"] and result["fp32"]["vector_load"]


# ------------------------------------------------------------------------------------------ GPU, real shapes
def layer_shapes_7b() -> dict[str, tuple[int, int]]:
    from gyrfalcon import FalconH1Config
    """{name: (out, in)} of the 7B layer's quantized weights (v_proj and up_proj: the shapes of k_proj, gate_proj)."""
    cfg = FalconH1Config.from_preset("7B")
    hid, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.attn_head_dim, cfg.num_key_value_heads * cfg.attn_head_dim
    return {"in_proj": (cfg.in_proj_size, hid), "q_proj": (q, hid), "k_proj": (kv, hid), "o_proj": (hid, q),
            "out_proj": (hid, cfg.d_ssm), "gate_proj": (inter, hid), "down_proj": (hid, inter)}


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_7b_shapes_bit_equal(dtype):
    for name, shape in layer_shapes_7b().items():
        packed, state = quantized(shape, dtype, seed=len(name))
        assert_bit_equal(nf4.dequantize_nf4(packed, state), bnb_dense(packed, state))
    packed, state = quantized((12288, 3072), dtype, nested=False, seed=1)
    assert_bit_equal(nf4.dequantize_nf4(packed, state), bnb_dense(packed, state))


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_gpu_odd_shapes_and_blocksizes(blocksize):
    for dtype in DTYPES:
        for nested in (True, False):
            for shape in ((1001, 37), (64, 136)):
                try:
                    packed, state = quantized(shape, dtype, nested=nested, blocksize=blocksize, seed=shape[0])
                except RuntimeError as err:  # a blocksize this bitsandbytes build lacks on CUDA
                    pytest.skip(f"bitsandbytes cannot quantize at blocksize {blocksize} on CUDA: {err}")
                assert_bit_equal(nf4.dequantize_nf4(packed, state), bnb_dense(packed, state))


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_captured_in_cuda_graph():
    """Captured with `out=` and replayed: no host synchronization or allocation stops the capture, and the replay
    recomputes the weight from the codes (changed after capture) on the device."""
    packed, state = quantized((3072, 1536), torch.bfloat16)
    out = torch.empty(tuple(state.shape), dtype=torch.bfloat16, device="cuda")
    nf4.dequantize_nf4(packed, state, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4.dequantize_nf4(packed, state, out=out)
    other_packed, other_state = quantized((3072, 1536), torch.bfloat16, seed=5)
    packed.copy_(other_packed)
    state.absmax.copy_(other_state.absmax)
    state.state2.absmax.copy_(other_state.state2.absmax)
    state.offset.copy_(other_state.offset)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_bit_equal(out, bnb_dense(other_packed, other_state))
