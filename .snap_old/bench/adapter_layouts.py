"""Benchmark (design study for issue 5): what the LoRA adapters of one decoder layer cost in three layouts of the same
products, at a released shape (default 7B, 2048 tokens, rank 16, bf16), on one GPU. Nothing here is used by the
library yet; the figures say which rewrite of `gyrfalcon/lora_autograd.py` would pay.

    python bench/adapter_layouts.py [--shape 7B] [--tokens 2048] [--rank 16]

Layouts (each timed as the forward and the backward of a whole layer's nine adapted projections, from CUDA graphs of
20 repetitions, so launch gaps count as in the captured training step):
- per_projection: what `LoRALinearFn` does now, one projection at a time: y = x W^T; h = x A^T; y += s h B^T
  (an addmm that reads and writes y); backward dh = s dy B, dx = dy W, dx += dh A, dA = dh^T x, dB = s dy^T h; the
  input gradients of projections sharing an input (in_proj, q, k, v; gate, up) summed by elementwise adds, as
  autograd sums them.
- grouped: projections sharing an input as one function: h for the group in one product (x read once), the
  group's dx accumulated by the products themselves (beta = 1) and its adapter term added once (dh_all A_all),
  dA for the group in one product.
- low_rank_first: per_projection with the products' order swapped so that no pass reads and writes a full output
  twice: the thin low-rank product writes y (y = s h B^T) and the base product adds into it in its epilogue
  (y += x W^T, beta = 1); backward likewise dx = dh A, then dx += dy W.
- grouped_low_rank_first: grouped with that order (dx = dh_all A_all first, then each member's dy W added into it).
- concatenated: the adapter inside the base product: y = [x | h] [W | s B]^T (the input buffer holds x and h side
  by side, the weight W and B side by side; the scale is left out of this study's weight), so no addmm over y;
  backward [dx' | dh'] = dy [W | B] gives dy B for free (dh = s dh'), then dx' += dh A; h for a group in one
  product; the group's dx summed by adds as in per_projection. Not counted: x written into the wider buffer by its
  producer, and B living inside the weight buffer, are assumed free.
One JSON line per (layout, pass): ms per layer, and the step share it implies over the model's layers (x2 for the
forward: activation checkpointing recomputes it). Also the base products alone (no adapters) as the floor.
"""

from __future__ import annotations

import argparse
import json

import torch

from gyrfalcon import FalconH1Config
from gyrfalcon.benchmark.timing import graph_replay_seconds


def layer_shapes(cfg: FalconH1Config) -> dict[str, list[tuple[str, int, int]]]:
    """Adapted projections of a decoder layer as (name, in, out), grouped by the input they share."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {"norm_in": [("in_proj", h, cfg.in_proj_size), ("q", h, cfg.num_attention_heads * d),
                        ("k", h, cfg.num_key_value_heads * d), ("v", h, cfg.num_key_value_heads * d)],
            "ff_in": [("gate", h, cfg.intermediate_size), ("up", h, cfg.intermediate_size)],
            "attn_o": [("o", cfg.num_attention_heads * d, h)],
            "ssm_o": [("out_proj", cfg.d_ssm, h)],
            "ff_o": [("down", cfg.intermediate_size, h)]}


def build(groups, tokens: int, r: int, dev="cuda", dt=torch.bfloat16):
    """Per group: input x (tokens, in), and per projection W (out, in), A (r, in), B (out, r), [W | B] (out, in + r),
    the upstream gradient dy (tokens, out) and h = x A^T (tokens, r) as the forward saves it."""
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen) * scale

    out = {}
    for g, projs in groups.items():
        n_in = projs[0][1]
        x = rnd(tokens, n_in)
        items = []
        for i, (_, k, n) in enumerate(projs):
            w, a, b = rnd(n, k, scale=k ** -0.5), rnd(r, k, scale=k ** -0.5), rnd(n, r, scale=0.01)
            wb = torch.cat([w, b], 1)                                        # (out, in + r)
            items.append(dict(w=w, a=a, b=b, wb=wb, dy=rnd(tokens, n), h=x @ a.t()))
        out[g] = dict(x=x, items=items, a_all=torch.cat([it["a"] for it in items]))
    return out


def scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s (a @ b) with the scale in the product's epilogue, as lora_autograd does."""
    return torch.addmm(torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=a.dtype), a, b, beta=0, alpha=s)


def per_projection(groups, s: float):
    def fwd():
        for g in groups.values():
            for it in g["items"]:
                y = g["x"] @ it["w"].t()
                h = g["x"] @ it["a"].t()
                y.addmm_(h, it["b"].t(), alpha=s)

    def bwd():
        for g in groups.values():
            dx_sum = None
            for it in g["items"]:
                dh = scaled_mm(it["dy"], it["b"], s)
                dx = it["dy"] @ it["w"]
                dx.addmm_(dh, it["a"])
                dh.t() @ g["x"]                                              # dA
                it["dy"].t() @ it["h"]                                       # dB (h saved by the forward)
                dx_sum = dx if dx_sum is None else dx_sum + dx
    return fwd, bwd


