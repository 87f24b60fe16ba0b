"""A training micro-step (forward, loss, backward) captured once in a CUDA graph and replayed for every batch of the
same shape.

Why: a LoRA step of Falcon-H1 launches 12,000-15,000 kernels (per layer: the attention and Mamba mixers and the MLP,
nine adapters, forward, recompute under activation checkpointing, backward). In eager PyTorch the host spends tens
of microseconds per launch, and on an H100 the GPU sat idle for 62% (7B, batch 1 x 2048) to 75% (0.5B, batch 4 x
2048) of the step (bench/profile_train.py; bench/results/2026-11-23_h100_profile_train.jsonl). A graph replay
launches the whole step from one host call.

    step = GraphedTrainStep(model, batch_size=4, seq_len=2048)      # after apply_lora / enable_gradient_checkpointing
    step.zero_grad()
    loss = step(input_ids, labels, seq_idx=None, weight=1.0)       # .grad += d(weight * loss); loss: () fp32
    optimizer.step()

Contract:
- input_ids, labels (b, l) int64 and seq_idx (b, l) int (packed rows) or None: a batch of exactly (batch_size,
  seq_len), with seq_idx present or absent as on the first call, replays the graph; any other batch runs the same
  forward and backward eagerly. Only one graph is kept: its memory (the step's activations) is held for the
  graph's lifetime, so a loop should feed one shape (gyrfalcon's training loop pads packed rows to
  max_seq_length when graphs are on).
- Gradients accumulate into each trainable parameter's `.grad` in place (the graph writes to fixed addresses):
  clear them with `zero_grad()`, never by setting them to None.
- The first graphed call warms up eagerly (Triton autotuning, cuBLAS workspaces) on a side stream, then captures.
  If capture fails, the error says why and every later call runs eagerly (`self.disabled` holds the reason).
- `unsupported_reason(model)` says why a model cannot be graphed (not on CUDA, dropout active, dynamic RoPE, ...);
  GraphedTrainStep on such a model (or built with enabled=False) runs eagerly, with the same gradient contract.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import check_document_order


def graph_blockers(model: nn.Module) -> list[str]:
    """Every reason this model's training step cannot be captured in a CUDA graph (empty when it can)."""
    reasons = []
    device = next(model.parameters()).device
    if device.type != "cuda":
        reasons.append(f"the model is on {device}, not a CUDA device")
    if model.config.rope["rope_type"] == "dynamic":
        reasons.append("dynamic RoPE scaling sizes its frequencies from the longest position, read back to the host")
    if getattr(model.model, "offload_checkpoints", False):
        reasons.append("activation offload copies the saved layer inputs to host memory, which a graph cannot do")
    active = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0 and m.training]
    if active:
        reasons.append(f"dropout is active ({active[0]} and {len(active) - 1} more): a recomputed checkpointed layer "
                       "must replay the dropout masks, which needs the RNG state read on the host")
    return reasons


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this model's training step cannot be captured in a CUDA graph (the first reason), or None."""
    reasons = graph_blockers(model)
    return reasons[0] if reasons else None


class GraphedTrainStep:
    """Forward + chunked cross-entropy + backward of `model` (a FalconH1ForCausalLM, LoRA or not) for batches of
    (batch_size, seq_len), as a CUDA graph. See the module docstring."""

    def __init__(self, model: nn.Module, *, batch_size: int, seq_len: int, warmup: int = 2, enabled: bool = True):
        """enabled=False: every call runs eagerly (same gradient contract), `disabled` says so."""
        self.model = model
        self.shape = (batch_size, seq_len)
        self.warmup = warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.disabled: str | None = unsupported_reason(model) if enabled else "cuda_graphs: false"
        self.graph: torch.cuda.CUDAGraph | None = None
        self._packed: bool | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ public
    @property
    def graphed(self) -> bool:
        return self.graph is not None

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero every trainable parameter's gradient in place (allocating it on first use)."""
        self._ensure_grads()
        torch._foreach_zero_([p.grad for p in self.params])

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None,
                 weight: float = 1.0) -> torch.Tensor:
        """Accumulate d(weight * loss)/d(param) into .grad; return the batch's mean loss, a () fp32 tensor."""
        if self._wants_graph(input_ids, seq_idx):
            if self.graph is None:
                self._capture(input_ids, labels, seq_idx)
            if self.graph is not None:
                self._fill(input_ids, labels, seq_idx, weight)
                self.graph.replay()
                return self._loss.clone()
        return self._eager(input_ids, labels, seq_idx, weight)

    # ------------------------------------------------------------------ internals
    def _wants_graph(self, input_ids, seq_idx) -> bool:
        if self.disabled is not None or tuple(input_ids.shape) != self.shape:
            return False
        return self._packed is None or self._packed == (seq_idx is not None)

    def _eager(self, input_ids, labels, seq_idx, weight) -> torch.Tensor:
        self._ensure_grads()
        return self._forward_backward(input_ids, labels, seq_idx, weight)

    def _forward_backward(self, input_ids, labels, seq_idx, weight) -> torch.Tensor:
        """.grad += d(weight * loss); returns the loss, () fp32. weight: a float, or a () tensor (the graph's)."""
        loss = self.model(input_ids, labels=labels, seq_idx=seq_idx, return_logits=False).loss
        (loss * weight).backward()
        return loss.detach().float()

    def _ensure_grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _fill(self, input_ids, labels, seq_idx, weight) -> None:
        if seq_idx is not None:
            check_document_order(seq_idx)  # the model checks it on every eager call; a replay would not
            self._static["seq_idx"].copy_(seq_idx, non_blocking=True)
        self._static["input_ids"].copy_(input_ids, non_blocking=True)
        self._static["labels"].copy_(labels, non_blocking=True)
        self._static["weight"].fill_(weight)

    def _capture(self, input_ids, labels, seq_idx) -> None:
        device = self.model.device
        self._packed = seq_idx is not None
        self._static = {"input_ids": torch.zeros(self.shape, dtype=torch.long, device=device),
                        "labels": torch.zeros(self.shape, dtype=torch.long, device=device),
                        "weight": torch.ones((), dtype=torch.float32, device=device)}
        if self._packed:
            self._static["seq_idx"] = torch.zeros(self.shape, dtype=torch.int32, device=device)
        self._fill(input_ids, labels, seq_idx, 1.0)
        self._ensure_grads()
        # The warm-up adds gradients the caller did not ask for: zero them afterwards, or (rarely: capture in the
        # middle of an accumulation) restore a copy.
        grads = [p.grad for p in self.params]
        nonzero = bool(torch.stack([g.abs().amax() for g in grads]).amax() > 0) if grads else False
        saved = [g.clone() for g in grads] if nonzero else None
        stack = self.model.model
        preserve = stack.checkpoint_preserves_rng
        stack.checkpoint_preserves_rng = False  # no random op runs (unsupported_reason): nothing to replay
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._step_on_static()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._loss = self._step_on_static()
            self.graph = graph
        except RuntimeError as err:
            self.graph, self._loss = None, None
            self.disabled = f"CUDA graph capture failed ({type(err).__name__}: {str(err).splitlines()[0]})"
            torch.cuda.synchronize(device)
        finally:
            stack.checkpoint_preserves_rng = preserve
            with torch.no_grad():
                if saved is None:
                    torch._foreach_zero_(grads)
                else:
                    torch._foreach_copy_(grads, saved)

    def _step_on_static(self) -> torch.Tensor:
        s = self._static
        return self._forward_backward(s["input_ids"], s["labels"], s.get("seq_idx"), s["weight"])
