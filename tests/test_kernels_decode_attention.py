"""The decode-attention kernel (gyrfalcon/ops/decode_attention_triton.py) against float64 attention over each row's
valid cache columns: grouped query heads, rows of different lengths, a context split over several programs (merged
afterwards), fp32 and bf16 (bf16 within 2x eager SDPA's own bf16 error). Runs in Triton's CPU interpreter without a
GPU (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops import decode_attention_triton as kernel  # noqa: E402
from gyrfalcon.ops.attention import decode_attention_ref  # noqa: E402
from helpers import rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16_FLOOR = 2 ** -7 if os.environ.get("TRITON_INTERPRET") == "1" else 2 ** -8


@pytest.mark.parametrize("dtype, hq, hk, d, lengths, kv_len, split", [
    (torch.float32, 6, 2, 32, [0, 5, 40], 48, None),        # one split; a row with one valid column
    (torch.float32, 4, 4, 24, [3, 70], 96, 32),               # no grouping, padded head dim, three splits
    (torch.bfloat16, 8, 2, 64, [17, 100, 63], 128, 64),      # bf16, two splits, a row ending inside split 1
])
def test_decode_attention_matches_reference(dtype, hq, hk, d, lengths, kv_len, split, monkeypatch):
    if split is not None:
        monkeypatch.setattr(kernel, "SPLIT_LEN", split)
    gen = torch.Generator().manual_seed(0)
    b = len(lengths)
    q = torch.randn(b, hq, d, generator=gen).to(DEV, dtype)
    k_cache = torch.randn(b, hk, kv_len + 5, d, generator=gen).to(DEV, dtype)
    v_cache = torch.randn(b, hk, kv_len + 5, d, generator=gen).to(DEV, dtype)
    lengths = torch.tensor(lengths, device=DEV)
    scale = d ** -0.5 * 1.3
    got = kernel.decode_attention_triton(q, k_cache, v_cache, lengths, kv_len, scale)
    exact = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths, kv_len, scale)
    assert got.dtype == dtype and got.shape == (b, hq, d)
    if dtype == torch.float32:
        assert rel_err(got, exact) <= 1e-5
    else:
        eager = decode_attention_ref(q, k_cache, v_cache, lengths, kv_len, scale)
        assert rel_err(got, exact) <= 2 * rel_err(eager, exact) + BF16_FLOOR


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hq, hk, d", [(8, 2, 64), (12, 2, 128)])  # the 0.5B and 7B attention shapes
def test_gpu_bf16_released_shapes(hq, hk, d):
    gen = torch.Generator().manual_seed(1)
    b, kv_len = 3, 4096
    q = torch.randn(b, hq, d, generator=gen).cuda().bfloat16()
    k_cache = torch.randn(b, hk, kv_len, d, generator=gen).cuda().bfloat16()
    v_cache = torch.randn(b, hk, kv_len, d, generator=gen).cuda().bfloat16()
    lengths = torch.tensor([100, 2047, 4095], device="cuda")
    got = kernel.decode_attention_triton(q, k_cache, v_cache, lengths, kv_len, d ** -0.5)
    exact = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), lengths, kv_len, d ** -0.5)
    eager = decode_attention_ref(q, k_cache, v_cache, lengths, kv_len, d ** -0.5)
    assert rel_err(got, exact) <= 2 * rel_err(eager, exact) + BF16_FLOOR