def grouped(groups, s: float, r: int):
    def fwd():
        for g in groups.values():
            h_all = g["x"] @ g["a_all"].t()                                  # (tokens, n r)
            for i, it in enumerate(g["items"]):
                y = g["x"] @ it["w"].t()
                y.addmm_(h_all[:, i * r:(i + 1) * r], it["b"].t(), alpha=s)

    def bwd():
        for g in groups.values():
            dh_all = torch.cat([scaled_mm(it["dy"], it["b"], s) for it in g["items"]], 1)
            dx = None
            for it in g["items"]:
                dx = it["dy"] @ it["w"] if dx is None else dx.addmm_(it["dy"], it["w"])
            dx.addmm_(dh_all, g["a_all"])
            dh_all.t() @ g["x"]                                              # dA for the group
            for it in g["items"]:
                it["dy"].t() @ it["h"]                                       # dB
    return fwd, bwd


def low_rank_first(groups, s: float):
    def fwd():
        for g in groups.values():
            for it in g["items"]:
                h = g["x"] @ it["a"].t()
                y = scaled_mm(h, it["b"].t(), s)
                y.addmm_(g["x"], it["w"].t())

    def bwd():
        for g in groups.values():
            dx_sum = None
            for it in g["items"]:
                dh = scaled_mm(it["dy"], it["b"], s)
                dx = dh @ it["a"]
                dx.addmm_(it["dy"], it["w"])
                dh.t() @ g["x"]                                              # dA
                it["dy"].t() @ it["h"]                                       # dB
                dx_sum = dx if dx_sum is None else dx_sum + dx
    return fwd, bwd


def grouped_low_rank_first(groups, s: float, r: int):
    def fwd():
        for g in groups.values():
            h_all = g["x"] @ g["a_all"].t()
            for i, it in enumerate(g["items"]):
                y = scaled_mm(h_all[:, i * r:(i + 1) * r], it["b"].t(), s)
                y.addmm_(g["x"], it["w"].t())

    def bwd():
        for g in groups.values():
            dh_all = torch.cat([scaled_mm(it["dy"], it["b"], s) for it in g["items"]], 1)
            dx = dh_all @ g["a_all"]
            for it in g["items"]:
                dx.addmm_(it["dy"], it["w"])
            dh_all.t() @ g["x"]                                              # dA for the group
            for it in g["items"]:
                it["dy"].t() @ it["h"]                                       # dB
    return fwd, bwd


def concatenated(groups, s: float, r: int):
    """Each projection reads its own [x | h_i] buffer (x copied in outside the timed region: a producer writing x
    there directly is assumed); h for a group in one product, its slices copied beside x (tokens x r each)."""
    bufs = {name: [torch.cat([g["x"], it["h"]], 1) for it in g["items"]] for name, g in groups.items()}

    def fwd():
        for name, g in groups.items():
            k = g["x"].shape[1]
            h_all = g["x"] @ g["a_all"].t()
            for i, (it, xh) in enumerate(zip(g["items"], bufs[name])):
                xh[:, k:].copy_(h_all[:, i * r:(i + 1) * r])
                xh @ it["wb"].t()

    def bwd():
        for name, g in groups.items():
            k = g["x"].shape[1]
            dx_sum = None
            for it, xh in zip(g["items"], bufs[name]):
                dxh = it["dy"] @ it["wb"]                                    # (tokens, in + r): [dy W | dy B]
                dh = dxh[:, k:] * s
                dx = dxh[:, :k]
                dx.addmm_(dh, it["a"])
                dh.t() @ g["x"]                                              # dA
                it["dy"].t() @ it["h"]                                       # dB
                dx_sum = dx if dx_sum is None else dx_sum + dx
    return fwd, bwd


def base_only(groups):
    def fwd():
        for g in groups.values():
            for it in g["items"]:
                g["x"] @ it["w"].t()

    def bwd():
        for g in groups.values():
            for it in g["items"]:
                it["dy"] @ it["w"]
    return fwd, bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7B")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    cfg = FalconH1Config.from_preset(args.shape)
    groups = build(layer_shapes(cfg), args.tokens, args.rank)
    s = 2.0
    layouts = {"base_only": base_only(groups), "per_projection": per_projection(groups, s),
               "grouped": grouped(groups, s, args.rank), "low_rank_first": low_rank_first(groups, s),
               "grouped_low_rank_first": grouped_low_rank_first(groups, s, args.rank),
               "concatenated": concatenated(groups, s, args.rank)}
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
                      "tokens": args.tokens, "rank": args.rank, "layers": cfg.num_hidden_layers}), flush=True)
    for name, (fwd, bwd) in layouts.items():
        for pas, fn in (("fwd", fwd), ("bwd", bwd)):
            ms = graph_replay_seconds(fn) * 1e3
            passes = 2 if pas == "fwd" else 1           # the forward runs again in the recomputation
            print(json.dumps({"layout": name, "pass": pas, "ms_per_layer": round(ms, 4),
                              "ms_per_step": round(ms * passes * cfg.num_hidden_layers, 2)}), flush=True)


if __name__ == "__main__":
    main()
