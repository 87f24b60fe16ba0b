"""`gyrfalcon finetune` and `gyrfalcon merge`: every recipe key has a flag and a help line, recipes in configs/ load
and document every key, a short tiny run and a LoRA run on a checkpoint folder work end to end (merge included), a
QLoRA run's checkpoint adapter merges onto the dequantized 4-bit base (or, forced, the dense one), and bad input
exits with status 2 and a message naming the problem."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
import yaml

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.assets import TINY_CHAT_DATA, load_tiny_tokenizer
from gyrfalcon.finetune_cli import add_finetune_parsers
from gyrfalcon.recipes import CONFIG_DIR, TINY_RUN, FinetuneConfig, RecipeError, config_fields, load_recipe
from helpers import rel_err, tiny_config

FAST = ["--max-steps", "3", "--no-progress", "--no-plot", "--max-seq-length", "64", "--batch-size", "4"]


def parser():
    root = argparse.ArgumentParser(prog="gyrfalcon")
    add_finetune_parsers(root.add_subparsers(dest="command", required=True))
    return root


def run_cli(argv):
    args = parser().parse_args(argv)
    return args.run(args)


def help_text(command, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def test_help_lists_every_setting(capsys):
    text = help_text("finetune", capsys)
    for f in config_fields():
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        flat = " ".join(text.split())
        assert f"recipe key {f.name};" in flat or f"recipe key {f.name})" in flat, f.name
    assert "(default: the model's) (recipe key tokenizer)" in flat  # one default per setting, not two
    assert "(recipe key gradient_checkpointing; default: false)" in flat  # as a recipe writes it
    for flag in ("--config", "--print-config", "--resume", "--overwrite", "--no-packing"):
        assert flag in text
    merge = help_text("merge", capsys)
    for flag in ("--adapter", "--output", "--model", "--dtype", "--device", "--max-shard-size", "--overwrite",
                 "--base-4bit", "--no-base-4bit", "--token"):
        assert flag in merge


@pytest.mark.parametrize("recipe", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_load_and_document_every_key(recipe):
    config = load_recipe(recipe)
    lines = [line for line in recipe.read_text().splitlines() if line and not line.startswith("#")]
    keys = {line.split(":", 1)[0] for line in lines}
    assert keys == {f.name for f in config_fields()}, recipe
    assert all("  # " in line for line in lines), "every key has a comment"
    if recipe.stem != "tiny":
        assert config.model.startswith("tiiuae/Falcon-H1-") and config.method in ("lora", "qlora")


def test_recipe_set_covers_every_size_and_method():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    for size in ("0.5b", "1.5b-deep", "7b", "34b"):
        for method in ("lora", "qlora"):
            assert f"falcon-h1-{size}-{method}" in names


def test_layers_of_settings_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: some/model\nlearning_rate: 2e-4\nlora_targets: [q_proj, v_proj]\nbatch_size: 4\n")
    config = load_recipe(recipe, {"batch_size": 2, "lora_r": None})
    assert config.learning_rate == 2e-4 and config.batch_size == 2 and config.lora_targets == ["q_proj", "v_proj"]
    assert config.lora_r == 16 and config.method == "lora"  # defaults, not the tiny run's
    assert load_recipe(None, {}).method == TINY_RUN["method"]  # no model: the tiny run's defaults
    assert load_recipe(CONFIG_DIR / "tiny.yaml") == load_recipe(None, {})
    recipe.write_text("model: x/y\nlerning_rate: 1e-4\n")
    with pytest.raises(RecipeError, match="unknown key 'lerning_rate'; did you mean 'learning_rate'"):
        load_recipe(recipe)
    for bad, message in ((dict(lora_r=0), "lora_r must be at least 1"), (dict(method="dpo"), "method must be one"),
                         (dict(batch_size="four"), "batch_size must be a whole number"),
                         (dict(lora_targets=["qkv"]), r"unknown layer\(s\) \['qkv'\]"),
                         (dict(resume=True, overwrite=True), "choose one"),
                         (dict(learning_rate=-1.0), r"learning_rate must be positive \(got -1.0; recipe key "
                                                    r"learning_rate, flag --learning-rate\)")):
        with pytest.raises(RecipeError, match=message):
            FinetuneConfig(**bad)
    # the tiny run's evaluation split counts examples of its bundled data: the user's own data gets the default
    assert load_recipe(None, {"data": "mine.jsonl"}).eval_split == FinetuneConfig().eval_split != TINY_RUN["eval_split"]
    with pytest.raises(RecipeError, match="no such recipe file; recipes in .*falcon-h1-0.5b-lora"):
        load_recipe("no-such-recipe")


def test_print_config_round_trips(capsys, tmp_path):
    assert run_cli(["finetune", "--config", "falcon-h1-7b-lora", "--lora-r", "8", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(text)
    printed = load_recipe(tmp_path / "printed.yaml")
    assert printed == load_recipe("falcon-h1-7b-lora", {"lora_r": 8})
    assert yaml.safe_load(text)["lora_r"] == 8


def test_tiny_run_end_to_end(capsys, tmp_path):
    out = tmp_path / "tiny"
    assert run_cli(["finetune", "--output", str(out), *FAST, "--eval-split", "8", "--save-every", "2"]) == 0
    text = capsys.readouterr().out
    assert "step 3/3" in text and "the fine-tuned tiny model answers" in text
    assert (out / "model" / "model.safetensors").exists() and (out / "metrics.jsonl").exists()
    assert json.loads((out / "run.json").read_text())["config"]["method"] == "full"
    # the same command again: the folder is protected
    assert run_cli(["finetune", "--output", str(out), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err


def base_and_data(tmp_path):
    """A tiny checkpoint folder with the tiny tokenizer, and 40 rows of the bundled chat data."""
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu", seed=0)
    model.save_pretrained(tmp_path / "base")
    load_tiny_tokenizer().save_pretrained(str(tmp_path / "base"))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(TINY_CHAT_DATA.read_text().splitlines(keepends=True)[:40]))
    return tmp_path / "base", data


def test_lora_run_on_a_checkpoint_then_merge(capsys, tmp_path):
    _, data = base_and_data(tmp_path)
    run = tmp_path / "run"
    argv = ["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--output", str(run),
            "--lora-r", "4", "--lora-targets", "q_proj", "out_proj", "--learning-rate", "1e-2", *FAST]
    assert run_cli(argv) == 0
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert config["target_modules"] == ["out_proj", "q_proj"] and (adapter / "tokenizer.json").exists()
    assert "gyrfalcon merge --adapter" in capsys.readouterr().out

    assert run_cli(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    from gyrfalcon.peft_io import load_adapter
    with_adapter = load_adapter(FalconH1ForCausalLM.from_pretrained(tmp_path / "base", device="cpu"), adapter)
    merged = FalconH1ForCausalLM.from_pretrained(tmp_path / "merged", device="cpu")
    assert merged.dtype == torch.float32 and (tmp_path / "merged" / "tokenizer.json").exists()
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(merged(ids).logits, with_adapter(ids).logits) <= 1e-5
    assert run_cli(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 2
    assert "already exists" in capsys.readouterr().err

    # continue training that adapter in a new run
    assert run_cli([*argv[:6], str(tmp_path / "run2"), "--adapter", str(adapter), *FAST]) == 0
    assert "loaded to continue training" in capsys.readouterr().out


def test_qlora_checkpoint_adapter_merges_onto_the_4bit_base(capsys, tmp_path):
    """A QLoRA run's checkpoints/step-N/adapter records its 4-bit base: merge folds it into the dequantized 4-bit
    weights and says so (the QLoRA model's logits, to the fp32 rounding tests/test_quant.py's QLoRA merge allows);
    --no-base-4bit forces the dense base (the adapter on the 16-bit weights), saying that too."""
    pytest.importorskip("bitsandbytes")
    from gyrfalcon.peft_io import load_adapter
    from gyrfalcon.quant import load_4bit

    base, data = base_and_data(tmp_path)
    run = tmp_path / "run"
    assert run_cli(["finetune", "--model", str(base), "--data", str(data), "--output", str(run), "--method", "qlora",
                    "--device", "cpu", "--lora-r", "4", "--lora-targets", "q_proj", "in_proj", "out_proj",
                    "--learning-rate", "1e-2", "--save-every", "2", *FAST]) == 0
    adapter = run / "checkpoints" / "step-00000002" / "adapter"
    assert json.loads((adapter / "gyrfalcon_training.json").read_text())["method"] == "qlora"
    capsys.readouterr()
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))

    def merged_logits(name, *flags):
        assert run_cli(["merge", "--adapter", str(adapter), "--output", str(tmp_path / name), *flags]) == 0
        with torch.no_grad():
            logits = FalconH1ForCausalLM.from_pretrained(tmp_path / name, device="cpu")(ids).logits
        return logits, " ".join(capsys.readouterr().out.split())

    with torch.no_grad():
        qlora = load_adapter(load_4bit(base, device="cpu", compute_dtype=torch.float32), adapter)(ids).logits
        dense = load_adapter(FalconH1ForCausalLM.from_pretrained(base, device="cpu"), adapter)(ids).logits
    logits, said = merged_logits("merged")
    assert rel_err(logits, qlora) <= 1e-5 and rel_err(dense, qlora) > 1e-2
    assert "merged onto the dequantized 4-bit (NF4) base weights (its gyrfalcon_training.json records a 4-bit" in said
    logits, said = merged_logits("merged-dense", "--no-base-4bit")
    assert rel_err(logits, dense) <= 1e-5
    assert ("merged onto the dense (unquantized) base weights (as asked: --no-base-4bit, although its "
            "gyrfalcon_training.json records a 4-bit (QLoRA) base)") in said


def test_bad_input_exits_2_with_a_named_problem(capsys, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": "oops"}\n')
    assert run_cli(["finetune", "--data", str(bad), "--output", str(tmp_path / "o"), *FAST]) == 2
    assert "row 2: 'messages' must be a non-empty list" in capsys.readouterr().err
    assert run_cli(["finetune", "--model", str(tmp_path), "--output", str(tmp_path / "o2"), *FAST]) == 2
    assert "no training data" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
        assert run_cli(["finetune", "--method", "qlora", "--output", str(tmp_path / "o3"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "QLoRA (load_in_4bit / method: qlora) needs bitsandbytes" in err
    assert run_cli(["finetune", "--output", str(tmp_path / "o4"), "--resume", *FAST]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # a missing data file is named before any model is loaded
    assert run_cli(["finetune", "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o5"), *FAST]) == 2
    out, err = capsys.readouterr()
    assert "nope.jsonl: no such file" in err and "model:" not in out and not (tmp_path / "o5").exists()
    # a mistyped model is named as such (not as a tokenizer that cannot load), before the data is read
    assert run_cli(["finetune", "--model", str(tmp_path / "no-model"), "--data", str(bad), "--output",
                    str(tmp_path / "o6"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no-model: no such folder" in err and "tokenizer" not in err


@pytest.mark.slow
def test_the_default_tiny_run_learns(tmp_path, capsys):
    """`gyrfalcon finetune` with no arguments (the README's main job): the loss falls from ln(512) to a fraction."""
    from gyrfalcon.finetune_cli import tiny_finetune

    assert tiny_finetune(output=str(tmp_path / "tiny")) == 0
    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert losses[0] > 6.0 and losses[-1] < 0.6 and evals[0] > 6.0 and evals[-1] < 0.6, (losses[-1], evals)
    assert (tmp_path / "tiny" / "loss.png").exists()
    assert "the fine-tuned tiny model answers" in capsys.readouterr().out


def test_recipe_names_without_the_configs_folder_say_what_to_do(monkeypatch):
    """An installation without the repository's configs/ (a wheel): a recipe name explains itself."""
    import gyrfalcon.recipes as recipes

    monkeypatch.setattr(recipes, "CONFIG_DIR", CONFIG_DIR / "no-such-folder")
    with pytest.raises(RecipeError, match="this installation does not have: pass the path of a recipe file"):
        recipes.find_recipe("falcon-h1-0.5b-lora")
