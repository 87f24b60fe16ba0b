"""Chat sessions (history, reset, context trimming, the interactive loop) and the `generate` / `chat` commands on the
built-in tiny model: streaming to stdout, JSON lines in and out, adapters, and clear errors for bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gyrfalcon.assets import load_tiny_tokenizer
from gyrfalcon.chat import ChatSession, run_chat
from gyrfalcon.generate import generate
from gyrfalcon.generate_cli import add_generate_parsers, load_for_generation
from gyrfalcon.sampling import GenerationError


@pytest.fixture(scope="module")
def tiny():
    return load_for_generation(None)


def parse(argv):
    parser = argparse.ArgumentParser(prog="gyrfalcon")
    add_generate_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- sessions
def test_session_history_follows_the_template(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=8, seed=0)
    first = session.reply("Hello")
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    assert session.history[-1]["content"] == first
    # the reply equals a one-off generation on the rendered conversation
    expected = generate(model, tokenizer, [session.history[:2]], max_new_tokens=8, seed=0)[0].text
    assert first == expected
    session.reply("And then?")
    assert len(session.history) == 5
    session.reset()
    assert session.history == [{"role": "system", "content": "Be brief."}]


def test_session_drops_the_oldest_exchanges_when_the_context_fills():
    model, tokenizer = load_for_generation(None)
    model.config.max_position_embeddings = 96
    session = ChatSession(model, tokenizer, max_new_tokens=8)
    for i in range(6):
        session.reply(f"message number {i} with a few words")
    assert session.trimmed > 0
    assert session.history[-2]["content"] == "message number 5 with a few words"
    assert "message number 0" not in json.dumps(session.history)


def test_session_needs_a_chat_template(tiny):
    model, tokenizer = tiny
    plain = load_tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(GenerationError, match="no chat template"):
        ChatSession(model, plain)
    with pytest.raises(GenerationError, match="non-empty"):
        ChatSession(model, tokenizer).reply("   ")


def test_interactive_loop_commands(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_new_tokens=5)
    lines = iter(["hi", "", "/reset", "/nonsense", "hi again", "/exit", "never read"])
    out = []
    assert run_chat(session, read=lambda prompt: next(lines), write=out.append) == 0
    text = "".join(out)
    assert "conversation cleared" in text and "commands:" in text and text.count("model> ") == 2
    assert [m["role"] for m in session.history] == ["user", "assistant"]   # only the turn after /reset

    def end_of_input(prompt):
        raise EOFError

    assert run_chat(session, read=end_of_input, write=out.append) == 0


# ---------------------------------------------------------------------------------------------- commands
def test_generate_command_streams_one_prompt(capsys, tiny):
    model, tokenizer = tiny
    args = parse(["generate", "--prompt", "hello", "--max-new-tokens", "12"])
    assert args.run(args) == 0
    expected = generate(model, tokenizer, "hello", max_new_tokens=12).text
    assert capsys.readouterr().out == expected + "\n"


def test_generate_command_chat_template(capsys, tiny):
    model, tokenizer = tiny
    args = parse(["generate", "--prompt", "Count to seven.", "--chat-template", "--max-new-tokens", "6"])
    assert args.run(args) == 0
    expected = generate(model, tokenizer, [[{"role": "user", "content": "Count to seven."}]],
                            max_new_tokens=6)[0].text
    assert capsys.readouterr().out == expected + "\n"


def test_generate_command_json_lines(tmp_path, tiny):
    model, tokenizer = tiny
    source = tmp_path / "in.jsonl"
    source.write_text('"plain text"\n\n{"prompt": "hi there", "id": "a"}\n'
                      '{"messages": [{"role": "user", "content": "Spell apple."}]}\n')
    target = tmp_path / "out.jsonl"
    args = parse(["generate", "--prompts", str(source), "--output", str(target), "--max-new-tokens", "7",
                  "--batch-size", "2", "--temperature", "0.8", "--seed", "3"])
    assert args.run(args) == 0
    lines = [json.loads(x) for x in target.read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2] and lines[1]["id"] == "a" and "messages" in lines[2]
    expected = generate(model, tokenizer, ["plain text", "hi there",
                                               [{"role": "user", "content": "Spell apple."}]],
                            max_new_tokens=7, temperature=0.8, seed=3, batch_size=2)
    for line, c in zip(lines, expected):
        assert (line["completion"], line["finish_reason"], line["completion_tokens"], line["prompt_tokens"]) == \
            (c.text, c.finish_reason, len(c.token_ids), c.prompt_tokens)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', "line 2: not valid JSON"),
    ('{"prompt": ""}\n', 'line 1: "prompt" must be non-empty'),
    ('{"text": "x"}\n', "line 1: expected a string"),
    ('{"messages": [{"role": "user"}]}\n', 'line 1: "messages" must be'),
    ("\n\n", "no prompts"),
])
def test_generate_command_bad_files(tmp_path, capsys, content, message):
    source = tmp_path / "in.jsonl"
    source.write_text(content)
    args = parse(["generate", "--prompts", str(source)])
    assert args.run(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must lie in"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--stop", ""], "--stop must not be empty"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--output", "out.jsonl"], "--output is for --prompts"),
])
def test_generate_command_bad_flags(capsys, flags, message):
    """Each fails before any model is loaded, with exit 2 and a message naming the flag."""
    args = parse(["generate", "--prompt", "hi", *flags])
    assert args.run(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is visible")
def test_generate_command_cuda_without_a_gpu(capsys):
    args = parse(["generate", "--prompt", "hi", "--device", "cuda"])
    assert args.run(args) == 2 and "no CUDA GPU is visible" in capsys.readouterr().err


def test_generate_command_keeps_an_existing_output(tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('"hi"\n')
    target.write_text("mine\n")
    args = parse(["generate", "--prompts", str(source), "--output", str(target), "--max-new-tokens", "2"])
    assert args.run(args) == 2 and "already exists" in capsys.readouterr().err
    assert target.read_text() == "mine\n"
    args = parse(["generate", "--prompts", str(source), "--output", str(target), "--max-new-tokens", "2",
                  "--overwrite"])
    assert args.run(args) == 0 and json.loads(target.read_text())["index"] == 0


def test_generate_command_missing_file(tmp_path, capsys):
    args = parse(["generate", "--prompts", str(tmp_path / "nope.jsonl")])
    assert args.run(args) == 2 and "cannot read it" in capsys.readouterr().err


def test_chat_command(capsys):
    args = parse(["chat", "--max-new-tokens", "4", "--system", "Be brief.", "--seed", "1"])
    lines = iter(["hello", "/exit"])
    assert args.run(args, read=lambda prompt: next(lines)) == 0
    assert capsys.readouterr().out.count("model> ") == 1
    bad = parse(["chat", "--min-p", "2"])
    assert bad.run(bad) == 2 and "min_p" in capsys.readouterr().err


def test_adapter_is_applied(tmp_path, capsys):
    from gyrfalcon.lora import apply_lora, lora_layers
    from gyrfalcon.peft_io import save_adapter

    model, tokenizer = load_for_generation(None)
    apply_lora(model, r=4, alpha=8.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path / "adapter")
    expected = generate(model, tokenizer, "hello", max_new_tokens=10).text
    base = generate(load_for_generation(None)[0], tokenizer, "hello", max_new_tokens=10).text
    assert expected != base
    args = parse(["generate", "--prompt", "hello", "--max-new-tokens", "10", "--adapter", str(tmp_path / "adapter")])
    assert args.run(args) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_adapter_folder_finds_its_base_and_tokenizer(tmp_path, capsys):
    """A run's adapter (its base a folder of weights without tokenizer files, the tokenizer in the adapter folder)
    works as --adapter alone, as --model alone, and with --model BASE."""
    from gyrfalcon.lora import apply_lora, lora_layers
    from gyrfalcon.peft_io import save_adapter

    model, tokenizer = load_for_generation(None)
    model.save_pretrained(tmp_path / "base")                    # weights only, as a run's base/ once was
    apply_lora(model, r=4, alpha=8.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(tmp_path / "base"), tokenizer=tokenizer)
    expected = generate(model, tokenizer, "hello", max_new_tokens=8).text
    for flags in (["--adapter", str(adapter)], ["--model", str(adapter)],
                  ["--model", str(tmp_path / "base"), "--adapter", str(adapter)]):
        args = parse(["generate", "--prompt", "hello", "--max-new-tokens", "8", "--device", "cpu",
                      "--dtype", "float32", *flags])
        assert args.run(args) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == expected + "\n"
    args = parse(["generate", "--prompt", "hello", "--model", str(adapter), "--adapter", str(adapter)])
    assert args.run(args) == 2 and "is a LoRA adapter folder" in capsys.readouterr().err
