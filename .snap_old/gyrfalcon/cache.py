"""HybridCache: Falcon-H1's decoding state in preallocated, fixed-address buffers, and attention over it.

Every decoder layer has an attention (keys and values grow with the text) and a Mamba mixer (a fixed-size state),
so the cache holds, for `batch` rows (slots) and every layer:

    k, v    (layers, batch, kv_heads, capacity, head_dim)   model dtype; keys after the key multiplier and RoPE
    conv    (layers, batch, conv_dim, d_conv - 1)            model dtype; the last d_conv-1 UNSCALED in_proj x|B|C
                                                             outputs (the µP x/B/C factors live in the conv weight)
    ssm     (layers, batch, heads, head_dim, d_state)        float32 (float64 for a float64 model)
    lengths (batch,) int64                                   tokens cached per row

Optionally (`load_conv_weights`) the Mamba conv weights with their µP factors folded in, (layers, conv_dim,
d_conv) fp32: computed once per generate call instead of at every decode step (six small kernels per layer less).

Row i's real tokens sit in KV columns 0 .. lengths[i]-1 and a token's column is its RoPE position: left padding is
never stored, so rows of different prompt lengths need no padding mask after the prefill, and a decode step writes
each row's token at column lengths[i]. The buffers never move, so a decode step can be captured in a CUDA graph.

A forward call with a cache is described by a `CacheStep` (where each new token goes, which keys it reads, whether it
is a one-token decode step); `CacheStep.layer(i)` gives the per-layer view the model's layers use. The host keeps
its own copy of the lengths (`host_lengths`), updated without reading the device: by the prefill (which knows its
mask) and by `advance_host` after decode steps (each adds one token to every row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .config import FalconH1Config

# KV lengths a decode step reads come in buckets (one CUDA graph per bucket): multiples of 256 up to 1024, then four
# buckets per doubling, so attention reads at most ~25% more key columns than the longest row holds.
_MIN_BUCKET = 256


def kv_bucket(n: int) -> int:
    """The smallest bucket length >= n (n >= 1): 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, ..."""
    if n < 1:
        raise ValueError(f"kv_bucket needs n >= 1, got {n}")
    grain = max(_MIN_BUCKET, 1 << max(0, n.bit_length() - 3))
    return -(-n // grain) * grain


class HybridCache:
    """Preallocated KV, conv and SSM states for `batch` rows of up to `capacity` tokens each (see module docstring).

        cache = HybridCache.for_model(model, batch=4, capacity=1024)
        logits = model(ids, attention_mask=mask, cache=cache).logits      # prefill, in as many pieces as wanted
        logits = model.decode_step(next_ids, cache, kv_len=kv_bucket(max(cache.host_lengths) + 1))
        cache.advance_host(1)
    """

    def __init__(self, config: FalconH1Config, batch: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        if batch < 1 or capacity < 1:
            raise ValueError(f"HybridCache needs batch >= 1 and capacity >= 1, got {batch} and {capacity}")
        self.config = config
        self.batch, self.capacity = batch, capacity
        self.dtype, self.device = dtype, torch.device(device)
        n_layers, hk, d = config.num_hidden_layers, config.num_key_value_heads, config.attn_head_dim
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.k = torch.zeros(n_layers, batch, hk, capacity, d, dtype=dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.conv = torch.zeros(n_layers, batch, config.conv_dim, config.mamba_d_conv - 1, dtype=dtype,
                                device=self.device)
        self.ssm = torch.zeros(n_layers, batch, config.mamba_n_heads, config.mamba_head_dim, config.mamba_d_state,
                               dtype=state_dtype, device=self.device)
        self.conv_weights: torch.Tensor | None = None
        # the fused Mamba decode step's per-(row, group) counters (ops/mamba_decode.py): zeros, left zero by each step
        self.mamba_sync = torch.zeros(batch * config.mamba_n_groups, dtype=torch.int32, device=self.device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.rows = torch.arange(batch, device=self.device)[:, None]                 # (b, 1) for KV scatters
        self.host_lengths = [0] * batch
        rope = config.rope
        self.dynamic_rope = rope["rope_type"] == "dynamic"
        # Frequencies fixed once (all rope types but dynamic NTK, whose frequencies depend on the length).
        self.inv_freq, self.rope_scaling = ops.rope_inv_freq(rope, config.attn_head_dim,
                                                             config.max_position_embeddings, device=self.device)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "HybridCache":
        return cls(model.config, batch, capacity, dtype=model.dtype, device=model.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.conv, self.ssm))

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every row. Keys and values are zeroed too: columns past a row's length are masked, but a masked
        NaN left by an earlier run would still poison the attention's weighted sum (0 * NaN)."""
        for t in (self.k, self.v, self.conv, self.ssm, self.lengths):
            t.zero_()
        self.host_lengths = [0] * self.batch

    @torch.no_grad()
    def load_conv_weights(self, model) -> None:
        """Store each layer's scaled conv weight (MambaMixer.scaled_conv_weight) for the decode steps to read. Call it
        again whenever the weights change: decode steps read this copy, not the parameters."""
        weights = [layer.mamba.scaled_conv_weight(*layer.mamba.block_factors()[1:4]) for layer in model.model.layers]
        if self.conv_weights is None:
            self.conv_weights = torch.empty((len(weights), *weights[0].shape), dtype=weights[0].dtype,
                                            device=self.device)
        for buffer, weight in zip(self.conv_weights, weights):
            buffer.copy_(weight)

    def advance_host(self, steps: int) -> None:
        """Record on the host that `steps` decode steps ran (each appended one token to every row)."""
        self.host_lengths = [n + steps for n in self.host_lengths]

    # ------------------------------------------------------------------ steps
    def prefill_step(self, length: int, padding_mask: torch.Tensor | None) -> "CacheStep":
        """Describe a forward call appending `length` tokens per row. padding_mask (b, length) bool: False marks
        left padding, allowed only before a row's first real token. Reads the mask on the host (a prefill may)."""
        b = self.batch
        counts = [length] * b
        if padding_mask is not None:
            if padding_mask.shape != (b, length):
                raise ValueError(f"attention_mask has shape {tuple(padding_mask.shape)}, expected {(b, length)}: "
                                 "with a cache it covers the new tokens only")
            host_mask = padding_mask.to("cpu", torch.bool)
            if length > 1 and bool((host_mask[:, 1:] < host_mask[:, :-1]).any()):
                raise ValueError("attention_mask with a cache must be left padding: 0s before a row's tokens, "
                                 "never after one")
            counts = host_mask.sum(-1).tolist()
            padded = [i for i, c in enumerate(counts) if c < length]
            started = [i for i in padded if self.host_lengths[i] > 0]
            if started:
                raise ValueError(f"rows {started} already hold tokens: padding may only precede a row's first token")
            if not padded:
                padding_mask = None
        new_lengths = [n + c for n, c in zip(self.host_lengths, counts)]
        # padding's keys go to the last column (below), so a padded call must leave it free
        room = self.capacity - (padding_mask is not None)
        if max(new_lengths) > room:
            raise ValueError(f"the cache holds {self.capacity} tokens per row ({room} in a call with padding); this "
                             f"call would need {max(new_lengths)}: allocate a larger cache")
        offsets = torch.arange(length, device=self.device)
        if padding_mask is None:
            positions = self.lengths[:, None] + offsets
            columns = positions
        else:
            mask = padding_mask.to(self.device, torch.bool)
            positions = self.lengths[:, None] + mask.long().cumsum(-1) - 1
            # Padding queries get position 0 (finite, unused); their keys go to the last column, which no row
            # reads before writing it itself (a row reads only columns below its length).
            positions = positions.clamp(min=0)
            columns = torch.where(mask, positions, torch.full_like(positions, self.capacity - 1))
        uniform = padding_mask is None and len(set(self.host_lengths)) == 1
        kv_len = max(new_lengths)
        attn_mask = None
        if not uniform:
            keys = torch.arange(kv_len, device=self.device)
            attn_mask = (keys[None, None, :] <= positions[:, :, None])[:, None]        # (b, 1, l, kv_len)
        return CacheStep(self, positions, columns, kv_len, decoding=False, attn_mask=attn_mask,
                         new_host_lengths=new_lengths)

    def decode_step(self, kv_len: int) -> "CacheStep":
        """Describe one decode token per row, reading `kv_len` key columns (>= every row's length + 1). Touches no
        host state and reads nothing back: safe inside CUDA graph capture."""
        if not 1 <= kv_len <= self.capacity:
            raise ValueError(f"kv_len must lie in [1, {self.capacity}], got {kv_len}")
        positions = self.lengths[:, None]
        # No mask: the decode attention reads each row's length (the reference builds its mask from it).
        return CacheStep(self, positions, positions, kv_len, decoding=True)

    def rope_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_rope:
            return self.inv_freq
        # Dynamic NTK depends on the longest position in the call (as the model's full forward); reads it back.
        seq_len = int(positions.max()) + 1
        cfg = self.config
        return ops.rope_inv_freq(cfg.rope, cfg.attn_head_dim, cfg.max_position_embeddings, seq_len,
                                 device=self.device)[0]


