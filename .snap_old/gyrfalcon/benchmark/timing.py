"""Timing and memory helpers of the benchmark workers: synchronized clocks, CUDA-event op timing, allocator peaks.

Whole steps (a train step, a prefill, a generate call) are timed with a host clock between two device
synchronizations: they last milliseconds to seconds and include host work (Python, launches) that events would
hide. Single ops are timed with CUDA events around a loop of calls, so that launch gaps between repeats do not
count. On CPU both fall back to the host clock and memory peaks are None.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

GIB = 1024 ** 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(fn's result, seconds from a synchronized start to a synchronized end)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


@dataclass
class Timing:
    """Timed repeats of one workload (seconds) and what the warm-up took."""

    samples: list[float]
    warmup_s: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def extra(self) -> dict:
        return {"samples_s": [round(s, 6) for s in self.samples], "warmup_s": [round(s, 4) for s in self.warmup_s],
                "repeats": len(self.samples)}


def graph_replay_seconds(fn: Callable[[], object], reps: int = 20, rounds: int = 5) -> float:
    """Seconds per call of fn (CUDA), replayed from a CUDA graph of `reps` calls, best of `rounds` replays: launch
    gaps count as they do in a graph-captured decode step, host overhead does not (the kernel benchmarks)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def repeats_within(limit_s: float, one_s: float, wanted: int) -> int:
    """How many timed repeats fit in `limit_s` when one takes `one_s` (at least 1, at most `wanted`)."""
    if one_s <= 0:
        return wanted
    return max(1, min(wanted, int(limit_s // one_s)))


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
            limit_s: float = math.inf, before_timed: Callable[[], None] | None = None) -> Timing:
    """Run `fn` `warmup` times (Triton autotuning and compilation happen here), then time up to `repeats` runs,
    fewer when the last warm-up run says they would take longer than `limit_s` together. `before_timed` runs
    between the two phases (resetting the allocator's peak)."""
    warm = [timed_call(fn, device)[1] for _ in range(warmup)]
    if warm:
        repeats = repeats_within(limit_s, warm[-1], repeats)
    if before_timed is not None:
        before_timed()
    samples = [timed_call(fn, device)[1] for _ in range(repeats)]
    return Timing(samples, warm)


def op_time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
               target_ms: float = 20.0, max_iters: int = 200, limit_s: float = 5.0) -> tuple[list[float], float, int]:
    """Per-call milliseconds of a short op: up to `repeats` samples (fewer, at least 3, when they would take
    longer than `limit_s`), each the mean over a loop of calls sized to take about `target_ms`.
    Returns (samples_ms, first_call_s, calls per sample); the first call includes compilation and autotuning."""
    _, first = timed_call(fn, device)
    for _ in range(max(0, warmup - 1)):
        fn()
    _, one = timed_call(fn, device)
    iters = max(1, min(max_iters, int(target_ms / max(one * 1e3, 1e-3))))
    repeats = max(min(3, repeats), repeats_within(limit_s, one * iters, repeats))
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(device)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
        else:
            _, seconds = timed_call(lambda: [fn() for _ in range(iters)], device)
            samples.append(seconds * 1e3 / iters)
    return samples, first, iters


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """The caching allocator's peak of allocated memory since the last reset_peak, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def free_memory(device: torch.device) -> None:
    """Return cached blocks after a workload, so the next one starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
