"""The five suites, run inside a worker process for one system: each turns a Workload into records.

    train     LoRA fine-tuning step: forward + backward + AdamW step, activation checkpointing as in Settings;
              tokens/s, step time, allocator peak, model TFLOP/s and its share of the peak (flops.py)
    prefill   a no-grad forward over the prompt with logits for the last position only; tokens/s, peak
    decode    greedy generation of `new_tokens` after a `prompt`; per-step time = (T(new) - T(1)) / (new - 1),
              so prefill is excluded; tokens/s = batch / step time; bytes per step (flops.py) over the bandwidth
    kernels   one op as each system runs it (the SSD scan, the whole Mamba mixer, the one-token state update);
              milliseconds per call from CUDA events
    maxlen    the longest sequence that trains at batch 1: after one untimed warm-up step at <= 1024 tokens,
              doubling from maxlen_start, then bisection; a probe fails on out-of-memory or when a step takes
              longer than probe_limit_s
Every workload builds its own model (random init on the device, seeded) and frees it before the next one.
An error inside a workload becomes a record with status oom / unsupported / unavailable / failed.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import FalconH1Config
from . import flops
from .plan import Settings, Workload
from .records import HEADLINE, make_record
from .systems import Unavailable, Unsupported, torch_dtype
from .timing import free_memory, measure, op_time_ms, peak_gib, repeats_within, reset_peak, timed_call


class ProbeTimeout(Exception):
    """A maxlen probe took longer than its limit."""


@dataclass
class Context:
    system: object
    settings: Settings
    device: torch.device
    run_id: str
    env: dict
    emit: Callable[[dict], None]
    describe: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.settings.dtype)

    def record(self, workload: Workload, metric: str, value, *, status: str = "ok", reason: str | None = None,
               extra: dict | None = None, params: dict | None = None) -> dict:
        rec = make_record(system=self.system.name, suite=workload.suite, shape=workload.shape,
                          workload=workload.params if params is None else params, metric=metric, value=value,
                          status=status, reason=reason, settings=self.settings.to_dict(), env=self.env,
                          run_id=self.run_id, extra={**(extra or {}), "system_detail": self.describe})
        self.emit(rec)
        return rec


def classify(err: BaseException) -> tuple[str, str]:
    """(status, reason) of an exception raised inside a workload."""
    text = f"{type(err).__name__}: {err}".strip()
    if len(text) > 600:
        text = text[:600] + " ..."
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "oom", text
    if isinstance(err, Unsupported):
        return "unsupported", str(err)
    if isinstance(err, Unavailable):
        return "unavailable", str(err)
    if isinstance(err, ProbeTimeout):
        return "timeout", str(err)
    return "failed", text


def random_ids(vocab: int, batch: int, seqlen: int, device: torch.device, seed: int) -> torch.Tensor:
    """Token ids drawn on the CPU from a seeded generator, so every system sees the same ones."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seqlen), generator=generator).to(device)


def _ok_or_unmeasured(ctx: Context, workload: Workload, metric: str, value, extra: dict) -> None:
    if value is None:
        ctx.record(workload, metric, None, status="unavailable", reason=f"no allocator statistics on {ctx.device}",
                   extra=extra)
    else:
        ctx.record(workload, metric, value, extra=extra)


# ---------------------------------------------------------------------------------------------- train
def _train_setup(ctx: Context, cfg: FalconH1Config):
    s = ctx.settings
    model = ctx.system.build(cfg, ctx.dtype, ctx.device, s.seed)
    if s.gradient_checkpointing:
        ctx.system.enable_checkpointing(model)
    model = ctx.system.add_lora(model, s)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters after adding LoRA")
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    return model, optimizer, sum(p.numel() for p in params)


def _train_step(ctx: Context, model, optimizer, ids: torch.Tensor, losses: list, *, graphs: bool = True) -> None:
    """forward + backward + AdamW step, as the system trains (gyrfalcon: its CUDA-graph step when `graphs`)."""
    losses.append(ctx.system.train_step(model, optimizer, ids, graphs=graphs))


