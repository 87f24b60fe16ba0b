"""Text generation: chunked prefill into a HybridCache, then a decode loop whose step is one CUDA graph replay.

    from gyrfalcon.generate import generate, stream
    out = generate(model, tokenizer, ["Hello", "Tell me a story"], max_new_tokens=64, temperature=0.7, seed=0)
    for event in stream(model, tokenizer, "Hello", max_new_tokens=64):
        print(event.text, end="", flush=True)
    ids = generate(model, input_ids, max_new_tokens=32).sequences         # token ids in, (b, l + new) ids out

`model` is a FalconH1ForCausalLM, or the LoRA wrapper the notebook API returns (api.LoraModel, from get_peft_model
or from_pretrained of an adapter folder): its adapters then run unmerged, as in training.

How a call runs (DecodeEngine):
1. Prompts are left-padded into one batch and prefilled `prefill_chunk` columns at a time (Mamba memory stays flat,
   attention reads the cache); padding never enters the cache (see cache.py).
2. The first token is chosen from the prefill's last logits; every further token is one decode step: embed, the
   layers' recurrent updates and attention over the cache, the LM head, the token choice (sampling.py) and the
   stop bookkeeping, all on the device. On CUDA the step is captured once per (KV-length bucket, sampler mode) into
   a CUDA graph and replayed; on CPU the same Python function runs eagerly.
3. Chosen tokens land in a small ring buffer on the device; every `sync_every` steps the host enqueues a copy of
   it to pinned memory and reads the PREVIOUS copy, so the host never stalls the GPU: it streams text, checks stop
   strings and EOS, and stops queueing steps once every row is finished.

The engine (cache, graphs, buffers) is kept per model between calls and rebuilt when the batch size, the needed
length, the weights' storage or the kernel switch (ops.use_reference) change.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import HybridCache, kv_bucket
from .model import FalconH1ForCausalLM
from .ops.dispatch import reference_forced
from .sampling import GenerationError, SamplerMode, SamplingParams, choose

__all__ = ["Completion", "DecodeEngine", "GenerationError", "GenerationOutput", "SamplingParams", "StreamEvent",
           "cached_engine", "generate", "generate_ids", "release", "stream"]

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


# ---------------------------------------------------------------------------------------------- results
@dataclass
class GenerationOutput:
    """Token-id generation. sequences (b, l + steps): the input ids as given, then the new tokens (pad after a row's
    EOS, as transformers); new_tokens: each row's new ids (EOS excluded); finish_reasons: "eos" or "length"."""

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    finish_reasons: list[str]


@dataclass
class Completion:
    """One prompt's result: text (stop string and EOS excluded), its token ids, why it ended ("eos", "stop",
    "length") and the prompt's token count."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


@dataclass
class StreamEvent:
    """New output of prompt `index` since its previous event. The last event of a prompt has finished=True and its
    finish_reason."""

    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class _Settings:
    """A call's validated settings."""

    max_new_tokens: int
    min_new_tokens: int
    sampling: SamplingParams
    eos_ids: list[int]
    pad_id: int
    stop: list[str]
    prefill_chunk: int
    sync_every: int
    cuda_graphs: bool | None


