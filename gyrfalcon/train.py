"""The training loop: AdamW, warm-up + cosine/linear schedule, gradient accumulation, clipping, evaluation,
atomic checkpoints, exact resume, a progress bar, JSON-lines metrics and a loss plot.

One loop serves LoRA (only the adapters train), QLoRA (the same on a 4-bit base) and full fine-tuning (every
weight trains): it trains whatever parameters require a gradient.

- Accumulation: the micro-batches of a step are known before the step starts, so each micro-batch's mean loss is
  weighted by its share of the step's trained tokens: 2 micro-batches of 2 rows give the update 1 batch of 4 does.
- Reproducible: the seed fixes the adapters' init, the data order and dropout; on the CPU two runs with the same
  seed give the same losses bit for bit.
- Half-precision weights: the optimizer steps fp32 master copies of the bf16/fp16 parameters it trains (full
  fine-tuning of a bf16 model) and rewrites the model's weights from them after each update, since most
  fine-tuning updates are too small to change a bf16 weight (master_weights.py); gradients are clipped in fp32.
  The copies cost 4 bytes per such weight (run.json and the log say how many). LoRA adapters are fp32 already.
- Checkpoints (`<output>/checkpoints/step-N/`: the adapter or the model, optimizer.pt, rng.pt, trainer_state.json,
  and master_weights.safetensors when there are fp32 copies) are written to a temporary folder and renamed into
  place, every `save_every` steps, at the end, on Ctrl-C and on an unexpected error. Ctrl-C during an optimizer
  update is held back until the update is complete, so a checkpoint never holds half an update; one that comes
  during a micro-batch loses that step's partial work, and the checkpoint keeps the RNG state as the last completed
  step left it (not as the stopped step's dropout masks left it). `resume` restores the weights, the optimizer, the
  RNGs and the data position: the loss curve continues as if the run had never stopped. .pt files are read with
  torch.load(weights_only=True).
- A non-finite loss or gradient stops the run before the update, with a TrainingError naming the step and the last
  good checkpoint, which is left as it was.
- Output: `<output>/metrics.jsonl` (one JSON object per step and per evaluation), `loss.png` (needs matplotlib),
  `run.json` (settings, data counts, versions), and the result: `adapter/` (a PEFT adapter folder) or `model/`
  (a Hugging Face checkpoint), each with the tokenizer's files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from .checkpoint import save_model, weight_files
from .data import BatchStream, PreparedData
from .lora import has_lora
from .master_weights import HALF_DTYPES, MasterWeights
from .peft_io import TRAINING_INFO, atomic_folder, copy_adapter_weights, read_adapter_weights, write_adapter_files
from .recipes import FinetuneConfig
from .step_graph import GraphedTrainStep

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
MASTER_WEIGHTS = "master_weights.safetensors"  # in a checkpoint: the fp32 copies of half-precision trained weights
_STEP_DIR = re.compile(r"step-(\d+)")
# What a run writes into its folder (base/: a random-init base the API keeps beside the adapter; merged/: where the
# run's last message suggests merging to), and the temporary names of its atomic writes. --overwrite deletes a
# folder only if it holds nothing else.
RUN_ENTRIES = frozenset({"run.json", METRICS, "loss.png", CHECKPOINTS, "adapter", "model", "base", "merged"})
_RUN_TEMPORARY = re.compile(r"\.(run\.json|metrics\.jsonl)\.tmp|\.(adapter|model|base|merged)\.(partial|old)-.+")
# Settings that fix the data stream or the trained parameters: a checkpoint resumes only with the same values.
_RESUME_FIXED = ("method", "batch_size", "grad_accum", "seed", "max_seq_length", "packing", "lora_r", "lora_alpha",
                 "lora_targets", "use_rslora", "train_on_prompt")
# Settings that say how to run, not what is trained: a change is not worth a note.
_RESUME_FREE = ("output", "resume", "overwrite", "progress", "plot", "log_every", "device")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit); the message says what to do."""