def run_train(ctx: Context, workload: Workload) -> None:
    cfg = FalconH1Config.from_preset(workload.shape)
    s, b, l = ctx.settings, workload.params["batch"], workload.params["seqlen"]
    model, optimizer, trainable = _train_setup(ctx, cfg)
    ids = random_ids(cfg.vocab_size, b, l, ctx.device, s.seed)
    losses: list = []
    # The peak covers the warm-up too: a CUDA-graph step allocates its activations once, while capturing, and
    # its replays allocate nothing, so a peak taken over the timed steps alone would miss them.
    reset_peak(ctx.device)
    timing = measure(lambda: _train_step(ctx, model, optimizer, ids, losses), ctx.device,
                     warmup=s.warmup["train"], repeats=s.repeats["train"], limit_s=s.workload_limit_s)
    peak = peak_gib(ctx.device)
    step_info = ctx.system.train_step_info(model)
    ctx.system.release_train_step(model)  # the graph holds the model and its activations' pool
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {loss}")
    step = timing.median
    model_flops = flops.train_flops(cfg, b, l)
    extra = {**timing.extra(), "loss": loss, "trainable_params": trainable, "model_flops_per_step": model_flops,
             **step_info}
    ctx.record(workload, "tokens_per_s", b * l / step, extra=extra)
    ctx.record(workload, "step_s", step, extra=extra)
    _ok_or_unmeasured(ctx, workload, "peak_gib", peak, extra)
    ctx.record(workload, "model_tflops", model_flops / step / 1e12, extra=extra)
    ctx.record(workload, "flops_share", model_flops / step / s.peak_flops,
               extra={**extra, "peak_flops": s.peak_flops})


# ---------------------------------------------------------------------------------------------- prefill
def run_prefill(ctx: Context, workload: Workload) -> None:
    cfg = FalconH1Config.from_preset(workload.shape)
    s, b, l = ctx.settings, workload.params["batch"], workload.params["seqlen"]
    model = ctx.system.build(cfg, ctx.dtype, ctx.device, s.seed)
    model.eval()
    ids = random_ids(cfg.vocab_size, b, l, ctx.device, s.seed)
    with torch.no_grad():
        timing = measure(lambda: ctx.system.prefill(model, ids), ctx.device, warmup=s.warmup["prefill"],
                         repeats=s.repeats["prefill"], limit_s=s.workload_limit_s,
                         before_timed=lambda: reset_peak(ctx.device))
    peak = peak_gib(ctx.device)
    step = timing.median
    model_flops = flops.forward_flops(cfg, b, l, logits="last")
    extra = {**timing.extra(), "model_flops_per_call": model_flops}
    ctx.record(workload, "tokens_per_s", b * l / step, extra=extra)
    ctx.record(workload, "step_s", step, extra=extra)
    _ok_or_unmeasured(ctx, workload, "peak_gib", peak, extra)
    ctx.record(workload, "flops_share", model_flops / step / s.peak_flops, extra={**extra, "peak_flops": s.peak_flops})


# ---------------------------------------------------------------------------------------------- decode
def decode_step_seconds(short_s: list[float], long_s: list[float], new_tokens: int) -> float:
    """Seconds per decode step from generate timings with 1 and with `new_tokens` new tokens (medians)."""
    if new_tokens < 2:
        raise ValueError("decode timing needs new_tokens >= 2")
    step = (statistics.median(long_s) - statistics.median(short_s)) / (new_tokens - 1)
    if step <= 0:
        raise RuntimeError(f"generating {new_tokens} tokens was not slower than generating 1 "
                           f"({statistics.median(long_s):.4f} s vs {statistics.median(short_s):.4f} s)")
    return step


