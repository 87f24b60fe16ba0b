"""fp32 master weights for the half-precision (bf16/fp16) parameters a training run updates.

Why: a bf16 weight keeps 8 significant bits, so an update smaller than half its spacing (about 0.2% of the weight)
rounds away. Fine-tuning learning rates make most updates that small: one AdamW step at lr 2e-5 changed 1.9% of a
bf16 model's weights and 82.6% of the same model's in fp32. So the optimizer steps fp32 copies of those weights
(its state is fp32 anyway), and after each update the model's half-precision weights are rewritten from them:
small updates add up in the copy until they move the rounded weight.

    master = MasterWeights(params)            # params: (name, parameter) pairs that require grad
    optimizer = AdamW([t for _, t in master.optimizer_params])
    ... backward ...                          # gradients land in the model's half-precision .grad
    master.grads_to_master()                  # fp32 .grad on each copy (the model's .grad are left as they are)
    clip_grad_norm_([t for _, t in master.optimizer_params], ...)
    optimizer.step()
    master.write_back()                       # model weights <- copies rounded; the fp32 .grad are dropped

Parameters that are fp32 already (LoRA adapters, Mamba's A_log / D / dt_bias) are stepped in place: they appear in
`optimizer_params` as themselves. Memory: 4 bytes per half-precision trained weight for the copies, plus an fp32
gradient (4 bytes per weight again) that lives only during the update, when the activations are already freed.
The model's weights stay where they are (in place), so a CUDA graph that reads them stays valid.
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


class MasterWeights:
    """fp32 copies of the half-precision parameters among `params` ((name, parameter) pairs that require grad).

    optimizer_params: (name, tensor) for every parameter, in the order given: the fp32 copy for a half-precision
    one (same shape, on the same device), the parameter itself otherwise. Empty of copies (bool(self) is False) when
    no parameter is in half precision, or when enabled is False (every parameter is then stepped as it is).
    """

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], *, enabled: bool = True):
        self.names: list[str] = []
        self.model_params: list[torch.Tensor] = []
        self.masters: list[torch.Tensor] = []
        self.optimizer_params: list[tuple[str, torch.Tensor]] = []
        for name, p in params:
            if enabled and p.dtype in HALF_DTYPES:
                master = p.detach().to(torch.float32, copy=True)
                self.names.append(name)
                self.model_params.append(p)
                self.masters.append(master)
                self.optimizer_params.append((name, master))
            else:
                self.optimizer_params.append((name, p))

    def __bool__(self) -> bool:
        return bool(self.masters)

    @property
    def numel(self) -> int:
        """How many weights have an fp32 copy."""
        return sum(m.numel() for m in self.masters)

    @property
    def nbytes(self) -> int:
        """Memory the copies hold (4 bytes per weight), besides the transient fp32 gradients of an update."""
        return 4 * self.numel

    def dtypes(self) -> list[str]:
        """The half-precision dtypes copied, e.g. ['bfloat16']."""
        return sorted({str(p.dtype).removeprefix("torch.") for p in self.model_params})

    def summary(self) -> str:
        size = f"{self.nbytes / 2**30:.2f} GiB" if self.nbytes >= 2**30 else f"{self.nbytes / 2**20:.1f} MiB"
        return (f"fp32 master weights kept for {self.numel:,} {'/'.join(self.dtypes())} trained weights ({size} "
                "more: 4 bytes per weight), so that small updates are not rounded away")

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Give each copy the fp32 value of its parameter's gradient (None where the parameter has none)."""
        for p, master in zip(self.model_params, self.masters):
            master.grad = None if p.grad is None else p.grad.to(torch.float32)

    @torch.no_grad()
    def write_back(self) -> None:
        """After an update: the model's weights <- the copies, rounded to their dtype; drop the fp32 gradients."""
        if self.masters:
            torch._foreach_copy_(self.model_params, self.masters)
        for master in self.masters:
            master.grad = None

    @torch.no_grad()
    def reset_from_model(self) -> None:
        """The copies <- the model's current weights (at the start of a run, or from a checkpoint without copies)."""
        if self.masters:
            torch._foreach_copy_(self.masters, self.model_params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 copy}, for a checkpoint."""
        return dict(zip(self.names, self.masters))

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the copies from state_dict() output (every name needed, same shapes), then write them back."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"no master weight for {missing[0]} (and {len(missing) - 1} more)")
        for name, master in zip(self.names, self.masters):
            if tensors[name].shape != master.shape:
                raise ValueError(f"master weight {name}: shape {tuple(tensors[name].shape)}, the model's is "
                                 f"{tuple(master.shape)}")
            master.copy_(tensors[name])
        self.write_back()