# ---------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, *, base: float, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning rate of the update that takes the model from `step` to step + 1 (step counts from 0)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = base * min_ratio
    if schedule == "linear":
        return floor + (base - floor) * (1.0 - progress)
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(config: FinetuneConfig, micro_batches_per_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * micro_batches_per_epoch / config.grad_accum))


def warmup_steps(config: FinetuneConfig, total: int) -> int:
    return config.warmup_steps if config.warmup_steps > 0 else round(config.warmup_ratio * total)


def require_8bit_optimizer(device: torch.device):
    """bitsandbytes.optim, checked to run its 8-bit AdamW on `device`; or a TrainingError saying what is missing.

    The check is one step on a probe of 4,096 weights, the smallest that bitsandbytes keeps in 8 bits (smaller
    tensors get 32-bit state): CUDA always, the CPU in recent releases (0.50.2 runs it), other devices as they come.
    """
    device = torch.device(device)
    try:
        import bitsandbytes as bnb
    except (ImportError, OSError, RuntimeError) as err:  # old releases raise RuntimeError when their library is missing
        raise TrainingError("optimizer adamw_8bit needs bitsandbytes, which cannot be imported "
                            f"({type(err).__name__}: {err}): pip install bitsandbytes; or use optimizer "
                            "adamw") from None
    probe = torch.linspace(-1.0, 1.0, 4096, device=device)
    probe.grad = torch.linspace(1.0, -1.0, 4096, device=device)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError) as err:
        raise TrainingError(f"optimizer adamw_8bit: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run its "
                            f"8-bit AdamW on {device} ({type(err).__name__}: {err}); use a CUDA GPU (or a recent "
                            "bitsandbytes for the CPU), or optimizer adamw") from None
    return bnb.optim


# ---------------------------------------------------------------------------------------------- output folder
def latest_checkpoint(output_dir) -> Path | None:
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE).is_file()]
    return max(found)[1] if found else None


def check_output(output_dir, *, resume: bool, overwrite: bool) -> Path | None:
    """Before anything is loaded: is the run folder usable as asked? Returns the checkpoint to resume from."""
    output_dir = Path(output_dir)
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise TrainingError(f"nothing to resume: {output_dir} holds no checkpoint "
                                f"({output_dir / CHECKPOINTS}/step-N). Drop --resume to start a new run.")
        return checkpoint
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"{output_dir} is a file; choose a folder for the run's output")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        hint = " (it holds checkpoints: --resume continues that run)" if latest_checkpoint(output_dir) else ""
        if overwrite_refusal(output_dir) is not None:  # not a run of gyrfalcon's: --overwrite would refuse it too
            raise TrainingError(f"{output_dir} already exists and holds files that are not a gyrfalcon run's; "
                                "choose another --output")
        raise TrainingError(f"{output_dir} already exists and is not empty{hint}; pass --overwrite to replace it, "
                            "or choose another --output")
    if overwrite and output_dir.is_dir() and (refusal := overwrite_refusal(output_dir)):
        raise TrainingError(refusal)
    return None


def overwrite_refusal(output_dir) -> str | None:
    """Why --overwrite must not delete this folder, or None when it may: it is empty, or it is a gyrfalcon run
    folder (run.json, checkpoints/ or a result's gyrfalcon_training.json marks one) holding only what a run writes.
    `--output . --overwrite` in a folder of data must not delete the data."""
    output_dir = Path(output_dir)
    entries = sorted(output_dir.iterdir())
    if not entries:
        return None
    marked = ((output_dir / "run.json").is_file() or (output_dir / CHECKPOINTS).is_dir()
              or any((output_dir / result / TRAINING_INFO).is_file() for result in ("adapter", "model")))
    foreign = [p for p in entries if p.name not in RUN_ENTRIES and not _RUN_TEMPORARY.fullmatch(p.name)]
    if marked and not foreign:
        return None
    shown = foreign if marked else entries
    listing = ", ".join(p.name + ("/" if p.is_dir() else "") for p in shown[:5])
    listing += f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    if not marked:
        return (f"--overwrite would delete all of {output_dir}, which is not a gyrfalcon run folder (it has no "
                f"run.json or {CHECKPOINTS}/); it holds {listing}. Choose another --output, or move or delete that "
                "folder yourself if it is meant to go")
    return (f"--overwrite would delete {output_dir}, a gyrfalcon run folder that also holds what no run writes: "
            f"{listing}. Move those elsewhere first (or delete the folder yourself), or choose another --output")


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    step: int = 0                 # optimizer updates done
    micro_batches: int = 0        # micro-batches consumed (the data position)
    tokens: int = 0               # real tokens seen
    trained_tokens: int = 0       # tokens that carried loss
    elapsed_s: float = 0.0        # training time, over all resumed parts
    last_loss: float | None = None
    last_eval_loss: float | None = None