def _settings(model, tokenizer, *, max_new_tokens, min_new_tokens, temperature, top_k, top_p, min_p,
              repetition_penalty, seed, eos_token_id, pad_token_id, stop, prefill_chunk, sync_every,
              cuda_graphs) -> _Settings:
    def positive_int(name, value, minimum=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise GenerationError(f"{name} must be an integer >= {minimum}, got {value!r}")

    positive_int("max_new_tokens", max_new_tokens)
    positive_int("min_new_tokens", min_new_tokens, 0)
    positive_int("prefill_chunk", prefill_chunk)
    positive_int("sync_every", sync_every)
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise GenerationError(f"cuda_graphs must be True, False or None (automatic), got {cuda_graphs!r}")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    vocab = model.config.vocab_size
    if eos_token_id is None:
        # the config's and the tokenizer's, as far as they are ids of this vocabulary
        eos_ids = list(model.config.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if isinstance(tok_eos, int) and tok_eos not in eos_ids:
            eos_ids.append(tok_eos)
        eos_ids = [e for e in eos_ids if isinstance(e, int) and 0 <= e < vocab]
    else:
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab for e in eos_ids):
            raise GenerationError(f"eos_token_id must be a token id or a list of them in [0, {vocab}) ([] for no "
                                  f"EOS), got {eos_token_id!r}")
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
        if pad_token_id is None or not 0 <= pad_token_id < vocab:
            pad_token_id = eos_ids[0] if eos_ids else 0
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise GenerationError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise GenerationError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
    if any(s == "" for s in stops):
        raise GenerationError("stop strings must not be empty (an empty string would stop at once)")
    if stops and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer to read the text; pass one, or use eos_token_id")
    return _Settings(max_new_tokens, min_new_tokens, sampling, eos_ids, pad_token_id, stops, prefill_chunk,
                     sync_every, cuda_graphs)


def _check_prompts(model, prompts: list[list[int]]) -> None:
    """Every prompt: at least one token, ids inside the vocabulary, shorter than the model's context."""
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    if not prompts:
        raise GenerationError("no prompts given: pass at least one prompt")
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise GenerationError(f"prompt {i} is empty (no tokens): give it some text or at least a BOS token")
        if len(ids) >= context:
            raise GenerationError(f"prompt {i} has {len(ids)} tokens, but the model's context "
                                  f"(max_position_embeddings) is {context}: shorten it to leave room for the reply")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


# ---------------------------------------------------------------------------------------------- the engine
class _Readback:
    """Tokens of steps [start, start + count) on their way to the host (a copy of the device ring buffer)."""

    def __init__(self, start: int, count: int, ring: torch.Tensor, host: torch.Tensor | None):
        self.start, self.count = start, count
        if host is None:          # CPU: the copy is done when the step is
            self.buffer, self.event = ring.clone(), None
        else:
            host.copy_(ring, non_blocking=True)
            self.buffer, self.event = host, torch.cuda.Event()
            self.event.record()

    def tokens(self) -> list[list[int]]:
        """(b, count) token ids, waiting for the copy if needed."""
        if self.event is not None:
            self.event.synchronize()
        n = self.buffer.shape[1]
        slots = [(self.start + j) % n for j in range(self.count)]
        return self.buffer[:, slots].tolist()


def _fingerprint(model) -> tuple:
    """What a captured graph depends on besides its own buffers: the storage of every weight (a graph reads fixed
    addresses), the modules' switches that change the forward (LoRA `merged`), and the kernel / reference switch."""
    params = tuple((n, p.data_ptr(), p.dtype, tuple(p.shape)) for n, p in model.named_parameters())
    buffers = tuple((n, b.data_ptr()) for n, b in model.named_buffers())
    switches = tuple(getattr(m, "merged", None) for m in model.modules())
    return reference_forced(), params, buffers, switches


class DecodeEngine:
    """A HybridCache for `batch` rows of up to `capacity` tokens, the decode step's static buffers, and its CUDA
    graphs (one per KV-length bucket and sampler mode). `run` generates for one batch of token-id prompts."""

    def __init__(self, model, batch: int, capacity: int, *, cuda_graphs: bool | None = None, sync_every: int = 16):
        device = model.device
        if cuda_graphs and device.type != "cuda":
            raise GenerationError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
        # A weak reference: engines are kept per model in a WeakKeyDictionary, which must not keep the model alive.
        self._model = weakref.ref(model)
        self.batch, self.sync_every = batch, sync_every
        self.cache = HybridCache.for_model(model, batch, capacity)
        # dynamic NTK rope reads the longest position back each step: no graph for it
        wanted = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.use_graphs = wanted and not self.cache.dynamic_rope
        self.fingerprint = _fingerprint(model)
        vocab = model.config.vocab_size
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, **long)          # the token each row feeds to the next step
        self.step = torch.zeros((), **long)               # index of the token being chosen (0: first new token)
        self.min_new = torch.zeros((), **long)
        self.ring = torch.zeros(batch, sync_every, **long)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.pad = torch.zeros((), **long)
        self.noise = torch.zeros(sync_every, batch, dtype=torch.float32, device=device)
        self.temperature = torch.ones(batch, dtype=torch.float32, device=device)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=device)
        self.min_p = torch.zeros(batch, dtype=torch.float32, device=device)
        self.penalty = torch.ones(batch, dtype=torch.float32, device=device)
        self.seen: torch.Tensor | None = None             # (b, vocab) bool, made when a repetition penalty is used
        self.rng = torch.Generator(device=device)
        self.graphs: dict[tuple[int, SamplerMode], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.host = (torch.empty(2, batch, sync_every, dtype=torch.long, pin_memory=True)
                     if device.type == "cuda" else None)
        self.flip = 0

    @property
    def model(self):
        return self._model()

    def fits(self, model, batch: int, length: int, cuda_graphs: bool | None, sync_every: int) -> bool:
        want_graphs = model.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        return (self.model is model and self.batch == batch and self.cache.capacity >= length
                and self.sync_every == sync_every and self.cache.dtype == model.dtype
                and self.cache.device == model.device
                and self.use_graphs == (want_graphs and not self.cache.dynamic_rope)
                and self.fingerprint == _fingerprint(model))

    # ------------------------------------------------------------------ one step
    def _choose_and_record(self, logits: torch.Tensor, mode: SamplerMode) -> None:
        """Choose each row's next token from logits (b, vocab) and record it: ring buffer, EOS flags, penalty set,
        the next step's input. Device ops only (runs inside the graph)."""
        logits = logits.float().masked_fill(self.eos_mask & (self.step < self.min_new), float("-inf"))
        slot = (self.step % self.sync_every).view(1)
        u = self.noise.index_select(0, slot)[0]
        chosen = choose(logits, mode, temperature=self.temperature, top_p=self.top_p, min_p=self.min_p,
                        penalty=self.penalty, seen=self.seen, u=u)
        chosen = torch.where(self.done, self.pad, chosen)
        self.ring.index_copy_(1, slot, chosen[:, None])
        self.done |= self.eos_mask[chosen]
        if mode.penalty:
            self.seen.scatter_(1, chosen[:, None], True)
        self.tokens.copy_(chosen)
        self.step += 1

    def _decode(self, kv_len: int, mode: SamplerMode) -> None:
        logits = self.model.decode_step(self.tokens, self.cache, kv_len)
        self._choose_and_record(logits, mode)

    def _capture(self, kv_len: int, mode: SamplerMode) -> None:
        """Warm up (kernels compiled, library handles made) and capture the step for this bucket and mode. The warm-up
        changes the cache and buffers: `run` resets them afterwards."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode(kv_len, mode)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._decode(kv_len, mode)
        self.graphs[(kv_len, mode)] = graph

    def _kv_len(self, longest: int) -> int:
        """Key columns a step reads when the longest row will hold `longest` tokens: its bucket, with or without
        graphs, so both paths run the very same kernels on the same shapes."""
        return min(kv_bucket(longest), self.cache.capacity)

    def _step(self, kv_len: int, mode: SamplerMode) -> None:
        if self.use_graphs:
            self.graphs[(kv_len, mode)].replay()
        else:
            self._decode(kv_len, mode)

    # ------------------------------------------------------------------ a batch
    def _prepare(self, prompts: list[list[int]], s: _Settings, mode: SamplerMode, steps: int) -> None:
        """Capture missing graphs, then reset the cache and every buffer for this call's prompts and settings."""
        b, device = self.batch, self.model.device
        if mode.penalty and self.seen is None:
            self.seen = torch.zeros(b, self.model.config.vocab_size, dtype=torch.bool, device=device)
        longest = max(len(p) for p in prompts)
        # before any capture: the graphs read this buffer; refreshed each call, as weights may change in place
        self.cache.load_conv_weights(self.model)
        if self.use_graphs:
            buckets = sorted({self._kv_len(longest + j) for j in range(1, steps)})
            for kv_len in buckets:
                if (kv_len, mode) not in self.graphs:
                    self._capture(kv_len, mode)
        self.cache.reset()
        self.step.zero_()
        self.done.zero_()
        self.ring.zero_()
        self.min_new.fill_(s.min_new_tokens)
        self.pad.fill_(s.pad_id)
        self.eos_mask.zero_()
        if s.eos_ids:
            self.eos_mask[torch.tensor(s.eos_ids, device=device)] = True
        p = s.sampling
        self.temperature.fill_(p.temperature if p.temperature > 0 else 1.0)
        self.top_p.fill_(p.top_p)
        self.min_p.fill_(p.min_p)
        self.penalty.fill_(p.repetition_penalty)
        if mode.penalty:
            self.seen.zero_()
            for i, ids in enumerate(prompts):
                self.seen[i, torch.tensor(ids, device=device)] = True
        if p.seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(p.seed)

    def _prefill(self, prompts: list[list[int]], chunk: int) -> torch.Tensor:
        """Left-pad, feed `chunk` columns at a time; returns the last position's logits (b, vocab)."""
        device, pad = self.model.device, 0
        width = max(len(p) for p in prompts)
        ids = torch.full((self.batch, width), pad, dtype=torch.long)
        mask = torch.zeros(self.batch, width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = True
        ids, mask = ids.to(device), mask.to(device)
        padded = not bool(mask.all())
        logits = None
        for start in range(0, width, chunk):
            piece = slice(start, min(start + chunk, width))
            logits = self.model(ids[:, piece], attention_mask=mask[:, piece] if padded else None, cache=self.cache,
                                logits_to_keep=1).logits
        return logits[:, -1]

    @torch.no_grad()
    def run(self, prompts: list[list[int]], s: _Settings) -> Iterator[tuple[int, list[list[int]]]]:
        """Generate for `batch` prompts (token ids). Yields (first step, tokens (b, n) as lists) as chunks arrive; a
        row's tokens after its EOS are the pad id. Stops after s.max_new_tokens steps, when every row has emitted
        an EOS, or when the caller's `send(True)` says every row is finished (stop strings)."""
        if len(prompts) != self.batch:
            raise GenerationError(f"this engine decodes batches of {self.batch} prompts, got {len(prompts)}")
        mode = s.sampling.mode(self.model.config.vocab_size)
        total = s.max_new_tokens
        self._prepare(prompts, s, mode, total)
        logits = self._prefill(prompts, s.prefill_chunk)
        if not mode.greedy:
            self.noise.uniform_(generator=self.rng)
        self._choose_and_record(logits, mode)
        longest = max(self.cache.host_lengths)
        pending = collections.deque([self._readback(0, 1)])
        produced, eos_done, caller_done = 1, [False] * self.batch, False
        eos = set(s.eos_ids)
        while pending:
            if produced < total and not caller_done and not all(eos_done):
                count = min(self.sync_every, total - produced)
                if not mode.greedy:
                    self.noise.uniform_(generator=self.rng)
                for _ in range(count):
                    longest += 1
                    self._step(self._kv_len(longest), mode)
                self.cache.advance_host(count)
                pending.append(self._readback(produced, count))
                produced += count
            chunk = pending.popleft()
            tokens = chunk.tokens()
            for i, row in enumerate(tokens):
                eos_done[i] = eos_done[i] or any(t in eos for t in row)
            caller_done = bool((yield chunk.start, tokens)) or caller_done
            if caller_done or all(eos_done):
                # Steps already queued finish on the device in the background; the next run resets everything.
                pending.clear()

    def _readback(self, start: int, count: int) -> _Readback:
        host = None
        if self.host is not None:
            host, self.flip = self.host[self.flip], 1 - self.flip
        return _Readback(start, count, self.ring, host)


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _unwrapped(model):
    """The model to decode with: the FalconH1ForCausalLM inside an api.LoraModel, else `model` itself."""
    if isinstance(model, FalconH1ForCausalLM):
        return model
    from .api import LoraModel  # imported only for a model that may be one

    return model.base_model if isinstance(model, LoraModel) else model


def _engine(model, batch: int, length: int, s: _Settings) -> DecodeEngine:
    """The model's engine if it fits this call, else a new one (the old one is dropped first, freeing its cache)."""
    engine = _ENGINES.get(model)
    if engine is not None and engine.fits(model, batch, length, s.cuda_graphs, s.sync_every):
        return engine
    _ENGINES.pop(model, None)
    del engine
    capacity = min(kv_bucket(length), max(length, model.config.max_position_embeddings))
    engine = DecodeEngine(model, batch, capacity, cuda_graphs=s.cuda_graphs, sync_every=s.sync_every)
    _ENGINES[model] = engine
    return engine


def release(model) -> None:
    """Drop the model's decode engine (its cache and CUDA graphs) to free device memory."""
    _ENGINES.pop(_unwrapped(model), None)


def cached_engine(model) -> DecodeEngine | None:
    """The decode engine kept for the model since its last generation, if any."""
    return _ENGINES.get(_unwrapped(model))


# ---------------------------------------------------------------------------------------------- rows on the host
@dataclass
class _Row:
    """One prompt's output as the host sees it: tokens (EOS excluded), text, what has been streamed."""

    prompt_tokens: int
    limit: int                    # new tokens this row may produce
    tokens: list[int] = field(default_factory=list)
    eos_token: int | None = None  # the EOS id that ended the row
    text: str = ""
    streamed_text: int = 0
    streamed_tokens: int = 0
    finish_reason: str | None = None
    reported: bool = False        # its finished event has been given out


class _Rows:
    """Applies chunks of chosen tokens to the rows: EOS, max length, stop strings, streamable text."""

    def __init__(self, prompts: list[list[int]], s: _Settings, tokenizer, limit: int, skip_special_tokens: bool):
        self.rows = [_Row(len(p), limit) for p in prompts]
        self.s, self.tokenizer, self.skip = s, tokenizer, skip_special_tokens
        self.eos = set(s.eos_ids)
        self.hold = max((len(x) for x in s.stop), default=0)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip)

    def add(self, tokens: list[list[int]]) -> None:
        for row, new in zip(self.rows, tokens):
            if row.finish_reason is not None:
                continue
            before = len(row.tokens)
            for t in new:
                if t in self.eos:
                    row.finish_reason, row.eos_token = FINISH_EOS, t
                    break
                row.tokens.append(t)
                if len(row.tokens) >= row.limit:
                    row.finish_reason = FINISH_LENGTH
                    break
            if self.tokenizer is not None and len(row.tokens) > before:
                self._update_text(row, before)

    def _update_text(self, row: _Row, before: int) -> None:
        text = self._decode(row.tokens)
        if self.s.stop:
            # a stop string can only end in the new text; it may begin up to (longest stop - 1) characters earlier
            search_from = max(0, len(row.text) - self.hold)
            hits = [(text.find(x, search_from), x) for x in self.s.stop]
            hits = [(pos, x) for pos, x in hits if pos >= 0]
            if hits:
                pos = min(hits)[0]
                # the first token that completes the stop string ends the row's tokens
                for n in range(before + 1, len(row.tokens) + 1):
                    if any(x in self._decode(row.tokens[:n])[search_from:] for x in self.s.stop):
                        del row.tokens[n:]
                        break
                row.text, row.finish_reason = text[:pos], FINISH_STOP
                return
        row.text = text

    def all_finished(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)

    def finish_all(self) -> None:
        """The loop ended (max_new_tokens): every open row ends by length."""
        for r in self.rows:
            if r.finish_reason is None:
                r.finish_reason = FINISH_LENGTH

    def events(self, offset: int) -> list[StreamEvent]:
        """What each row has newly produced since the last call: text safe to show (a partial UTF-8 character or
        the beginning of a possible stop string is held back until the row finishes) and token ids."""
        out = []
        for i, row in enumerate(self.rows):
            done = row.finish_reason is not None
            text = row.text
            if not done:
                text = text.rstrip("\ufffd")
                cut = _stop_prefix(text, self.s.stop)
                text = text[:len(text) - cut]
            new_text = text[row.streamed_text:] if len(text) > row.streamed_text else ""
            new_tokens = row.tokens[row.streamed_tokens:]
            if new_text or new_tokens or (done and not row.reported):
                row.streamed_text = max(row.streamed_text, len(text))
                row.streamed_tokens = len(row.tokens)
                row.reported = done
                out.append(StreamEvent(offset + i, new_text, new_tokens, done, row.finish_reason))
        return out


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back while it may still complete)."""
    best = 0
    for x in stops:
        for n in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------------------------------------- the public calls
_DEFAULTS = dict(max_new_tokens=256, min_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, seed=None, eos_token_id=None, pad_token_id=None, stop=None,
                 prefill_chunk=8192, sync_every=16, cuda_graphs=None)


def _options(kwargs: dict) -> dict:
    unknown = set(kwargs) - set(_DEFAULTS) - {"batch_size", "skip_special_tokens"}
    if unknown:
        raise GenerationError(f"unknown generation option(s) {sorted(unknown)}; options: {', '.join(_DEFAULTS)}, "
                              "batch_size, skip_special_tokens")
    return {k: kwargs.get(k, v) for k, v in _DEFAULTS.items()}


def _tokenize(tokenizer, prompt, index: int) -> list[int]:
    """A prompt as token ids: a string (tokenized as is), a chat (list of {"role", "content"} messages, through the
    tokenizer's chat template with the assistant turn opened) or token ids."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise GenerationError(f"prompt {index} must be a string, a list of chat messages or a list of token ids, got "
                          f"{type(prompt).__name__}")