@dataclass
class CacheStep:
    """Where one forward call reads and writes a HybridCache.

    positions (b, l): each new token's RoPE position; columns (b, l): its KV column; kv_len: key columns the
    attention reads; decoding: one token per row through the recurrent updates (conv update + SSD step) instead of
    the chunked prefill ops; attn_mask (b, 1, l, kv_len) bool or None (then all rows hold the same columns and the
    attention is causal, aligned at the bottom right; a decode step has none: its attention reads the lengths)."""

    cache: HybridCache
    positions: torch.Tensor
    columns: torch.Tensor
    kv_len: int
    decoding: bool
    attn_mask: torch.Tensor | None = None
    new_host_lengths: list[int] | None = None

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)

    def finish(self) -> None:
        """After the forward: count the new tokens (device lengths; host lengths for a prefill)."""
        cache = self.cache
        if self.decoding:
            cache.lengths.add_(1)
            return
        cache.lengths.copy_(torch.tensor(self.new_host_lengths, device=cache.device))
        cache.host_lengths = list(self.new_host_lengths)


class LayerCache:
    """One layer's view of a CacheStep: its conv / SSM state slices, and attention that first stores the new keys
    and values, then reads the cached ones."""

    def __init__(self, step: CacheStep, index: int):
        self.step = step
        cache = step.cache
        self.k, self.v = cache.k[index], cache.v[index]                 # (b, hk, capacity, d)
        self.conv_state, self.ssm_state = cache.conv[index], cache.ssm[index]
        self.conv_weight = cache.conv_weights[index] if cache.conv_weights is not None else None
        self.mamba_sync = cache.mamba_sync  # shared by the layers: each step leaves it zero for the next

    @property
    def decoding(self) -> bool:
        return self.step.decoding

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """A prefill's attention: q (b, hq, l, d); k, v (b, hk, l, d) of the new tokens (keys already rotated and
        multiplied), stored, then attended with the cached ones. Returns (b, hq, l, d). Decode steps: decode_attend."""
        step = self.step
        rows = step.cache.rows
        self.k[rows, :, step.columns] = k.transpose(1, 2)
        self.v[rows, :, step.columns] = v.transpose(1, 2)
        keys, values = self.k[:, :, :step.kv_len], self.v[:, :, :step.kv_len]
        if step.attn_mask is not None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.attn_mask, scale=scale,
                                                  enable_gqa=q.shape[1] != keys.shape[1])
        return ops.cached_prefill_attention(q, keys, values, scale)

    def decode_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      *, key_factor: float, scale: float, q_factor: float = 1.0, v_factor: float = 1.0) -> torch.Tensor:
        """A decode step's attention from the projections: q (b, hq, d), k, v (b, hk, d) (not yet rotated, nor
        multiplied by their factors), cos, sin (b, d). RoPE, the factors and the cache writes at each row's position
        are one fused op (ops.rope_store_decode); then attention over the cached columns. Returns (b, hq, 1, d)."""
        step = self.step
        lengths = step.positions[:, 0]
        q = ops.rope_store_decode(q, k, v, cos, sin, key_factor, self.k, self.v, lengths, q_factor=q_factor,
                                  v_factor=v_factor)
        return ops.decode_attention(q, self.k, self.v, lengths, step.kv_len, scale)[:, :, None]
