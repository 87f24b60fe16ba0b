"""4-bit base weights for QLoRA: a frozen linear layer stored in NF4, a checkpoint loader that quantizes each weight
as it is read, a random-init 4-bit model for benchmarks, and the way back to dense weights.

QLoRA keeps the frozen base's large matrices in 4-bit NormalFloat (NF4) with double quantization, as bitsandbytes
computes it: one absmax per block of 64 weights, the absmaxes themselves in 8 bits with one fp32 scale per 256 of
them (about 4.127 bits per weight), and trains LoRA adapters in 16/32 bits on top (lora.LoRALinear4bit). Quantized:
the nine linears of every decoder layer (q/k/v/o_proj, gate/up/down_proj, the Mamba in_proj and out_proj; see
info.QUANTIZABLE). Everything else stays as a 16-bit load keeps it: the embeddings, lm_head, the norms and the conv
in the compute dtype, A_log / D / dt_bias in fp32.

    model = load_4bit("tiiuae/Falcon-H1-7B-Instruct", device="cuda")         # about 5 GiB instead of 15
    model = from_config_4bit(FalconH1Config.from_preset("7B"), device="cuda")  # random init, for benchmarks
    dequantize(model)                                                          # nn.Linear again (dense), in place

Memory: load_4bit reads one tensor at a time straight onto the device and quantizes each linear weight there as
soon as it is read, so the model never exists on the device in 16 bits (peak: the 4-bit model plus one tensor).
The compute dtype (bf16 on a recent GPU, fp32 on the CPU) is that of the unquantized weights, of the activations,
and of the dequantized weight each 4-bit matmul uses.

bitsandbytes is imported only when a 4-bit layer is built or run: it is an optional dependency. Its NF4 functions
run on CUDA GPUs and, in recent versions, on the CPU (tests use the CPU with the tiny model).
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import (CheckpointError, _check_keys, _read_shapes, default_device, default_dtype, read_tensors,
                         resolve_checkpoint, weight_files)
from .config import FalconH1Config
from .info import QUANTIZABLE
from .model import FP32_PARAMETERS, FalconH1ForCausalLM

BLOCKSIZE = 64  # weights per absmax (QLoRA's choice); the absmaxes are quantized again in blocks of 256
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class QLoRAUnavailable(RuntimeError):
    """QLoRA was asked for where it cannot run (no bitsandbytes, or one that cannot quantize on the device)."""


def bitsandbytes_module(device=None):
    """The bitsandbytes module, checked (when `device` is given) to quantize on that device; else a
    QLoRAUnavailable error that says what is missing."""
    try:
        import bitsandbytes
    except (ImportError, OSError, RuntimeError) as err:  # old releases raise RuntimeError when their library is missing
        raise QLoRAUnavailable("QLoRA (load_in_4bit / method: qlora) needs bitsandbytes, which cannot be imported "
                               f"({type(err).__name__}: {err}): pip install bitsandbytes (or gyrfalcon[qlora]); "
                               "or use method lora (a 16-bit base)") from None
    if device is not None:
        probe = torch.linspace(-1.0, 1.0, 2 * BLOCKSIZE, device=device)
        try:
            bitsandbytes.functional.quantize_4bit(probe, blocksize=BLOCKSIZE, compress_statistics=True,
                                                  quant_type="nf4")
        except (RuntimeError, NotImplementedError, ValueError) as err:
            raise QLoRAUnavailable(f"QLoRA: bitsandbytes {bitsandbytes.__version__} cannot quantize on {device} "
                                   f"({type(err).__name__}: {err}); use a CUDA GPU (or a recent bitsandbytes for "
                                   "the CPU), or method lora (a 16-bit base)") from None
    return bitsandbytes


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in 4-bit NF4 with double quantization.

    weight: the packed codes, uint8 (ceil(out * in / 2), 1), a frozen Parameter under the checkpoint's name;
    quant_state: bitsandbytes' QuantState (block absmaxes, their scales, the NF4 code, the dense shape and the
    compute dtype), kept on the weight's device; bias: as nn.Linear's, in the compute dtype, frozen.
    x (..., in) -> (..., out), in x's dtype: x @ dequantize(weight).T + bias, computed by bitsandbytes' matmul_4bit
    (its backward dequantizes the weight again rather than keeping the dense copy).
    Build one with `Linear4bit.from_linear(linear)`, or empty (on the meta device) and then `quantize_(weight)`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        packed = (in_features * out_features + 1) // 2
        self.weight = nn.Parameter(torch.empty(packed, 1, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.quant_state = None  # set by quantize_

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Linear4bit":
        """The 4-bit form of `linear` (on its device, dequantizing to its dtype); its bias tensor is reused."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=False)
        layer.quantize_(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> "Linear4bit":
        """Store `weight` (out, in) in 4 bits, on its device; the layer then computes in `weight`'s dtype."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {list(weight.shape)} for a {self.in_features} -> {self.out_features} "
                             "layer; expected (out_features, in_features)")
        if weight.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"4-bit layers compute in {', '.join(map(str, COMPUTE_DTYPES))}, not {weight.dtype}")
        functional = bitsandbytes_module().functional
        packed, state = functional.quantize_4bit(weight.detach().contiguous(), blocksize=BLOCKSIZE,
                                                 compress_statistics=True, quant_type="nf4",
                                                 quant_storage=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.quant_state.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = bitsandbytes_module()
        return bnb.matmul_4bit(x, self.weight.t(), quant_state=self.quant_state, bias=self.bias)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with: (out, in) in the compute dtype (a new tensor)."""
        return dequantize_codes(self.weight, self.quant_state)

    def _apply(self, fn, recurse=True):
        # The quant state's tensors are not parameters or buffers: follow the packed weight across devices. Dtype
        # casts (model.half()) leave both alone: the codes are integers and the scales must stay fp32.
        super()._apply(fn, recurse)
        if self.quant_state is not None:
            self.quant_state.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.") if self.quant_state is not None else "unset"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 (double quant), compute_dtype={dtype}")