def _batches(prompts: list[list[int]], batch_size: int | None) -> list[list[int]]:
    """Indices of the prompts per batch: similar lengths together (less padding), at most batch_size each."""
    if batch_size is None:
        return [list(range(len(prompts)))]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenerationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _row_limit(model, prompts: list[list[int]], s: _Settings) -> int:
    """New tokens a batch may produce: max_new_tokens, cut so that no row runs past the model's context."""
    return min(s.max_new_tokens, model.config.max_position_embeddings - max(len(p) for p in prompts))


def _run(model, tokenizer, prompts: list[list[int]], s: _Settings, skip_special_tokens: bool,
         batch_size: int | None) -> Iterator[tuple[list[int], _Rows]]:
    """Every batch through its engine; yields (prompt indices of the batch, its rows) after each chunk of tokens
    and once more when the batch is over (every row finished)."""
    for indices in _batches(prompts, batch_size):
        batch = [prompts[i] for i in indices]
        limit = _row_limit(model, batch, s)
        batch_settings = s if limit == s.max_new_tokens else dataclasses.replace(s, max_new_tokens=limit)
        rows = _Rows(batch, batch_settings, tokenizer, limit, skip_special_tokens)
        engine = _engine(model, len(batch), max(len(p) for p in batch) + limit, batch_settings)
        was_training = model.training
        model.eval()
        try:
            loop = engine.run(batch, batch_settings)
            finished = None
            while True:
                try:
                    _, tokens = loop.send(finished)
                except StopIteration:
                    break
                rows.add(tokens)
                finished = rows.all_finished()
                yield indices, rows
            rows.finish_all()
            yield indices, rows
        finally:
            model.train(was_training)


