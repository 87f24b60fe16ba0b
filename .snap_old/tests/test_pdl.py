"""Programmatic dependent launch (gyrfalcon/ops/pdl.py) in the decode-step kernels.

On CPU, PDL is off (the interpreter cannot run `griddepcontrol`), which every kernel test under the interpreter
exercises. Here: the switch itself, and every kernel that takes the PDL flag compiled for an H100 (sm_90) with it on,
in a subprocess (no GPU needed), checking that the wait and the launch signal really are in the machine code (and
not there with the flag off). Whether a PDL launch waits correctly is checked on the GPU by the decode tests
(teacher forcing through the CUDA-graph step equals full forwards), which run with PDL on there.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from gyrfalcon.ops.pdl import launch_options, pdl_supported  # noqa: E402
from helpers import compile_script_last_line  # noqa: E402


def test_pdl_is_off_on_cpu_and_its_launch_options():
    assert not pdl_supported(torch.device("cpu"))
    assert launch_options(False) == {}
    assert launch_options(True) == {"launch_pdl": True}


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gyrfalcon.ops import (conv_triton, decode_attention_triton, fused_triton, mamba_decode_triton,
                               norm_triton, skinny_triton, ssd_triton)

    FLOATS = {"eps", "scale", "s_m", "s_a", "s1", "s2", "gate_multiplier", "key_factor", "q_factor", "v_factor",
              "lo", "hi", "dt_scale", "z_scale"}
    POINTERS = {"w0", "w1", "w2", "w3"}
    TYPED = {"sync_ptr": "*i32", "idx_ptr": "*i64", "len_ptr": "*i32", "pos_ptr": "*i64", "state_ptr": "*fp32",
             "m_ptr": "*fp32", "l_ptr": "*fp32", "p_ptr": "*fp32", "A_log_ptr": "*fp32", "D_ptr": "*fp32",
             "dt_bias_ptr": "*fp32"}

    def sass_of(kernel, consts, num_warps=4):
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        sig, cx = {}, {}
        for name in fn.arg_names:
            if name in consts:
                sig[name], cx[name] = "constexpr", consts[name]
            elif name.endswith("_ptr") or name in POINTERS:
                sig[name] = TYPED.get(name, "*bf16")
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(ck.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout

    skinny = dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, TILE=False, INTERP=False, PDL=True)
    tile = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, TILE=True, HAS_NORM=False, INTERP=False, PDL=True)
    cases = {
        "multi": (skinny_triton._multi_kernel, dict(skinny, HAS_NORM=True)),
        "pair_swiglu": (skinny_triton._pair_kernel, dict(skinny, MODE=1, HAS_SECOND=False, HAS_RES=False,
                                                         HAS_NORM=True)),
        "pair_sum": (skinny_triton._pair_kernel, dict(skinny, MODE=0, HAS_SECOND=True, HAS_RES=True,
                                                      HAS_NORM=False)),
        "multi_tile": (skinny_triton._multi_tile_kernel, tile),
        "pair_swiglu_tile": (skinny_triton._pair_tile_kernel, dict(tile, MODE=1, HAS_SECOND=False, HAS_RES=False)),
        "pair_sum_tile": (skinny_triton._pair_tile_kernel, dict(tile, MODE=0, HAS_SECOND=True, HAS_RES=True)),
        "mamba_step": (mamba_decode_triton._mamba_step_kernel,
                       dict(K=4, BK=4, BP=8, BN=128, HAS_IDX=True, HAS_D=True, HAS_DT_BIAS=True, HAS_CONV_BIAS=True,
                            GATE=True, SOFTPLUS=True, HAS_LIMIT=False, INTERP=False, PDL=True)),
        "ssd_step": (ssd_triton._step_kernel, dict(BP=8, BN=128, HAS_IDX=True, HAS_D=True, HAS_BIAS=True, HAS_Z=True,
                                                   SOFTPLUS=True, HAS_LIMIT=False, INTERP=False, PDL=True)),
        "attention": (decode_attention_triton._decode_attention_kernel,
                      dict(BLOCK_N=64, BLOCK_G=16, BLOCK_D=128, IEEE=False, INTERP=False, PARTIAL=True, PDL=True)),
        "merge": (decode_attention_triton._merge_splits_kernel, dict(BLOCK_S=16, BLOCK_D=128, INTERP=False,
                                                                     PDL=True)),
        "rope_store": (fused_triton._rope_store_kernel, dict(BLOCK_D=128, PDL=True)),
        "residual_mix": (fused_triton._residual_mix_kernel, dict(HAS_A=True, BLOCK=1024, PDL=True)),
        "residual_mix_norm": (fused_triton._residual_mix_norm_kernel, dict(BLOCK_D=1024, PDL=True)),
        "swiglu": (fused_triton._swiglu_kernel, dict(BLOCK=1024, PDL=True)),
        "conv_update": (conv_triton._conv_update_kernel, dict(K=4, HAS_BIAS=True, HAS_IDX=True, SILU=True,
                                                              BLOCK_D=256, BLOCK_K=4, PDL=True)),
        "rms": (norm_triton._rms_fwd_kernel, dict(ALIGN=8, BLOCK_D=1024, PDL=True)),
        "gated": (norm_triton._gated_fwd_kernel, dict(ALIGN=8, NORM=True, BEFORE=False, BLOCK_G=1024, PDL=True)),
    }
    cases["multi_off"] = (skinny_triton._multi_kernel, dict(skinny, HAS_NORM=True, PDL=False))
    # griddepcontrol.wait -> ACQBULK, griddepcontrol.launch_dependents -> PREEXIT; tensor-core products: HGMMA/HMMA
    out = {}
    for name, (kernel, consts) in cases.items():
        sass = sass_of(kernel, consts)
        out[name] = {"wait": "ACQBULK" in sass, "signal": "PREEXIT" in sass, "mma": "HGMMA" in sass or "HMMA" in sass}
    print(json.dumps(out))
""")


def test_decode_kernels_compile_with_pdl_for_h100():
    result = json.loads(compile_script_last_line(_COMPILE_SCRIPT))
    off = result.pop("multi_off")
    assert not off["wait"] and not off["signal"], off
    assert len(result) == 17
    for name, found in result.items():
        assert found["wait"] and found["signal"], (name, found)
    for name in ("multi_tile", "pair_swiglu_tile", "pair_sum_tile"):
        assert result[name]["mma"], name  # the tile kernels do multiply on the tensor cores
    assert not result["multi"]["mma"]