@dataclass
class TrainResult:
    output_dir: Path
    result_dir: Path | None       # adapter/ or model/ (None if the run stopped early)
    steps: int
    losses: list[float] = field(default_factory=list)     # train loss of every step, resumed parts included
    eval_loss: float | None = None
    checkpoint: Path | None = None
    base_model: str | None = None   # what the adapter's config names as its base


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def memory_gib(device: torch.device) -> float | None:
    """Peak memory: allocated on the GPU, or the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


@contextlib.contextmanager
def _hold_interrupts():
    """Hold Ctrl-C back during the block, so an update is never cut in half. Yields a list that holds the
    signal's number if Ctrl-C came meanwhile: the caller raises KeyboardInterrupt once its bookkeeping is done."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


# ---------------------------------------------------------------------------------------------- the loop
class TrainingLoop:
    """Train `model` on prepared data with the settings of a FinetuneConfig; see the module docstring.

    model: a FalconH1ForCausalLM whose trainable parameters require grad (LoRA layers attached, or all of them).
    resume_from: a checkpoint folder from check_output(); base_model_name: written into adapter_config.json.
    callbacks: functions called as f(loop, record) after every step (record: that step's metrics).
    """

    def __init__(self, model, data: PreparedData, config: FinetuneConfig, *, output_dir, tokenizer=None,
                 base_model_name: str | None = None, pad_id: int = 0, resume_from: Path | None = None,
                 callbacks: list[Callable] = (), console: Console | None = None, run_info: dict | None = None):
        self.model, self.data, self.config, self.tokenizer = model, data, config, tokenizer
        self.output_dir = Path(output_dir)
        self.base_model_name, self.resume_from = base_model_name, resume_from
        self.callbacks, self.run_info = list(callbacks), dict(run_info or {})
        self.console = console or Console(soft_wrap=True)
        self.device = model.device
        self.lora = has_lora(model)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameter (attach LoRA adapters, or set requires_grad "
                                "for full fine-tuning)")
        # Micro-batches run through one object whether or not they replay a CUDA graph (it says why not).
        self.graph_step = GraphedTrainStep(model, batch_size=config.batch_size, seq_len=config.max_seq_length,
                                           enabled=config.cuda_graphs)
        # A graph replays one shape: packed rows (nearly full anyway) are padded to max_seq_length.
        pad_to = config.max_seq_length if self.graph_step.disabled is None and data.packed else None
        self.train_stream = BatchStream(data.train, batch_size=config.batch_size, seed=config.seed, pad_id=pad_id,
                                        packed=data.packed, pad_to=pad_to)
        self.eval_stream = (BatchStream(data.eval, batch_size=config.batch_size, seed=config.seed, pad_id=pad_id,
                                        packed=data.packed, shuffle=False) if data.eval else None)
        self.total = total_steps(config, self.train_stream.per_epoch)
        self.warmup = warmup_steps(config, self.total)
        # fp32 copies of bf16/fp16 trained weights (none for fp32 ones), unless the config turns them off
        self.master = MasterWeights(self.params, enabled=config.master_weights)
        self.optimizer = self._make_optimizer()
        self.state = TrainState()
        self._saved_step = -1
        self._rng_after_step: dict | None = None  # the RNGs as the last completed step left them (for checkpoints)
        self._in_update = False
        self._interrupt_pending = False
        self._output_ready = False
        self.fingerprint = data.fingerprint()

    # ------------------------------------------------------------------ set-up
    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay = [p for n, p in self.master.optimizer_params if p.ndim >= 2]
        no_decay = [p for n, p in self.master.optimizer_params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        options = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        if cfg.optimizer == "adamw_8bit":
            return require_8bit_optimizer(self.device).AdamW8bit(groups, **options)
        return torch.optim.AdamW(groups, fused=self.device.type == "cuda", **options)

    def prepare_output(self) -> None:
        """Create the run folder (replacing it if overwrite) and write run.json; run() calls it if not done."""
        if self._output_ready:
            return
        self._output_ready = True
        if self.resume_from is None:
            if self.output_dir.is_dir() and self.config.overwrite:
                if refusal := overwrite_refusal(self.output_dir):  # check_output said so; the folder may have changed
                    raise TrainingError(refusal)
                shutil.rmtree(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_info()

    def _write_run_info(self) -> None:
        path = self.output_dir / "run.json"
        info = json.loads(path.read_text()) if self.resume_from and path.exists() else {}
        if self.resume_from:
            info.setdefault("resumed", []).append({"from": str(self.resume_from), "at": time.strftime("%FT%T")})
        else:
            info = {"started": time.strftime("%FT%T"), "config": self.config.to_dict(), **self.run_info,
                    "data": {"train": asdict(self.data.train_stats),
                             "eval": asdict(self.data.eval_stats) if self.data.eval_stats else None,
                             "fingerprint": self.fingerprint},
                    "steps": self.total, "warmup_steps": self.warmup,
                    "trainable_parameters": sum(p.numel() for _, p in self.params)}
            if self.master:
                info["master_weights"] = {"dtype": "float32", "copies_of": self.master.dtypes(),
                                          "parameters": self.master.numel, "bytes": self.master.nbytes}
        _write_json_atomic(path, info)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write the state after the last completed step to checkpoints/step-N (atomically); prune old ones."""
        step = self.state.step
        path = self.output_dir / CHECKPOINTS / f"step-{step:08d}"
        with atomic_folder(path, overwrite=True) as tmp:
            if self.lora:
                (tmp / "adapter").mkdir()
                write_adapter_files(self.model, tmp / "adapter", base_model_name_or_path=self.base_model_name)
            else:
                save_model(self.model, tmp / "model")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.master:  # the optimizer's weights: the model's are these rounded, so resume needs them
                save_file(self.master.state_dict(), str(tmp / MASTER_WEIGHTS))
            # Not the live state: a stop inside a micro-batch comes after that step's dropout masks were drawn.
            torch.save(self._rng_after_step if self._rng_after_step is not None else _rng_state(), tmp / "rng.pt")
            state = {**asdict(self.state), "fingerprint": self.fingerprint, "config": self.config.to_dict(),
                     "total_steps": self.total, "lora": self.lora}
            (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        self._saved_step = step
        self._prune_checkpoints(keep=path)
        return path

    def _prune_checkpoints(self, keep: Path) -> None:
        if self.config.keep_checkpoints <= 0:
            return
        folder = self.output_dir / CHECKPOINTS
        found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))
        for _, old in found[: max(0, len(found) - self.config.keep_checkpoints)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / STATE).read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"{path}: the training data (or the tokenizer, max_seq_length, packing, eval split) "
                                "differs from the run's, so its position cannot be resumed. Use the same data, or "
                                "start a new run (a new --output, or --adapter to start from its adapter)")
        saved = state.get("config", {})
        changed = {k: (v, getattr(self.config, k)) for k, v in saved.items()
                   if hasattr(self.config, k) and getattr(self.config, k) != v and k not in _RESUME_FREE}
        fixed = {k: change for k, change in changed.items() if k in _RESUME_FIXED}
        if fixed:
            listing = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in fixed.items())
            raise TrainingError(f"{path}: cannot resume with changed settings ({listing}); these fix the data order "
                                "or the trained parameters")
        if changed:
            listing = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            self.console.print(f"note: resuming with changed settings: {listing}", markup=False)
        if state.get("lora") != self.lora:
            raise TrainingError(f"{path}: the checkpoint is of a {'LoRA' if state.get('lora') else 'full'} run")
        if self.lora:
            copy_adapter_weights(self.model, read_adapter_weights(path / "adapter"), source=path / "adapter")
        else:
            self._load_model_weights(path / "model")
        self._load_master_weights(path)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        self._rng_after_step = _rng_state()
        known = set(TrainState.__dataclass_fields__)
        self.state = TrainState(**{k: v for k, v in state.items() if k in known})
        self._saved_step = self.state.step
        if state.get("total_steps") != self.total:
            self.console.print(f"note: the run now has {self.total} steps (it had {state.get('total_steps')}); the "
                               "learning-rate schedule follows the new length", markup=False)

    @torch.no_grad()
    def _load_model_weights(self, folder: Path) -> None:
        params = dict(self.model.named_parameters())
        for file in sorted(set(weight_files(folder).values())):
            for name, tensor in load_file(str(file)).items():
                if name not in params:
                    raise TrainingError(f"{file}: unexpected tensor {name!r} for this model")
                params[name].copy_(tensor)

    @torch.no_grad()
    def _load_master_weights(self, path: Path) -> None:
        """The fp32 copies from a checkpoint. A run without copies (its weights are fp32 now) takes their values,
        which are more precise than the checkpoint's rounded weights."""
        file = path / MASTER_WEIGHTS
        if not file.is_file():
            if self.master:
                self.master.reset_from_model()
                self.console.print(f"note: {path} holds no fp32 master weights: they start from its "
                                   f"{'/'.join(self.master.dtypes())} weights", markup=False)
            return
        tensors = load_file(str(file), device=str(self.device))
        if not self.master:
            params = dict(self.params)
            for name, tensor in tensors.items():
                if name in params:
                    params[name].copy_(tensor)
            return
        try:
            self.master.load_state_dict(tensors)
        except (KeyError, ValueError) as err:
            raise TrainingError(f"{file}: {err.args[0]}; the checkpoint is of another model") from None

    # ------------------------------------------------------------------ steps
    def _micro_batches(self):
        start = self.state.micro_batches
        return [self.train_stream.batch(i) for i in range(start, start + self.config.grad_accum)]

    def train_step(self) -> dict:
        """One optimizer update; returns its metrics record."""
        cfg, model = self.config, self.model
        batches = self._micro_batches()
        n_targets = sum(b.n_targets for b in batches)
        model.train()
        self.graph_step.zero_grad()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for batch in batches:
            if batch.n_targets == 0:
                continue
            batch = batch.to(self.device)
            weight = batch.n_targets / n_targets  # token-weighted: accumulation equals one big batch
            loss_sum += self.graph_step(batch.input_ids, batch.labels, batch.seq_idx, weight) * weight
        self.master.grads_to_master()  # clip and step in fp32 where the weights are half precision
        params = [p for _, p in self.master.optimizer_params]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        loss, norm = torch.stack([loss_sum, grad_norm.float().to(self.device)]).tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._stop_non_finite(loss, norm)
        lr = lr_at(self.state.step, base=cfg.learning_rate, total=self.total, warmup=self.warmup,
                   schedule=cfg.lr_schedule, min_ratio=cfg.min_lr_ratio)
        with _hold_interrupts() as received:
            self._in_update = True
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.master.write_back()
            self.graph_step.zero_grad()  # in place: a graph writes to fixed addresses
            self.state.step += 1
            self.state.micro_batches += len(batches)
            self.state.tokens += sum(b.n_tokens for b in batches)
            self.state.trained_tokens += n_targets
            self.state.last_loss = loss
            self._rng_after_step = _rng_state()  # what the next step starts from, whatever stops it midway
            self._in_update = False
        self._interrupt_pending = bool(received)
        epoch = self.state.micro_batches / self.train_stream.per_epoch
        return {"step": self.state.step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens": self.state.tokens, "trained_tokens": self.state.trained_tokens}

    def step_mode(self) -> str:
        """How micro-batches run: 'cuda graph', or 'eager' with the reason a graph is not used."""
        if self.graph_step.disabled:
            return f"eager ({self.graph_step.disabled})"
        return "cuda graph" if self.graph_step.graphed else "cuda graph (captured at the first full batch)"

    def _stop_non_finite(self, loss: float, norm: float) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm} (loss {loss:.4f})"
        last = latest_checkpoint(self.output_dir)
        kept = (f"The last good checkpoint, {last}, is intact: resume from it with --resume, perhaps with a lower "
                "learning_rate or max_grad_norm" if last else "No checkpoint was written yet (save_every); to start "
                f"again in {self.output_dir}, add --overwrite to the command")
        raise TrainingError(f"non-finite {what} at step {self.state.step + 1}: stopped before updating the weights. "
                            f"{kept}. Common causes: a learning rate too high, float16 overflow, or bad data.")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean loss over the evaluation rows (dropout off)."""
        if self.eval_stream is None:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.eval_stream:
            if batch.n_targets == 0:
                continue
            batch = batch.to(self.device)
            out = self.model(batch.input_ids, labels=batch.labels, seq_idx=batch.seq_idx, return_logits=False)
            total += out.loss.float().item() * batch.n_targets
            count += batch.n_targets
        self.model.train()
        return total / count

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        self.prepare_output()
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
            self.console.print(f"resumed from {self.resume_from} at step {self.state.step}/{self.total}", markup=False)
            _truncate_metrics(self.output_dir / METRICS, self.state.step)
        else:
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
            self._rng_after_step = _rng_state()
            self.master.reset_from_model()  # the weights as the run starts from them
        if self.master:
            self.console.print(self.master.summary(), markup=False)
        elif half := sum(p.numel() for _, p in self.params if p.dtype in HALF_DTYPES):
            self.console.print(f"note: master_weights is off: {half:,} half-precision trained weights are updated "
                               "in their own precision, where small updates round away", markup=False)
        try:
            self._loop()
        except TrainingError:
            raise
        except BaseException as err:
            self._save_after_stop(err)
            raise
        return self._finish()

    def _loop(self) -> None:
        cfg = self.config
        with self._progress() as progress, (self.output_dir / METRICS).open("a") as metrics:
            task = progress.add_task("train", total=self.total, completed=self.state.step, loss="", lr="",
                                     speed="", mem="") if progress else None
            if self.state.step == 0 and cfg.eval_every and self.eval_stream is not None:
                self._eval_record(metrics)  # the starting point of the eval curve
            first = True
            while self.state.step < self.total:
                tokens_before, started = self.state.tokens, time.perf_counter()
                record = self.train_step()
                if first and self.device.type == "cuda":  # the graph is captured (or refused) in the first step
                    self.console.print(f"training step: {self.step_mode()}", markup=False)
                first = False
                elapsed = time.perf_counter() - started
                self.state.elapsed_s += elapsed
                record["tokens_per_s"] = round((self.state.tokens - tokens_before) / max(elapsed, 1e-9), 1)
                record["memory_gib"] = _round(memory_gib(self.device), 3)
                record["elapsed_s"] = round(self.state.elapsed_s, 3)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                self._show(progress, task, record)
                if self._interrupt_pending:  # Ctrl-C came during the update: the step is complete and logged
                    raise KeyboardInterrupt
                if cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.state.step < self.total:
                    self._eval_record(metrics)
                for callback in self.callbacks:
                    callback(self, record)
                # the next step starts from the RNGs as evaluation and callbacks leave them (a callback may draw)
                self._rng_after_step = _rng_state()
                if cfg.save_every and self.state.step % cfg.save_every == 0:
                    self.save_checkpoint()
            if self.eval_stream is not None:
                self._eval_record(metrics)

    def _eval_record(self, metrics) -> None:
        loss = self.evaluate()
        self.state.last_eval_loss = loss
        metrics.write(json.dumps({"step": self.state.step, "eval_loss": loss}) + "\n")
        metrics.flush()
        self.console.print(f"step {self.state.step}/{self.total}: eval loss {loss:.4f}", markup=False)

    @contextlib.contextmanager
    def _progress(self):
        if not self.config.progress:
            yield None
            return
        columns = [TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(bar_width=20),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                   TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[mem]}"), TextColumn("eta"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield progress

    def _show(self, progress, task, record: dict) -> None:
        mem = f"{record['memory_gib']:.2f} GiB" if record["memory_gib"] is not None else ""
        if progress is not None:
            progress.update(task, completed=record["step"], loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            speed=f"{record['tokens_per_s']:,.0f} tok/s", mem=mem)
        step = record["step"]
        if step % self.config.log_every == 0 or step == 1 or step == self.total:
            self.console.print(f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                               f"gnorm {record['grad_norm']:.2f} {record['tokens_per_s']:,.0f} tok/s {mem}",
                               highlight=False, markup=False)

    def _save_after_stop(self, err: BaseException) -> None:
        """Ctrl-C or an unexpected error: keep the work of every completed step."""
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"stopped by {type(err).__name__}"
        if self._in_update:
            last = latest_checkpoint(self.output_dir)
            self.console.print(f"{why} during an optimizer update: the weights may be half updated, so no "
                               f"checkpoint was written; the last one is {last}", markup=False)
            return
        if self.state.step == 0 or self.state.step == self._saved_step:
            last = latest_checkpoint(self.output_dir)
            where = f"the latest checkpoint is {last}" if last else "no step had completed, nothing to save"
            self.console.print(f"{why} at step {self.state.step}: {where}", markup=False)
            return
        try:
            path = self.save_checkpoint()
        except Exception as save_err:  # noqa: BLE001 - report it, then let the original error propagate
            self.console.print(f"{why} at step {self.state.step}; writing a checkpoint failed too "
                               f"({type(save_err).__name__}: {save_err})", markup=False)
            return
        self.console.print(f"{why} at step {self.state.step}/{self.total}: checkpoint written to {path}; continue "
                           f"with the same command plus --output {self.output_dir} --resume", markup=False)

    def _finish(self) -> TrainResult:
        cfg = self.config
        checkpoint = None
        if cfg.save_every and self._saved_step != self.state.step:
            checkpoint = self.save_checkpoint()
        result_dir = self._save_result()
        losses = _losses(self.output_dir / METRICS)
        if cfg.plot:
            plot_losses(self.output_dir / METRICS, self.output_dir / "loss.png", console=self.console)
        return TrainResult(self.output_dir, result_dir, self.state.step, losses, self.state.last_eval_loss,
                           checkpoint or latest_checkpoint(self.output_dir), self.base_model_name)

    def _save_result(self) -> Path:
        """adapter/ (PEFT adapter + tokenizer) or model/ (HF checkpoint + tokenizer), atomically."""
        path = self.output_dir / ("adapter" if self.lora else "model")
        with atomic_folder(path, overwrite=True) as tmp:
            if self.lora:
                write_adapter_files(self.model, tmp, base_model_name_or_path=self.base_model_name)
            else:
                save_model(self.model, tmp, overwrite=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            info = {"method": self.config.method, "base_model": self.base_model_name, "steps": self.state.step,
                    "final_loss": self.state.last_loss, "eval_loss": self.state.last_eval_loss}
            (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return path


# ---------------------------------------------------------------------------------------------- metrics files
def _round(value, digits):
    return None if value is None else round(value, digits)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the records of steps after the checkpoint (they will be run again)."""
    kept = [r for r in _records(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in _records(path) if "loss" in r]


def plot_losses(metrics_path, png_path, *, console: Console | None = None) -> Path | None:
    """Train loss per step (and eval loss) from metrics.jsonl as a PNG; skipped with a notice without matplotlib."""
    console = console or Console(soft_wrap=True)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        console.print("loss plot skipped: matplotlib is not installed (pip install matplotlib)", markup=False)
        return None
    records = _records(Path(metrics_path))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    figure = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_title(f"gyrfalcon: {Path(metrics_path).parent.name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(str(png_path))
    console.print(f"loss curve: {png_path}", markup=False)
    return Path(png_path)
