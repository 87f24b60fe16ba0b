"""Choosing the next token on the device: greedy, temperature, top-k, top-p, min-p and repetition penalty.

Everything is torch ops on the logits' device with no read-back, so the choice runs inside a captured CUDA graph.
The per-row settings live in tensors (changing them needs no new graph); only the shape-changing choices (greedy or
not, top-k's k, whether top-p needs a sort) are Python values. Randomness comes in as one uniform number per row
(`u`, drawn by the caller from a seeded torch.Generator outside any graph) and picks a token by inverting the
cumulative distribution of the kept tokens, so a token with zero kept probability can never come out.

Shapes: logits (b, vocab) float32; seen (b, vocab) bool (tokens in the prompt or generated so far); u (b,) in [0, 1);
per-row settings (b,). Order as transformers applies them: repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class GenerationError(ValueError):
    """Bad generation input (prompt, length or sampling setting); the message names the argument and the fix."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (top_k / top_p / min_p then have no effect); top_k 0 = off; top_p 1 = off; min_p 0 =
    off; repetition_penalty 1 = off (> 1 discourages tokens already in the prompt or the output); seed: the same
    seed, prompts and settings give the same tokens (None: a fresh random seed)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature, lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k, lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0 (0 = off)"),
            ("top_p", self.top_p, lambda v: 0 < v <= 1, "must lie in (0, 1] (1 = off)"),
            ("min_p", self.min_p, lambda v: 0 <= v < 1, "must lie in [0, 1) (0 = off)"),
            ("repetition_penalty", self.repetition_penalty, lambda v: v > 0,
             "must be > 0 (1 = off, > 1 discourages repeats)"),
        )
        for name, value, ok, rule in checks:
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            if not number or not ok(value):
                raise GenerationError(f"{name} {rule}; got {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise GenerationError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def mode(self, vocab_size: int) -> "SamplerMode":
        """The shape-changing part of the settings (a CUDA graph is captured per mode)."""
        if self.greedy:
            return SamplerMode(greedy=True, top_k=0, top_p=False, min_p=False,
                               penalty=self.repetition_penalty != 1)
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return SamplerMode(greedy=False, top_k=top_k, top_p=self.top_p < 1, min_p=self.min_p > 0,
                           penalty=self.repetition_penalty != 1)


@dataclass(frozen=True)
class SamplerMode:
    greedy: bool
    top_k: int       # 0: all tokens are candidates
    top_p: bool
    min_p: bool
    penalty: bool


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' rule on the tokens seen: negative logits multiplied by the penalty, positive ones divided."""
    penalised = torch.where(logits < 0, logits * penalty[:, None], logits / penalty[:, None])
    return torch.where(seen, penalised, logits)


def kept_probabilities(logits: torch.Tensor, mode: SamplerMode, temperature: torch.Tensor,
                       top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None):
    """(probs (b, c), candidates (b, c) token ids or None = all tokens in order): the renormalised distribution of
    the candidates with the filtered-out ones at exactly 0. c = top_k, or the vocabulary."""
    logits = logits / temperature[:, None]
    if mode.top_k:
        logits, candidates = logits.topk(mode.top_k, dim=-1)                  # sorted, largest first
    elif mode.top_p:
        logits, candidates = logits.sort(dim=-1, descending=True)
    else:
        candidates = None
    probs = torch.softmax(logits, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if mode.top_p:
        # keep the smallest prefix of the sorted tokens whose mass reaches top_p (the first token always)
        before = probs.cumsum(-1) - probs
        keep &= before < top_p[:, None]
    if mode.min_p:
        keep &= probs >= min_p[:, None] * probs.amax(-1, keepdim=True)
    return probs * keep, candidates


def draw(probs: torch.Tensor, candidates: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Invert the cumulative distribution at u (b,) in [0, 1): the token whose probability interval holds u times
    the kept mass. Returns (b,) int64 token ids."""
    cdf = probs.cumsum(-1)
    target = u.to(cdf.dtype)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True)
    # Rounding can put target at the total mass; never step onto the zero-probability tail after the last kept one.
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_kept = torch.where(probs > 0, positions, torch.zeros_like(positions)).amax(-1, keepdim=True)
    index = torch.minimum(index, last_kept)
    tokens = index if candidates is None else candidates.gather(-1, index)
    return tokens[:, 0]


def choose(logits: torch.Tensor, mode: SamplerMode, *, temperature: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor | None, u: torch.Tensor | None):
    """The next token of each row, (b,) int64. logits (b, vocab) float32; the other tensors as in the module
    docstring (`seen` and `u` may be None when the mode does not use them)."""
    if mode.penalty:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if mode.greedy:
        return logits.argmax(-1)
    probs, candidates = kept_probabilities(logits, mode, temperature, top_p, min_p)
    return draw(probs, candidates, u)
