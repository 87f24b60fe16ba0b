"""The decode-attention kernel (gyrfalcon/ops/decode_attention_triton.py) against float64 attention over each row's
valid cache columns: grouped query heads, rows of different lengths, a context split over several programs (merged
by a second kernel; forced by a lower SPLIT_LEN cap or chosen by split_plan for a small grid), fp32 and bf16 (bf16
within 2x eager SDPA's own bf16 error); and split_plan's contract. Runs in Triton's CPU interpreter without a GPU
(tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops import decode_attention_triton as kernel  # noqa: E402
from gyrfalcon.ops.attention import decode_attention_ref  # noqa: E402
from helpers import BF16_FLOOR, DEV, rel_err  # noqa: E402


@pytest.mark.parametrize("dtype, hq, hk, d, lengths, kv_len, split, splits", [
    (torch.float32, 6, 2, 32, [0, 5, 40], 48, None, 1),        # one split; a row with one valid column
    (torch.float32, 4, 4, 24, [3, 140], 192, 64, 3),            # no grouping, padded head dim, three splits; row 0's
                                                                #   splits 1-2 are empty, row 1 ends inside split 2
    (torch.bfloat16, 8, 2, 64, [17, 100, 63], 128, 64, 2),     # bf16; rows ending inside split 0, inside split 1, and
                                                                #   exactly at its end (split 1 empty)
    (torch.float32, 4, 1, 32, [30, 500], 512, None, None),     # a grid of 2 programs: split_plan splits on its own
])
def test_decode_attention_matches_reference(dtype, hq, hk, d, lengths, kv_len, split, splits, monkeypatch):
    if split is not None:
        monkeypatch.setattr(kernel, "SPLIT_LEN", split)
    b = len(lengths)
    planned = kernel.split_plan(b, hk, kv_len, torch.device(DEV))[0]
    assert planned == splits if splits is not None else planned > 1
    gen = torch.Generator().manual_seed(0)
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


def gpu_with(sms: int):
    """A stand-in for ops.dispatch.sm_count: `sms` SMs on a CUDA device, the default elsewhere."""
    return lambda device, cpu_default: sms if device.type == "cuda" else cpu_default


@pytest.mark.parametrize("b, hk, kv_len, expected", [
    (1, 2, 768, (12, 64)),          # 0.5B at batch 1: one 64-column block per program, 24 programs
    (64, 2, 768, (3, 256)),         # 128 programs already: 3 splits reach 2 per SM
    (128, 2, 1024, (2, 512)),       # 256 programs: one short of 2 per SM, so split in two
    (160, 2, 1024, (1, 1024)),      # 320 programs fill the grid without splitting: one launch
    (1, 2, 40, (1, 64)),            # shorter than a block
    (1, 1, 200, (4, 64)),           # the last split holds 8 columns
    (1, 2, 192, (1, 192)),          # 3 splits would save 2 blocks per program: less than the merge launch costs
    (64, 2, 256, (1, 256)),         # likewise 2 splits of 2 blocks
    (1, 2, 131072, (128, 1024)),    # long context: the SPLIT_LEN cap, not the grid, sets the count
])
def test_split_plan_h100(b, hk, kv_len, expected, monkeypatch):
    monkeypatch.setattr(kernel, "sm_count", gpu_with(132))      # an H100's SMs, without needing one
    assert kernel.split_plan(b, hk, kv_len, torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("sms", [None, 132])
def test_split_plan_contract(sms, monkeypatch):
    """split_len a multiple of BLOCK_N, at least one block, at most the SPLIT_LEN cap; the splits cover kv_len and
    each starts before it; no more splits than the target grid asks for unless the cap forces them, and the shortest
    split_len that covers kv_len with that many, or one split where splitting saves under MIN_SAVED_BLOCKS blocks; a
    function of (b, hk, kv_len, device) alone."""
    device = torch.device("cpu")
    if sms is not None:
        monkeypatch.setattr(kernel, "sm_count", gpu_with(sms))
        device = torch.device("cuda", 0)
    target = kernel._target_programs(device)
    for b in (1, 2, 3, 8, 64, 200):
        for hk in (1, 2, 8):
            for kv_len in (1, 63, 64, 65, 200, 768, 1024, 5000, 65536):
                splits, split_len = kernel.split_plan(b, hk, kv_len, device)
                assert split_len % kernel.BLOCK_N == 0 and kernel.BLOCK_N <= split_len <= kernel.SPLIT_LEN
                assert (splits - 1) * split_len < kv_len <= splits * split_len
                wanted = -(-target // (b * hk))                             # splits for b * hk * splits >= target
                assert splits <= wanted or split_len == kernel.SPLIT_LEN
                shortest = split_len == kernel.BLOCK_N or (split_len - kernel.BLOCK_N) * wanted < kv_len
                blocks = -(-kv_len // kernel.BLOCK_N)
                assert shortest or (splits == 1 and blocks - (-(-blocks // wanted)) < kernel.MIN_SAVED_BLOCKS)
                assert kernel.split_plan(b, hk, kv_len, device) == (splits, split_len)


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