def run_decode(ctx: Context, workload: Workload) -> None:
    cfg = FalconH1Config.from_preset(workload.shape)
    s = ctx.settings
    b, prompt, new = workload.params["batch"], workload.params["prompt"], workload.params["new_tokens"]
    model = ctx.system.build(cfg, ctx.dtype, ctx.device, s.seed)
    model.eval()
    ids = random_ids(cfg.vocab_size, b, prompt, ctx.device, s.seed)

    def generate(n: int):
        out = ctx.system.generate(model, ids, n)
        if tuple(out.shape) != (b, prompt + n):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(b, prompt + n)} "
                               f"({n} new tokens; stopped early?)")
        return out

    with torch.no_grad():
        warm = [timed_call(lambda: generate(min(new, 8)), ctx.device)[1] for _ in range(s.warmup["decode"])]
        short = [timed_call(lambda: generate(1), ctx.device)[1] for _ in range(s.repeats["decode_short"])]
        reset_peak(ctx.device)
        long = [timed_call(lambda: generate(new), ctx.device)[1]]
        wanted = repeats_within(s.workload_limit_s, long[0], s.repeats["decode"])
        long += [timed_call(lambda: generate(new), ctx.device)[1] for _ in range(wanted - 1)]
    peak = peak_gib(ctx.device)
    step = decode_step_seconds(short, long, new)
    context = flops.mean_decode_context(prompt, new)
    item = torch.empty((), dtype=ctx.dtype).element_size()
    moved = flops.decode_bytes_per_step(cfg, b, context, weight_bytes=item, cache_bytes=item)
    extra = {"generate_1_s": short, "generate_new_s": long, "warmup_s": warm, "repeats": len(long),
             "bytes_per_step": moved, "mean_context": context}
    ctx.record(workload, "tokens_per_s", b / step, extra=extra)
    ctx.record(workload, "ms_per_step", step * 1e3, extra=extra)
    ctx.record(workload, "e2e_tokens_per_s", b * new / statistics.median(long), extra=extra)
    _ok_or_unmeasured(ctx, workload, "peak_gib", peak, extra)
    ctx.record(workload, "bandwidth_share", moved["total"] / step / s.peak_bytes_per_s,
               extra={**extra, "peak_bytes_per_s": s.peak_bytes_per_s})


# ---------------------------------------------------------------------------------------------- kernels
def _randn(shape, dtype, device, generator, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=generator) * scale + shift).to(device=device, dtype=dtype)


