"""The command line: help text, `info` on presets and folders (tables and JSON), `demo`, and error exits."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.cli import main
from gyrfalcon.info import memory_estimates, parameter_counts
from helpers import tiny_config


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "gyrfalcon.cli", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout and "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "gyrfalcon.cli", "info", "--help"], capture_output=True, text=True,
                         check=True)
    assert "preset" in out.stdout and "--json" in out.stdout


def test_info_json_counts_match_the_model(capsys, tmp_path):
    config = tiny_config()
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu")
    model.save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_parameters"] == model.num_parameters() == sum(parameter_counts(config).values())
    assert report["config"]["layers"] == 2


def test_info_table_for_a_preset(capsys):
    assert main(["info", "7B"]) == 0
    out = capsys.readouterr().out
    assert "mamba.in_proj" in out and "GiB" in out


def test_memory_estimates_7b():
    est = memory_estimates(tiny_config().from_preset("7B"))
    total = sum(parameter_counts(tiny_config().from_preset("7B")).values())
    assert abs(est["bf16_gib"] - total * 2 / 1024**3) < 1e-9
    assert 0.25 < est["nf4_gib"] / est["bf16_gib"] < 0.4  # most weights are layer linears


def test_info_errors_exit_2(capsys):
    assert main(["info", "no-such-thing"]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_python_dash_m_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "gyrfalcon", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("gyrfalcon ")


def test_demo_bad_flags_exit_2(capsys):
    assert main(["demo", "--batch", "0", "--no-finetune"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--overwrite", "--no-finetune"]) == 2
    assert "--overwrite and --resume apply to the fine-tune's --output" in capsys.readouterr().err


def test_demo_runs(capsys):
    assert main(["demo", "--batch", "2", "--seq-len", "24", "--no-finetune"]) == 0
    out = capsys.readouterr().out
    assert "saved and reloaded" in out and "left padding" in out
