"""`gyrfalcon generate` and `gyrfalcon chat`: argument parsers and the commands behind them.

    gyrfalcon generate --prompt "Once upon a time" --max-new-tokens 64        # the built-in tiny model
    gyrfalcon generate --model tiiuae/Falcon-H1-0.5B-Instruct --prompt "Hi" --chat-template --temperature 0.7
    gyrfalcon generate --model PATH --prompts in.jsonl --output out.jsonl      # a batch; JSON lines out
    gyrfalcon chat --model PATH [--adapter DIR] [--system TEXT]

`--prompts FILE.jsonl`: one JSON value per line, either a string, {"prompt": "..."} or {"messages": [...]} (a chat,
rendered with the tokenizer's chat template). Every line is checked before anything is generated. Output lines:
{"index", "completion", "finish_reason", "prompt_tokens", "completion_tokens"} plus the input's own keys.
`--adapter DIR` loads a LoRA adapter (PEFT format) onto the model and merges it into the weights for decoding speed.
Without --model both commands run the built-in tiny model (random weights: the text is noise, the machinery real).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .sampling import GenerationError

_DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_generate_parsers(subparsers) -> None:
    """Add the `generate` and `chat` commands to an argparse subparsers object."""
    gen = subparsers.add_parser(
        "generate", help="generate text from a prompt or a JSON-lines file of prompts",
        description="Generate text with a Falcon-H1 model: one prompt streamed to stdout, or a batch of prompts "
                    "from a JSON-lines file written as JSON lines. Without --model, the built-in tiny model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gyrfalcon generate --prompt \"Once upon a time\" --max-new-tokens 64   # the tiny model\n"
               "  gyrfalcon generate -m tiiuae/Falcon-H1-0.5B-Instruct --prompt \"Hi\" --chat-template\n"
               "  gyrfalcon generate -m runs/x/adapter --prompts in.jsonl -o out.jsonl   # a trained adapter\n"
               "output lines: {\"index\", \"completion\", \"finish_reason\", \"prompt_tokens\", "
               "\"completion_tokens\"} plus the input's own keys")
    _model_arguments(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                        help='one prompt per line: a JSON string, {"prompt": ...} or {"messages": [...]}')
    gen.add_argument("--chat-template", action="store_true",
                     help="wrap --prompt as a user message in the tokenizer's chat template")
    gen.add_argument("--output", "-o", type=Path, default=None, metavar="FILE.jsonl",
                     help="with --prompts: write the JSON lines here instead of stdout (an existing file is "
                          "refused unless --overwrite)")
    gen.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default: 16)")
    _sampling_arguments(gen, temperature=0.0)
    gen.set_defaults(run=run_generate)

    chat = subparsers.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Interactive chat through the tokenizer's chat template, replies streamed. Commands: /reset "
                    "(forget the conversation), /exit. Without --model, the built-in tiny model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gyrfalcon chat -m tiiuae/Falcon-H1-0.5B-Instruct --system \"Answer briefly.\"\n"
               "  gyrfalcon chat -m runs/x/adapter                  # a trained adapter on the base it names")
    _model_arguments(chat)
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    _sampling_arguments(chat, temperature=0.7)
    chat.set_defaults(run=run_chat_command)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="a checkpoint folder or hub id with its tokenizer, tiny (the built-in tiny model, the "
                             "default), or a LoRA adapter folder (its base model is the one it names)")
    parser.add_argument("--adapter", "-a", default=None, metavar="DIR",
                        help="a LoRA adapter folder (PEFT format) to merge into --model (default: --model's base "
                             "from the adapter's adapter_config.json when --model is left out)")
    parser.add_argument("--dtype", choices=_DTYPES, default="auto",
                        help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: CUDA when available)")
    parser.add_argument("--token", default=None, help="Hugging Face token for gated or private hub models")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")


def _sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    g = parser.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per reply at most (default: 256)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy (default: {temperature:g})")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not part of the output")


def _options(args: argparse.Namespace) -> dict:
    """The decoding options, checked before any model is loaded (a bad flag fails in a second, not a minute)."""
    from .sampling import SamplingParams

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.stop is not None and any(not s for s in args.stop):
        raise GenerationError("--stop must not be empty text")
    if getattr(args, "batch_size", 1) < 1:
        raise GenerationError(f"--batch-size must be >= 1, got {args.batch_size}")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=args.stop)


# ---------------------------------------------------------------------------------------------- model loading
def load_for_generation(model: str | None, *, adapter: str | None = None, dtype: str = "auto", device=None,
                        token: str | None = None, revision: str | None = None):
    """(model, tokenizer): a checkpoint and its tokenizer, or the built-in tiny model (None or "tiny"); an adapter
    merged in. A LoRA adapter folder given as `model` is taken as `adapter`; with an adapter and no model, the base
    is the one its adapter_config.json names. An adapter trained with QLoRA (its gyrfalcon_training.json says so) is
    merged onto the base's dequantized 4-bit weights, the weights it was trained on, as `gyrfalcon merge` does. The
    tokenizer is the adapter folder's where it holds one (training saves it there), else the model's."""
    import torch

    from .model import FalconH1ForCausalLM
    from .peft_io import base_was_4bit, resolve_adapter, tokenizer_source

    model, adapter = _model_and_adapter(model, adapter)
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    device = _device(device)
    # the adapter's folder (a hub adapter is fetched here: its record says which base it was trained on)
    folder = resolve_adapter(adapter, token=token, revision=revision) if adapter is not None else None
    if model is None:
        from .assets import load_tiny_tokenizer
        from .config import FalconH1Config

        net = FalconH1ForCausalLM.from_config(FalconH1Config.from_preset("tiny"), dtype=torch_dtype, device=device,
                                              seed=0)
        tokenizer = load_tiny_tokenizer()
    elif folder is not None and base_was_4bit(folder):
        net = _dequantized_4bit_base(model, torch_dtype, device, token, revision)
    else:
        net = FalconH1ForCausalLM.from_pretrained(model, dtype=torch_dtype, device=device, token=token,
                                                  revision=revision)
    if model is not None:
        source = tokenizer_source(folder, model)
        tokenizer = _load_tokenizer(str(source), token, revision if source == model else None)
    if folder is not None:
        _apply_adapter(net, folder)
    return net.eval(), tokenizer


def _model_and_adapter(model: str | None, adapter: str | None) -> tuple[str | None, str | None]:
    """(base model or None for the tiny one, adapter or None) from what the user passed."""
    from .peft_io import adapter_base, local_adapter

    if model == "tiny":
        model = None
    if (folder := local_adapter(model)) is not None:
        if adapter is not None:
            raise GenerationError(f"--model {model} is a LoRA adapter folder and --adapter {adapter} is another: "
                                  "pass the base model as --model, or only the adapter")
        base = adapter_base(folder)
        if base is None:
            raise GenerationError(f"{model}: a LoRA adapter whose adapter_config.json names no base model; pass the "
                                  "base as --model and this folder as --adapter")
        return base, model
    if model is None and (folder := local_adapter(adapter)) is not None:
        # its base when it names one; else (an adapter saved without one) the built-in tiny model, as before
        model = adapter_base(folder)
    return model, adapter


def _device(device):
    """The --device value checked by `api.resolve_device` (a clear error, not a traceback, for cuda without a GPU
    or a misspelling); None stays None (the loaders' own default)."""
    if device is None:
        return None
    from .api import resolve_device
    from .recipes import RecipeError

    try:
        return resolve_device(device)
    except RecipeError as err:
        raise GenerationError(f"--{err}") from None  # its message starts "device ...": the flag's name


def _load_tokenizer(model: str, token, revision):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, token=token, revision=revision)
    except (OSError, ValueError) as err:
        raise GenerationError(f"{model}: no usable tokenizer found next to the weights ({err}); a checkpoint for "
                              "generation needs its tokenizer files (tokenizer.json, tokenizer_config.json), or pass "
                              "an adapter folder that holds them") from None