def generate_ids(model, input_ids, *, attention_mask=None, **options) -> GenerationOutput:
    """Token ids in, token ids out. input_ids (b, l) tensor (attention_mask (b, l): 0 = left padding) or a list of
    id lists of any lengths. Returns GenerationOutput; `.sequences` is (b, l + steps) with the inputs as given."""
    model = _unwrapped(model)
    s = _settings(model, None, **_options(options))
    if torch.is_tensor(input_ids):
        if input_ids.dim() != 2:
            raise GenerationError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        host_ids = input_ids.detach().cpu()
        if attention_mask is None:
            prompts = host_ids.tolist()
        else:
            mask = attention_mask.detach().cpu().bool()
            if mask.shape != host_ids.shape:
                raise GenerationError(f"attention_mask has shape {tuple(mask.shape)}, input_ids "
                                      f"{tuple(host_ids.shape)}")
            if host_ids.shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise GenerationError("attention_mask must be left padding (0s before each row's tokens, none after)")
            prompts = [row[m].tolist() for row, m in zip(host_ids, mask)]
    else:
        if not isinstance(input_ids, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in input_ids):
            raise GenerationError("input_ids must be a (batch, length) tensor or a list of token id lists; for text "
                                  "prompts pass a tokenizer: generate(model, tokenizer, prompts)")
        prompts = [_tokenize(None, p, i) for i, p in enumerate(input_ids)]
        host_ids = None
    _check_prompts(model, prompts)
    rows_by_prompt: list[_Row | None] = [None] * len(prompts)
    for indices, rows in _run(model, None, prompts, s, True, options.get("batch_size")):
        for i, row in zip(indices, rows.rows):
            rows_by_prompt[i] = row
    # as transformers: each row's new tokens, its EOS, then pad up to the longest row
    new = [row.tokens + ([row.eos_token] if row.eos_token is not None else []) for row in rows_by_prompt]
    tail = torch.full((len(prompts), max(len(t) for t in new)), s.pad_id, dtype=torch.long)
    for i, t in enumerate(new):
        tail[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    if host_ids is None:
        width = max(len(p) for p in prompts)
        host_ids = torch.full((len(prompts), width), s.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            host_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
    device = input_ids.device if torch.is_tensor(input_ids) else model.device
    return GenerationOutput(sequences=torch.cat([host_ids.to(torch.long), tail], dim=1).to(device),
                            new_tokens=[row.tokens for row in rows_by_prompt],
                            finish_reasons=[row.finish_reason for row in rows_by_prompt])


def _text_batches(model, tokenizer, prompts, options: dict):
    """(single, iterator of (prompt indices, rows) as batches progress) for text, chat or id prompts; one prompt
    (a string or one chat) gives single=True. Settings and prompts are checked before anything runs."""
    single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                          and isinstance(prompts[0], dict))
    items = [prompts] if single else list(prompts)
    model = _unwrapped(model)
    s = _settings(model, tokenizer, **_options(options))
    ids = [_tokenize(tokenizer, p, i) for i, p in enumerate(items)]
    _check_prompts(model, ids)
    skip = options.get("skip_special_tokens", True)
    return single, _run(model, tokenizer, ids, s, skip, options.get("batch_size"))


def stream(model, tokenizer, prompts, **options) -> Iterator[StreamEvent]:
    """Generate and yield StreamEvents as text is produced (every `sync_every` tokens). prompts: one prompt or a
    list (strings, chat message lists, token id lists). Options as `generate`."""
    _, batches = _text_batches(model, tokenizer, prompts, options)
    for indices, rows in batches:
        for event in rows.events(0):
            event.index = indices[event.index]
            yield event


def generate(model, tokenizer_or_ids, prompts=None, **options):
    """Generate text (or token ids).

        generate(model, tokenizer, "Hi")              -> Completion
        generate(model, tokenizer, ["Hi", chat, ...]) -> list[Completion]   (strings, chat message lists or ids)
        generate(model, input_ids)                    -> GenerationOutput   (tensor (b, l) or lists of ids;
                                                                             attention_mask=... for left padding)
    Options: max_new_tokens (256), min_new_tokens (0), temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
    min_p (0 = off), repetition_penalty (1 = off), seed, eos_token_id (default: the config's and the tokenizer's;
    [] = none), pad_token_id, stop (string or list of strings, text form only), batch_size (prompts per batch;
    default all at once), prefill_chunk (8192 tokens), sync_every (16 steps between host reads), cuda_graphs
    (None = on CUDA), skip_special_tokens (True)."""
    if prompts is None:
        return generate_ids(model, tokenizer_or_ids, **options)
    single, batches = _text_batches(model, tokenizer_or_ids, prompts, options)
    results: list[Completion | None] = [None] * (1 if single else len(prompts))
    for indices, rows in batches:
        if rows.all_finished():
            for i, row in zip(indices, rows.rows):
                results[i] = Completion(row.text, row.tokens, row.finish_reason, row.prompt_tokens)
    return results[0] if single else results
