"""The three systems a benchmark compares, behind one small interface the suites call.

    gyrfalcon    gyrfalcon.FalconH1ForCausalLM (+ gyrfalcon.lora, gyrfalcon.generate once they exist)
    hf-kernels   transformers' FalconH1ForCausalLM + PEFT LoRA, with mamba_ssm's Mamba-2 Triton kernels importable
    hf-torch     transformers' FalconH1ForCausalLM + PEFT LoRA as pip installs them (PyTorch Mamba path)

transformers picks mamba_ssm's kernels when its falcon_h1 module is imported, if `mamba_ssm` is importable then
(`use_kernel_func_from_hub_with_fallback` in transformers.integrations.hub_kernels). So the two HF systems differ
only in the worker process's import path, which the runner sets (runner.worker_env); `check()` verifies it before
transformers' model code is imported, so a mislabelled baseline fails loudly instead of measuring the other one.

Every method takes and returns plain torch objects; a missing feature raises Unsupported, a system that cannot be
set up in this environment raises Unavailable. The suites turn both into records with that status.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Callable

import torch

from ..config import FalconH1Config
from .plan import Settings


class Unsupported(Exception):
    """The system does not have this feature (yet)."""


class Unavailable(Exception):
    """The system cannot run in this environment (missing or unexpected packages)."""


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def eager_train_step(loss: torch.Tensor, optimizer) -> torch.Tensor:
    """The rest of an eager training step after the forward: backward, optimizer step, gradients dropped.
    Returns the detached loss."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---------------------------------------------------------------------------------------------- gyrfalcon