def ssd_inputs(cfg: FalconH1Config, batch: int, seqlen: int, dtype: torch.dtype, device: torch.device, seed: int):
    """x (b, l, h, p), dt (b, l, h) raw, A_log (h,), B, C (b, l, g, n), D (h,), dt_bias (h,): Mamba-2-like
    ranges (dt after softplus in [1e-3, 1e-1], A in [-16, -1]); the per-head parameters in fp32."""
    g = torch.Generator().manual_seed(seed)
    h, p, n, ng = cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_d_state, cfg.mamba_n_groups
    dt_target = torch.exp(torch.rand(h, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "x": _randn((batch, seqlen, h, p), dtype, device, g),
        "dt": _randn((batch, seqlen, h), dtype, device, g, scale=0.5),
        "A_log": torch.log(torch.rand(h, generator=g) * 15 + 1).to(device),
        "B": _randn((batch, seqlen, ng, n), dtype, device, g),
        "C": _randn((batch, seqlen, ng, n), dtype, device, g),
        "D": (1 + 0.1 * torch.randn(h, generator=g)).to(device),
        "dt_bias": (dt_target + torch.log(-torch.expm1(-dt_target))).to(device),   # softplus^-1
    }


@torch.no_grad()
def init_by_name_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from its name, with values drawn on the CPU: the same values in every system for
    modules whose parameter names match (gyrfalcon and transformers use the checkpoints' names)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            value = torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32))
        elif leaf in ("D", "dt_bias") or "norm" in name:
            value = torch.ones(p.shape)
        elif leaf == "bias":
            value = torch.zeros(p.shape)
        else:
            value = torch.randn(p.shape, generator=g) * 0.02
        p.copy_(value.reshape(p.shape))


def _clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def _kernel_fn(ctx: Context, cfg: FalconH1Config, params: dict) -> tuple[Callable[[], object], dict]:
    """The timed closure of a kernels workload, and what it runs."""
    op, kind, b = params["op"], params["pass"], params["batch"]
    dev, dtype, seed = ctx.device, ctx.dtype, ctx.settings.seed
    backward = kind == "fwd+bwd"
    if op == "ssd_scan":
        inputs = ssd_inputs(cfg, b, params["seqlen"], dtype, dev, seed)
        if not backward:
            return ctx.system.ssd_scan(cfg, inputs)[0], {"op": "ssd_scan"}
        for t in inputs.values():
            t.requires_grad_()
        call, made = ctx.system.ssd_scan(cfg, inputs)
        leaves = [*inputs.values(), *made]
        dy = torch.randn_like(inputs["x"])

        def fwd_bwd():
            _clear_grads(leaves)
            call().backward(dy)
        return fwd_bwd, {"op": "ssd_scan"}
    if op == "mamba_mixer":
        # The mixer of a one-layer model, built as each system builds its full model (buffers, dtype policy).
        mixer = ctx.system.build(cfg.replace(num_hidden_layers=1), dtype, dev, seed).model.layers[0].mamba
        init_by_name_(mixer, seed)
        g = torch.Generator().manual_seed(seed)
        x = _randn((b, params["seqlen"], cfg.hidden_size), dtype, dev, g)
        if not backward:
            mixer.eval()
            return (lambda: mixer(x)), {"module": type(mixer).__name__}
        mixer.train()
        x.requires_grad_()
        leaves = [x, *mixer.parameters()]
        dy = torch.randn_like(x)

        def mixer_fwd_bwd():
            _clear_grads(leaves)
            mixer(x).backward(dy)
        return mixer_fwd_bwd, {"module": type(mixer).__name__}
    if op == "decode_step":
        if backward:
            raise ValueError("decode_step has a forward pass only")
        full = ssd_inputs(cfg, b, 1, dtype, dev, seed)
        token = {k: (v[:, 0] if k in ("x", "dt", "B", "C") else v) for k, v in full.items()}
        g = torch.Generator().manual_seed(seed + 1)
        h, p, n = cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_d_state
        state = (0.1 * torch.randn(b, h, p, n, generator=g)).to(dev)                 # fp32, as both caches keep it
        return ctx.system.decode_step(cfg, state, token), {"op": "decode_step"}
    raise ValueError(f"unknown kernels op {op!r}")


def run_kernels(ctx: Context, workload: Workload) -> None:
    cfg = FalconH1Config.from_preset(workload.shape)
    s = ctx.settings
    fn, what = _kernel_fn(ctx, cfg, workload.params)
    grad = torch.enable_grad() if workload.params["pass"] == "fwd+bwd" else torch.no_grad()
    with grad:
        samples, first, iters = op_time_ms(fn, ctx.device, warmup=s.warmup["kernels"], repeats=s.repeats["kernels"])
    ctx.record(workload, "ms", statistics.median(samples),
               extra={"samples_ms": [round(v, 5) for v in samples], "first_call_s": round(first, 4),
                      "calls_per_sample": iters, **what})


# ---------------------------------------------------------------------------------------------- maxlen
def round_to(value: float, granularity: int) -> int:
    return max(granularity, int(round(value / granularity)) * granularity)


def maxlen_result(probes: list[dict], *, cap: int) -> tuple[int | None, str, str | None, dict]:
    """(max_seqlen, status, reason, extra) from probe records (metric probe_step_s, workload seqlen).
    The longest length whose probe succeeded; 'limited_by' says what stopped the search at the next length."""
    ok = sorted(p["workload"]["seqlen"] for p in probes if p["status"] == "ok")
    failed = sorted((p["workload"]["seqlen"], p["status"]) for p in probes if p["status"] != "ok")
    best = ok[-1] if ok else None
    above = [(length, status) for length, status in failed if best is None or length > best]
    extra = {"probes": [(p["workload"]["seqlen"], p["status"], p["value"]) for p in probes], "cap": cap}
    if best is None:
        smallest = failed[0] if failed else None
        reason = (f"no tried length trains (smallest tried {smallest[0]}: {smallest[1]})" if smallest
                  else "no probe ran")
        status = smallest[1] if smallest and smallest[1] in ("oom", "timeout") else "failed"
        return None, status, reason, extra
    extra["limited_by"] = above[0][1] if above else "cap"
    extra["first_failure"] = above[0][0] if above else None
    return best, "ok", None, extra


def run_maxlen(ctx: Context, workload: Workload) -> None:
    cfg = FalconH1Config.from_preset(workload.shape)
    s = ctx.settings
    model, optimizer, _ = _train_setup(ctx, cfg)
    # One untimed step at a short length first: one-time costs (a system's first-call kernel autotuning, over a
    # minute for mamba_ssm) must not count as the first probe's step and end the search there.
    warm_ids = random_ids(cfg.vocab_size, workload.params["batch"], min(s.maxlen_start, 1024), ctx.device, s.seed)
    _train_step(ctx, model, optimizer, warm_ids, [], graphs=False)
    free_memory(ctx.device)
    probes: list[dict] = []
    last: list[tuple[int, float]] = []      # (length, step seconds) of the last successful probe

    def probe(length: int) -> bool:
        params = {"batch": workload.params["batch"], "seqlen": length}
        status, reason, step, peak = "ok", None, None, None
        # Attention makes long steps grow quadratically: do not start a probe predicted to overrun its limit.
        if last and last[-1][1] * (length / last[-1][0]) ** 2 > s.probe_limit_s:
            status, reason = "timeout", (f"predicted step time over the {s.probe_limit_s} s limit "
                                         f"(quadratic from {last[-1][1]:.1f} s at {last[-1][0]})")
        else:
            status, reason, step, peak = _probe(ctx, model, optimizer, cfg, params)
        free_memory(ctx.device)
        probes.append(ctx.record(workload, "probe_step_s", step, status=status, reason=reason,
                                 extra={"peak_gib": peak}, params=params))
        print(f"[bench] {ctx.system.name} maxlen {workload.shape} seqlen {length}: {status}"
              + (f" ({step:.2f} s)" if step is not None else ""), flush=True, file=sys.stderr)
        if status == "ok":
            last.append((length, step))
        return status == "ok"

    lo, hi, length = 0, None, s.maxlen_start
    while length <= s.maxlen_cap:
        if not probe(length):
            hi = length
            break
        lo, length = length, length * 2
    if lo == 0 and hi is not None:           # even the start failed: halve down to the granularity
        length = hi // 2
        while length >= s.maxlen_granularity and probe(length) is False:
            hi, length = length, length // 2
        lo = length if length >= s.maxlen_granularity else 0
    if lo and hi:
        for _ in range(s.maxlen_bisect_steps):
            mid = round_to((lo + hi) / 2, s.maxlen_granularity)
            if not lo < mid < hi:
                break
            if probe(mid):
                lo = mid
            else:
                hi = mid
    value, status, reason, extra = maxlen_result(probes, cap=s.maxlen_cap)
    ctx.record(workload, "max_seqlen", value, status=status, reason=reason, extra=extra)


def _probe(ctx: Context, model, optimizer, cfg: FalconH1Config, params: dict):
    """One maxlen probe: a warm-up step then a timed step at this length. (status, reason, step_s, peak_gib)."""
    s = ctx.settings
    losses: list = []
    try:
        ids = random_ids(cfg.vocab_size, params["batch"], params["seqlen"], ctx.device, s.seed)
        _, first = timed_call(lambda: _train_step(ctx, model, optimizer, ids, losses, graphs=False), ctx.device)
        if first > s.probe_limit_s:
            raise ProbeTimeout(f"first step took {first:.1f} s, over the {s.probe_limit_s} s limit")
        reset_peak(ctx.device)
        _, step = timed_call(lambda: _train_step(ctx, model, optimizer, ids, losses, graphs=False), ctx.device)
        if step > s.probe_limit_s:
            raise ProbeTimeout(f"step took {step:.1f} s, over the {s.probe_limit_s} s limit")
        if not math.isfinite(float(losses[-1])):
            raise RuntimeError("non-finite loss")
        return "ok", None, step, peak_gib(ctx.device)
    except Exception as err:  # a failed probe bounds the search; what failed is in the record
        optimizer.zero_grad(set_to_none=True)
        status, reason = classify(err)
        return status, reason, None, None


# ---------------------------------------------------------------------------------------------- dispatch
RUNNERS: dict[str, Callable[[Context, Workload], None]] = {
    "train": run_train, "prefill": run_prefill, "decode": run_decode, "kernels": run_kernels, "maxlen": run_maxlen,
}


# Errors after which the process's CUDA context is unusable: the worker must stop and a fresh one continue.
CONTEXT_LOST = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
                "CUBLAS_STATUS_EXECUTION_FAILED", "an illegal instruction")


def context_lost(reason: str | None) -> bool:
    return bool(reason) and any(text in reason for text in CONTEXT_LOST)


def run_workload(ctx: Context, workload: Workload) -> tuple[str, str] | None:
    """Run one workload; an error becomes records with its status for the suite's headline metrics and is
    returned as (status, reason) (None when the workload ran)."""
    failure = None
    try:
        RUNNERS[workload.suite](ctx, workload)
    except Exception as err:  # reported, not dropped: the record carries the error
        failure = classify(err)
    # Outside the except block: the exception's frames (and the tensors they hold) are gone before freeing.
    if not (failure and context_lost(failure[1])):
        free_memory(ctx.device)
    if failure is not None:
        status, reason = failure
        for metric in HEADLINE[workload.suite]:
            ctx.record(workload, metric, None, status=status, reason=reason)
    return failure