def _dequantized_4bit_base(model: str, dtype, device, token, revision):
    """The base a QLoRA adapter was trained on, as dense weights: each decoder linear quantized to NF4 as it is
    read, then dequantized (quant.load_4bit, quant.dequantize), so the merged model computes what the QLoRA model
    did and decodes at a dense model's speed. Needs bitsandbytes on the device."""
    from .quant import QLoRAUnavailable, dequantize, load_4bit

    try:
        return dequantize(load_4bit(model, device=device, compute_dtype=dtype, token=token, revision=revision))
    except QLoRAUnavailable as err:
        raise GenerationError(f"the adapter was trained with QLoRA, on the 4-bit form of {model}: {err}") from None


def _apply_adapter(model, folder) -> None:
    """Load the adapter in `folder` (resolved: a local folder or a hub snapshot) into the model and fold it in."""
    from .lora import merge_and_unload
    from .peft_io import load_adapter

    load_adapter(model, folder)
    merge_and_unload(model)  # plain linears again: decoding runs at the base model's speed


# ---------------------------------------------------------------------------------------------- commands
def read_prompt_file(path: Path) -> list[dict]:
    """Every line of a JSON-lines prompt file as {"prompt": str} or {"messages": list, ...}; errors name the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise GenerationError(f"--prompts {path}: cannot read it ({err.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerationError(f"--prompts {path}, line {number}: not valid JSON ({err.msg})") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict) or ("prompt" in value) == ("messages" in value):
            raise GenerationError(f'--prompts {path}, line {number}: expected a string, {{"prompt": ...}} or '
                                  '{"messages": [...]} (exactly one of the two keys)')
        if "prompt" in value and not (isinstance(value["prompt"], str) and value["prompt"]):
            raise GenerationError(f"--prompts {path}, line {number}: \"prompt\" must be non-empty text")
        if "messages" in value and not _is_chat(value["messages"]):
            raise GenerationError(f'--prompts {path}, line {number}: "messages" must be a non-empty list of '
                                  '{"role": ..., "content": ...} objects')
        records.append(value)
    if not records:
        raise GenerationError(f"--prompts {path}: no prompts in the file")
    return records


def _is_chat(messages) -> bool:
    return (isinstance(messages, list) and len(messages) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages))


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate, stream

    try:
        options = _options(args)
        records = read_prompt_file(args.prompts) if args.prompts is not None else None
        if args.prompt is not None and not args.prompt:
            raise GenerationError("--prompt is empty: give some text")
        if args.output is not None and args.prompts is None:
            raise GenerationError("--output is for --prompts FILE (a batch written as JSON lines); a single --prompt "
                                  "streams to stdout: redirect it (> file) to keep it")
        if args.output is not None and args.output.exists() and not args.overwrite:
            raise GenerationError(f"--output {args.output} already exists; choose another file, or pass --overwrite")
        model, tokenizer = load_for_generation(args.model, adapter=args.adapter, dtype=args.dtype,
                                               device=args.device, token=args.token, revision=args.revision)
        if records is None:
            prompt = [{"role": "user", "content": args.prompt}] if args.chat_template else args.prompt
            for event in stream(model, tokenizer, prompt, **options):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        prompts = [r["messages"] if "messages" in r else r["prompt"] for r in records]
        results = generate(model, tokenizer, prompts, batch_size=args.batch_size, **options)
        out = args.output.open("w", encoding="utf-8") if args.output is not None else sys.stdout
        try:
            for i, (record, result) in enumerate(zip(records, results)):
                line = {**record, "index": i, "completion": result.text, "finish_reason": result.finish_reason,
                        "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids)}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
        return 0
    except GenerationError as err:
        print(f"gyrfalcon generate: error: {err}", file=sys.stderr)
        return 2


def run_chat_command(args: argparse.Namespace, read=input) -> int:
    from .chat import ChatSession, run_chat

    try:
        options = _options(args)
        model, tokenizer = load_for_generation(args.model, adapter=args.adapter, dtype=args.dtype,
                                               device=args.device, token=args.token, revision=args.revision)
        session = ChatSession(model, tokenizer, system=args.system, **options)
        return run_chat(session, read=read)
    except GenerationError as err:
        print(f"gyrfalcon chat: error: {err}", file=sys.stderr)
        return 2