class GyrfalconSystem:
    name = "gyrfalcon"

    def __init__(self, lora_fn: Callable | None = None, generate_fn: Callable | None = None):
        """lora_fn / generate_fn: use these instead of gyrfalcon.lora.apply_lora / gyrfalcon.generate (tests)."""
        self._lora_fn = lora_fn
        self._generate_fn = generate_fn
        self._steps: dict = {}  # id(model) -> GraphedTrainStep

    def check(self) -> None:
        return None

    def describe(self) -> dict:
        present = [op for op in ("ssd", "conv", "norm", "loss", "rope", "attention")
                   if importlib.util.find_spec(f"gyrfalcon.ops.{op}_triton") is not None]
        from ..ops import dispatch
        return {"triton_ops": present, "triton_importable": dispatch.triton_available()}

    def build(self, cfg: FalconH1Config, dtype: torch.dtype, device: torch.device, seed: int):
        from ..model import FalconH1ForCausalLM
        return FalconH1ForCausalLM.from_config(cfg, dtype=dtype, device=device, seed=seed)

    def enable_checkpointing(self, model) -> None:
        model.enable_gradient_checkpointing()

    def add_lora(self, model, settings: Settings):
        fn = self._lora_fn
        if fn is None:
            if importlib.util.find_spec("gyrfalcon.lora") is None:
                raise Unsupported("gyrfalcon.lora does not exist yet (LoRA training not implemented)")
            fn = importlib.import_module("gyrfalcon.lora").apply_lora
        return fn(model, r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                  targets=tuple(settings.lora_targets))

    def loss(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model(ids, labels=ids, return_logits=False).loss  # as gyrfalcon trains: no logits kept

    def train_step(self, model, optimizer, ids: torch.Tensor, *, graphs: bool = True) -> torch.Tensor:
        """As gyrfalcon's training loop steps: the forward + backward replayed from a CUDA graph
        (step_graph.GraphedTrainStep; eager where the model cannot be graphed, or with graphs=False), then the
        optimizer. Returns the loss."""
        from ..step_graph import GraphedTrainStep

        step = self._steps.get(id(model)) if graphs else None
        if graphs and (step is None or step.model is not model or step.shape != tuple(ids.shape)):
            step = GraphedTrainStep(model, batch_size=ids.shape[0], seq_len=ids.shape[1])
            self._steps = {id(model): step}  # one graph at a time: its pool holds a step's activations
        if step is None:
            return eager_train_step(self.loss(model, ids), optimizer)
        loss = step(ids, ids)
        optimizer.step()
        step.zero_grad()
        return loss

    def release_train_step(self, model) -> None:
        self._steps.pop(id(model), None)

    def train_step_info(self, model) -> dict:
        step = self._steps.get(id(model))
        if step is None:
            return {"train_step": "eager"}
        return {"train_step": "cuda_graph" if step.graphed else f"eager ({step.disabled})"}

    def prefill(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model(ids, logits_to_keep=1).logits

    def _resolve_generate(self) -> Callable:
        if self._generate_fn is not None:
            return self._generate_fn
        if importlib.util.find_spec("gyrfalcon.generate") is None:
            raise Unsupported("gyrfalcon.generate does not exist yet (decoding not implemented)")
        module = importlib.import_module("gyrfalcon.generate")
        fn = getattr(module, "generate", None)
        if not callable(fn):
            raise Unsupported("gyrfalcon.generate has no generate() function")
        return fn

    def generate(self, model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding through gyrfalcon.generate.generate(model, input_ids, max_new_tokens=...), expected to
        return the (b, prompt + new) token ids (or an object with `.sequences`); the decode suite checks that all
        `new_tokens` were produced (random weights rarely hit EOS; a run that stops early is reported failed)."""
        fn = self._resolve_generate()
        # random weights may hit EOS early: every system generates exactly new_tokens (transformers gets
        # min_new_tokens too)
        out = fn(model, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out if torch.is_tensor(out) else out.sequences

    # -- ops for the kernels suite: (a closure to time, extra leaf tensors it made). Inputs as in suites.ssd_inputs.
    def ssd_scan(self, cfg: FalconH1Config, t: dict):
        from .. import ops
        return (lambda: ops.ssd_scan(t["x"], t["dt"], t["A_log"], t["B"], t["C"], t["D"], t["dt_bias"],
                                     chunk_size=cfg.mamba_chunk_size, dt_limit=cfg.time_step_limit)), []

    def decode_step(self, cfg: FalconH1Config, state: torch.Tensor, t: dict):
        """t holds one token: x (b, h, p), dt (b, h), B, C (b, g, n) and the per-head parameters."""
        from .. import ops
        # The public decode step (kernel on CUDA) wherever it is exported; the reference before it exists.
        step = getattr(ops, "ssd_step", None) or getattr(ops.ssd, "ssd_step", None) or ops.ssd_step_ref
        return lambda: step(state, t["x"], t["dt"], t["A_log"], t["B"], t["C"], t["D"], t["dt_bias"],
                            dt_limit=cfg.time_step_limit)


# ---------------------------------------------------------------------------------------------- transformers
MAMBA_KERNEL_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update",
                        "causal_conv1d")
HF_MAMBA_FUNCTIONS = ("mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined", "mamba2_selective_state_update",
                      "causal_conv1d_fn", "causal_conv1d_update")


def transformers_mamba_backends() -> dict[str, str]:
    """For each Mamba function of transformers' falcon_h1 module: "kernel" (a package's implementation was
    found at import), "torch" (the reference fallback) or "unknown". Read-only introspection of the closure
    transformers' decorator keeps; used only to label and double-check the baselines."""
    from transformers.models.falcon_h1 import modeling_falcon_h1 as hf

    out = {}
    for name in HF_MAMBA_FUNCTIONS:
        fn = getattr(hf, name, None)
        try:
            flag = inspect.getclosurevars(fn).nonlocals.get("is_new_implementation") if fn else None
        except TypeError:
            flag = None
        out[name] = "unknown" if flag is None else ("kernel" if flag else "torch")
    return out


class HFSystem:
    """transformers + PEFT; `kernels` says whether this process must see mamba_ssm (hf-kernels) or not."""

    def __init__(self, kernels: bool):
        self.kernels = kernels
        self.name = "hf-kernels" if kernels else "hf-torch"

    def check(self) -> None:
        """Raise Unavailable unless this process sees exactly the packages its label promises. Must run before
        transformers' falcon_h1 module is imported (the choice is made then)."""
        if self.kernels:
            for module in MAMBA_KERNEL_MODULES:
                try:
                    importlib.import_module(module)
                except Exception as err:  # any import-time failure (missing triton, CUDA stub, einops) counts
                    raise Unavailable(f"{module} is not importable ({type(err).__name__}: {err}); run "
                                      "bench/setup_baselines.sh and pass --baseline-dir") from None
        else:
            found = [m for m in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is not None]
            if found:
                raise Unavailable(f"{', '.join(found)} importable here, so transformers would use their kernels; "
                                  "hf-torch needs an environment without them")
        backends = transformers_mamba_backends()
        wanted = "kernel" if self.kernels else "torch"
        wrong = [name for name in ("mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined")
                 if backends[name] not in (wanted, "unknown")]
        if wrong:
            other = "torch fallback" if self.kernels else "mamba_ssm kernel"
            raise Unavailable(f"transformers resolved {', '.join(wrong)} to the {other}")

    def describe(self) -> dict:
        return {"mamba_backends": transformers_mamba_backends()}

    @staticmethod
    def hf_config(cfg: FalconH1Config):
        import transformers
        return transformers.FalconH1Config.from_dict(cfg.to_dict())

    def build(self, cfg: FalconH1Config, dtype: torch.dtype, device: torch.device, seed: int):
        import transformers
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(self.hf_config(cfg), dtype=dtype)
        return model

    def enable_checkpointing(self, model) -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def add_lora(self, model, settings: Settings):
        import peft
        config = peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                                 target_modules=list(settings.lora_targets), bias="none")
        return peft.get_peft_model(model, config)

    def loss(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def train_step(self, model, optimizer, ids: torch.Tensor, *, graphs: bool = True) -> torch.Tensor:
        """forward + backward + optimizer step, as a transformers + PEFT training loop runs them."""
        return eager_train_step(self.loss(model, ids), optimizer)

    def train_step_info(self, model) -> dict:
        return {"train_step": "eager"}

    def release_train_step(self, model) -> None:
        return None

    def prefill(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, logits_to_keep=1, use_cache=False).logits

    def generate(self, model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, use_cache=True)

    # -- ops for the kernels suite: the very functions transformers' FalconH1Mixer calls in this process
    # -- ops for the kernels suite: the very functions transformers' FalconH1Mixer calls in this process, on
    # arguments prepared outside the timed closure (A = -exp(A_log), the per-channel views), so that the time is
    # the op's own.
    def ssd_scan(self, cfg: FalconH1Config, t: dict):
        from transformers.models.falcon_h1 import modeling_falcon_h1 as hf
        A = (-torch.exp(t["A_log"].detach().float())).requires_grad_(t["A_log"].requires_grad)
        return (lambda: hf.mamba2_chunk_scan(t["x"], t["dt"], A, t["B"], t["C"], chunk_size=cfg.mamba_chunk_size,
                                             D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True,
                                             dt_limit=tuple(cfg.time_step_limit))), [A]

    def decode_step(self, cfg: FalconH1Config, state: torch.Tensor, t: dict):
        from transformers.models.falcon_h1 import modeling_falcon_h1 as hf
        b, h, p = t["x"].shape
        n = state.shape[-1]
        # The per-(head, channel) views FalconH1Mixer builds for its recurrent step.
        A = (-torch.exp(t["A_log"].float()))[:, None, None].expand(h, p, n)
        dt, D, dt_bias = t["dt"][..., None].expand(b, h, p), t["D"][:, None].expand(h, p), \
            t["dt_bias"][:, None].expand(h, p)
        return lambda: hf.mamba2_selective_state_update(state, t["x"], dt, A, t["B"], t["C"], D, z=None,
                                                        dt_bias=dt_bias, dt_softplus=True)


def make_system(name: str, **kwargs):
    if name == "gyrfalcon":
        return GyrfalconSystem(**kwargs)
    if name in ("hf-kernels", "hf-torch"):
        return HFSystem(kernels=name == "hf-kernels")
    raise ValueError(f"unknown system {name!r}")
