"""Shared test helpers: tiny configs with every option exercised, the transformers oracle, error metrics, and the
kernel tests' device, random inputs and float64 check, and the subprocess that compiles kernels for an H100."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gyrfalcon import FalconH1Config

# Distinct, non-unit values for every µP multiplier, so a multiplier applied in the wrong place shows.
MULTIPLIERS = {
    "embedding_multiplier": 1.7, "lm_head_multiplier": 0.45, "key_multiplier": 0.6,
    "attention_in_multiplier": 0.8, "attention_out_multiplier": 1.3, "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.7, "mlp_multipliers": [0.9, 0.55], "ssm_multipliers": [0.35, 1.4, 0.65, 1.8, 0.5],
}


def tiny_config(**overrides) -> FalconH1Config:
    """The tiny preset (2 layers, chunk 16) with non-unit multipliers and any overrides."""
    return FalconH1Config.from_preset("tiny", **{**MULTIPLIERS, **overrides})


def hf_model(config: FalconH1Config, seed: int = 0, dtype=torch.float32):
    """transformers' FalconH1ForCausalLM for the same config, with random (not default) values in every tensor,
    norms and per-head Mamba parameters included, so no parameter can hide behind its initial value."""
    import transformers

    hf_config = transformers.FalconH1Config.from_dict(config.to_dict())
    hf_config._attn_implementation = "eager"
    model = transformers.FalconH1ForCausalLM(hf_config)
    randomize_(model, seed)
    return model.to(dtype).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (of a gyrfalcon or a transformers model; the names are the same)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(p):
        return torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype)

    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.rand(p.shape, generator=generator) * 4 + 0.5))
        elif name.endswith(("D", "dt_bias")) or "norm" in name:
            p.copy_(1.0 + 0.3 * randn(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * randn(p))
        else:
            p.copy_(0.08 * randn(p))
    return model


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (NaN anywhere gives inf)."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- kernel tests
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest): one bf16 ulp of slack there.
BF16_FLOOR = 2 ** -7 if os.environ.get("TRITON_INTERPRET") == "1" else 2 ** -8


def rand_on_device(*shape, dtype, gen, scale=1.0) -> torch.Tensor:
    """Normal values (times scale) drawn on the CPU from gen, then moved to DEV in dtype."""
    return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)


def _to_float64(t):
    if isinstance(t, list):
        return [_to_float64(u) for u in t]
    return t.to(torch.float64) if torch.is_tensor(t) and t.is_floating_point() else t


def check_against_float64(got, ref_fn, inputs, dtype, fp32_tol: float) -> None:
    """got (in dtype) vs ref_fn on float64 copies of inputs (tensors, or lists of them): within fp32_tol for fp32;
    otherwise within 2x the error of ref_fn itself in dtype, plus BF16_FLOOR."""
    exact = ref_fn(*[_to_float64(t) for t in inputs])
    assert got.shape == exact.shape and got.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(got, exact) <= fp32_tol
    else:
        eager = ref_fn(*inputs)
        assert rel_err(got, exact) <= 2 * rel_err(eager, exact) + BF16_FLOOR


def compile_script_last_line(script: str, timeout: int = 600) -> str:
    """Run `script` (which compiles kernels for sm_90) in a Python subprocess without TRITON_INTERPRET: the
    interpreter does not type-check kernels as the compiler does, and no GPU is needed to compile. Fails the test
    with the script's stderr if it fails; returns the last line of its output. Skips without Triton's NVIDIA
    backend."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]