def dequantize_codes(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """A 4-bit weight's dense form: packed NF4 codes (ceil(out * in / 2), 1) uint8 and their QuantState -> (out,
    in) in the state's compute dtype, a new tensor (no gradient flows: the codes are frozen). On CUDA, gyrfalcon's
    one-pass Triton kernel (ops.nf4: the absmaxes' own dequantization fused in, the same bits as bitsandbytes'
    dequantize_4bit, nothing read back to the host); elsewhere bitsandbytes' own."""
    if packed.is_cuda and quant_state.quant_type == "nf4":
        from .ops.nf4 import dequantize_nf4
        return dequantize_nf4(packed, quant_state)
    return bitsandbytes_module().functional.dequantize_4bit(packed, quant_state)


# ---------------------------------------------------------------------------------------------- model level
def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """{module name: layer} of the dense linears QLoRA stores in 4 bits (those of QUANTIZABLE; not lm_head)."""
    return {name: m for name, m in model.named_modules()
            if name.rpartition(".")[2] in QUANTIZABLE and type(m) is nn.Linear}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Parameters as the dense model counts them: a 4-bit weight counts in * out, not its packed bytes."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.in_features * m.out_features - m.weight.numel()
    return total


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


@torch.no_grad()
def quantize_model(model: FalconH1ForCausalLM) -> FalconH1ForCausalLM:
    """Store the model's quantizable linears in 4 bits, in place, one layer at a time (the model must already be
    loaded: to load a checkpoint straight into 4 bits, use load_4bit). Returns the model."""
    bitsandbytes_module(model.device)
    for name, linear in quantizable_linears(model).items():
        _replace(model, name, Linear4bit.from_linear(linear))
    return model


def _resolve(device, compute_dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = compute_dtype or default_dtype(device)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, got {dtype}")
    return device, dtype


@torch.no_grad()
def load_4bit(path_or_id, *, device=None, compute_dtype: torch.dtype | None = None, seed: int = 0,
              revision: str | None = None, token: str | None = None) -> FalconH1ForCausalLM:
    """A checkpoint (folder or hub id) with its quantizable linears in 4-bit NF4 on `device`; everything else in
    `compute_dtype` (A_log, D, dt_bias in fp32). None or 'tiny': the built-in tiny model's random init (the very
    model a 16-bit run builds with this seed), quantized. Keys, shapes and files are checked as checkpoint.load_model
    checks them, with the same errors."""
    device, dtype = _resolve(device, compute_dtype)
    if path_or_id in (None, "", "tiny"):
        tiny = FalconH1ForCausalLM.from_config(FalconH1Config.from_preset("tiny"), dtype=dtype, device=device,
                                               seed=seed)
        return quantize_model(tiny).eval()
    bitsandbytes_module(device)
    folder = resolve_checkpoint(path_or_id, token=token, revision=revision)
    config = FalconH1Config.from_pretrained(folder)
    with torch.device("meta"):
        model = FalconH1ForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    files = weight_files(folder)
    _check_keys(folder, expected, _read_shapes(files), optional)

    # Empty 4-bit layers take the linears' places; each is filled as its weight is read.
    layers = {}
    for name, linear in quantizable_linears(model).items():
        with torch.device("meta"):
            layers[f"{name}.weight"] = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None)
        _replace(model, name, layers[f"{name}.weight"])
    state = {}
    for name, tensor in read_tensors(files, device, skip=lambda n: n not in expected or n in optional):
        if name in layers:
            layers[name].quantize_(tensor.to(dtype))
        else:
            fp32 = name.rsplit(".", 1)[-1] in FP32_PARAMETERS
            state[name] = tensor.to(torch.float32 if fp32 else dtype)
        del tensor  # the 16-bit weight goes as soon as it is quantized
    model.load_state_dict(state, strict=False, assign=True)  # keeps the 4-bit layers' biases frozen
    model.tie_weights()
    _check_loaded(model, folder)
    return model.eval()


def _check_loaded(model: nn.Module, source) -> None:
    """A guard against silently random weights: every tensor was read (cannot fail after the key check)."""
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    unset = [n for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.quant_state is None]
    if still_meta or unset:
        raise CheckpointError(f"{source}: tensors not loaded: {', '.join((still_meta + unset)[:5])}")


@torch.no_grad()
def from_config_4bit(config: FalconH1Config, *, device=None, compute_dtype: torch.dtype | None = None,
                     seed: int = 0) -> FalconH1ForCausalLM:
    """A random-init 4-bit model (benchmarks at full size without a checkpoint). The unquantized tensors are
    initialised by FalconH1ForCausalLM.init_weights (on the CPU, then moved); each quantizable weight is drawn from
    init_weights' normal(0, initializer_range) on the device and quantized at once, so the device never holds the
    16-bit model. Same distributions as from_config, not the same values; the same seed gives the same model."""
    device, dtype = _resolve(device, compute_dtype)
    bitsandbytes_module(device)
    with torch.device("meta"):
        model = FalconH1ForCausalLM(config)
    targets = quantizable_linears(model)
    skipped = set(map(id, targets.values()))
    for module in model.modules():
        if id(module) not in skipped:
            module.to_empty(device="cpu", recurse=False)
    model.tie_weights()
    # init_weights draws nothing for the target linears, still on the meta device (a no-op there).
    model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    model.to_model_dtype(dtype)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    for name, linear in targets.items():
        weight = torch.empty(linear.out_features, linear.in_features, device=device)
        weight.normal_(0.0, config.initializer_range, generator=generator)
        with torch.device("meta"):
            layer = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None)
        layer.quantize_(weight.to(dtype))
        if linear.bias is not None:
            layer.bias = nn.Parameter(torch.zeros(linear.out_features, device=device, dtype=dtype),
                                      requires_grad=False)
        _replace(model, name, layer)
        del weight
    model.to(device)
    model.tie_weights()
    _check_loaded(model, "from_config_4bit")
    return model


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Replace every 4-bit linear by an nn.Linear holding its dequantized weight (in the compute dtype), in place:
    the dense model that computes what the 4-bit one computes. Returns the model. Layers that carry a LoRA adapter
    are refused: lora.merge_and_unload folds an adapter into the dequantized weight."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, Linear4bit):
            continue
        if type(m) is not Linear4bit:
            raise ValueError(f"{name} carries a LoRA adapter; merge_and_unload(model) folds it into the "
                             "dequantized weight, or dequantize before attaching adapters")
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        dense.weight = nn.Parameter(m.dequantized_weight())
        if m.bias is not None:
            dense.bias = nn.Parameter(m.bias.detach())
        _replace(model, name, dense)
    return model
