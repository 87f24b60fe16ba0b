"""What a benchmark run measures: the settings every system shares, and the workloads of each plan.

A workload is one point to measure: a suite, a shape (a preset of gyrfalcon.presets: the released Falcon-H1
sizes, random-init weights) and the suite's parameters, e.g.
    Workload("train", "7B", {"batch": 1, "seqlen": 2048})
    Workload("decode", "0.5B", {"batch": 16, "prompt": 512, "new_tokens": 128})
    Workload("kernels", "0.5B", {"op": "ssd_scan", "pass": "fwd+bwd", "batch": 4, "seqlen": 2048})
    Workload("maxlen", "7B", {"batch": 1})
Every system of a run measures the same workloads under the same Settings (dtype, LoRA rank and targets,
activation checkpointing, optimizer, seeds, repeats): the runner hands one Settings object to all workers.

Plans:
    default   training and prefill at the anchor shapes of shared/baselines (0.5B and 7B), the headline figures;
              sized for one device call of under 9 minutes on an H100 for the three systems (mamba_ssm's first-call
              autotuning, about 2 minutes per shape, is most of hf-kernels' share)
    extra     decoding and the Mamba kernels at the same shapes (a second call: with them the anchors take
              about 14 minutes, more than one call allows)
    sweep     training tokens/s and memory against sequence length, decoding tokens/s against batch (the plots)
    maxlen    the longest sequence that trains at batch 1, per system (doubling, then bisection)
    all       all of the above
`--suites`, `--shapes` and `--systems` select from a plan; `--resume` skips what a results file already holds,
so a plan too long for one call is finished by the next ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .records import SUITES, SYSTEMS

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj")
KERNEL_OPS = (("ssd_scan", "fwd"), ("ssd_scan", "fwd+bwd"), ("mamba_mixer", "fwd"), ("mamba_mixer", "fwd+bwd"),
              ("decode_step", "fwd"))


@dataclass(frozen=True)
class Settings:
    """Everything every system shares in a run. Repeats and warm-ups are per suite; `workload_limit_s` caps the
    timed repeats of one workload (fewer repeats when one takes long; at least one), `probe_limit_s` is the
    time limit of one maxlen probe."""

    dtype: str = "bfloat16"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    gradient_checkpointing: bool = True
    optimizer: str = "AdamW(lr=1e-4), step included in the train step time"
    lr: float = 1e-4
    seed: int = 0
    warmup: dict = field(default_factory=lambda: {"train": 2, "prefill": 2, "decode": 1, "kernels": 3})
    # decode: generate calls of `new_tokens` tokens (each already averages new_tokens - 1 steps);
    # decode_short: generate calls of 1 token (the prefill subtracted from them)
    repeats: dict = field(default_factory=lambda: {"train": 3, "prefill": 5, "decode": 1, "decode_short": 3,
                                                   "kernels": 10})
    workload_limit_s: float = 60.0
    probe_limit_s: float = 90.0
    maxlen_start: int = 2048
    maxlen_cap: int = 262144
    maxlen_bisect_steps: int = 3
    maxlen_granularity: int = 1024
    peak_flops: float = 989e12
    peak_bytes_per_s: float = 3.35e12

    def with_counts(self, *, warmup: dict | None = None, repeats: dict | None = None) -> "Settings":
        """A copy with some per-suite warm-up / repeat counts changed (keys as in the defaults)."""
        for name, given, current in (("warmup", warmup, self.warmup), ("repeats", repeats, self.repeats)):
            unknown = sorted(set(given or {}) - set(current))
            if unknown:
                raise ValueError(f"unknown {name} key(s) {', '.join(unknown)}; keys: {', '.join(current)}")
            if any(not isinstance(v, int) or v < (0 if name == "warmup" else 1) for v in (given or {}).values()):
                raise ValueError(f"{name} counts must be integers >= {0 if name == 'warmup' else 1}: {given}")
        return dataclasses.replace(self, warmup={**self.warmup, **(warmup or {})},
                                   repeats={**self.repeats, **(repeats or {})})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        data = dict(data)
        if "lora_targets" in data:
            data["lora_targets"] = tuple(data["lora_targets"])
        return cls(**data)


@dataclass(frozen=True)
class Workload:
    suite: str
    shape: str
    params: dict

    def __post_init__(self):
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; suites: {', '.join(SUITES)}")

    @property
    def key(self) -> tuple:
        return (self.suite, self.shape, json.dumps(self.params, sort_keys=True))

    def label(self) -> str:
        return f"{self.suite} {self.shape} {workload_label(self.suite, self.params)}"

    def to_dict(self) -> dict:
        return {"suite": self.suite, "shape": self.shape, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        return cls(data["suite"], data["shape"], dict(data["params"]))


def workload_label(suite: str, params: dict) -> str:
    """A short human label: 'b4 x 2048', 'b16, 512 + 128 new', 'ssd_scan fwd+bwd b4 x 2048', 'b1'."""
    if suite in ("train", "prefill"):
        return f"b{params['batch']} x {params['seqlen']}"
    if suite == "decode":
        return f"b{params['batch']}, {params['prompt']} + {params['new_tokens']} new"
    if suite == "kernels":
        size = f"b{params['batch']}" + (f" x {params['seqlen']}" if "seqlen" in params else "")
        return f"{params['op']} {params['pass']} {size}"
    return f"b{params['batch']}"


# Per shape: the anchor workloads of shared/baselines (train, prefill, decode) and the sweeps.
_DEFAULT = {
    "0.5B": {"train": [(4, 2048)], "prefill": [(16, 512)], "decode": [1, 16]},
    "7B": {"train": [(1, 2048)], "prefill": [(1, 512)], "decode": [1]},
    # CPU smoke tests: a few seconds per system.
    "tiny": {"train": [(2, 64)], "prefill": [(2, 32)], "decode": [1, 2]},
}
_SWEEP = {
    "0.5B": {"train": [(1, s) for s in (1024, 2048, 4096, 8192, 16384)], "decode": [1, 4, 16, 64],
             "prefill": [(1, s) for s in (512, 2048, 8192)]},
    "7B": {"train": [(1, s) for s in (1024, 2048, 4096, 8192)], "decode": [1, 4, 16],
           "prefill": [(1, s) for s in (512, 2048, 8192)]},
    "tiny": {"train": [(1, s) for s in (32, 64)], "decode": [1, 2], "prefill": [(1, 32)]},
}
_DECODE_TOKENS = {"tiny": (16, 16)}          # (prompt, new tokens); the released shapes use (512, 128)
DEFAULT_SHAPES = ("0.5B", "7B")
PLANS = ("default", "extra", "sweep", "maxlen", "all")
HEADLINE_SUITES = ("train", "prefill")  # the default plan; the extra plan takes the anchors' other suites


def _decode_tokens(shape: str) -> tuple[int, int]:
    return _DECODE_TOKENS.get(shape, (512, 128))


def _suite_workloads(table: dict, shape: str, suites: tuple[str, ...], with_kernels: bool) -> list[Workload]:
    spec = table.get(shape)
    if spec is None:
        raise ValueError(f"no workloads for shape {shape!r}; shapes: {', '.join(table)}")
    out: list[Workload] = []
    if "train" in suites:
        out += [Workload("train", shape, {"batch": b, "seqlen": s}) for b, s in spec["train"]]
    if "prefill" in suites:
        out += [Workload("prefill", shape, {"batch": b, "seqlen": s}) for b, s in spec["prefill"]]
    if "decode" in suites:
        prompt, new = _decode_tokens(shape)
        out += [Workload("decode", shape, {"batch": b, "prompt": prompt, "new_tokens": new}) for b in spec["decode"]]
    if with_kernels and "kernels" in suites:
        b, s = spec["train"][0]
        decode_batch = max(spec["decode"])
        for op, kind in KERNEL_OPS:
            params = ({"op": op, "pass": kind, "batch": decode_batch} if op == "decode_step"
                      else {"op": op, "pass": kind, "batch": b, "seqlen": s})
            out.append(Workload("kernels", shape, params))
    return out


def plan_workloads(plan: str = "default", *, shapes: tuple[str, ...] | None = None,
                   suites: tuple[str, ...] | None = None) -> list[Workload]:
    """The workloads of `plan`, restricted to `shapes` and `suites` (None: the plan's own), shape-major order."""
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; plans: {', '.join(PLANS)}")
    shapes = tuple(shapes or DEFAULT_SHAPES)
    suites = tuple(suites or SUITES)
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise ValueError(f"unknown suite(s) {', '.join(bad)}; suites: {', '.join(SUITES)}")
    out: list[Workload] = []
    for shape in shapes:
        if plan in ("default", "all"):
            out += _suite_workloads(_DEFAULT, shape, tuple(s for s in suites if s in HEADLINE_SUITES),
                                    with_kernels=False)
        if plan in ("extra", "all"):
            out += _suite_workloads(_DEFAULT, shape, tuple(s for s in suites if s not in HEADLINE_SUITES),
                                    with_kernels=True)
        if plan in ("sweep", "all"):
            out += _suite_workloads(_SWEEP, shape, tuple(s for s in suites if s != "kernels"), with_kernels=False)
        if plan in ("maxlen", "all") and "maxlen" in suites:
            out.append(Workload("maxlen", shape, {"batch": 1}))
    seen, unique = set(), []
    for w in out:  # the sweep repeats some default points
        if w.key not in seen:
            seen.add(w.key)
            unique.append(w)
    return unique


def check_systems(systems: tuple[str, ...]) -> tuple[str, ...]:
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise ValueError(f"unknown system(s) {', '.join(bad)}; systems: {', '.join(SYSTEMS)}")
    return systems
