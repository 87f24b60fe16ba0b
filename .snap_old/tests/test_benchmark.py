"""The benchmark harness's CPU side: FLOP and byte counts, the record schema, the ratio table, plots, the docs
section, plans, the worker's command line, the runner's process handling, and tiny-shape smoke runs."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.benchmark import flops, plan, report, runner, worker
from gyrfalcon.benchmark.records import (HEADLINE, SCHEMA, collect_env, make_record, read_jsonl, validate_record,
                                         write_jsonl)
from gyrfalcon.benchmark.suites import Context, decode_step_seconds, maxlen_result, run_workload
from gyrfalcon.benchmark.systems import GyrfalconSystem, HFSystem, Unavailable, transformers_mamba_backends

ENV = {"device": "NVIDIA H100 80GB HBM3 (79 GiB)", "torch": "2.11.0+cu130", "triton": "3.6.0",
       "transformers": "5.17.0", "peft": "0.17.0", "mamba_ssm": None, "commit": "abc123"}
SETTINGS = plan.Settings().to_dict()


def tiny() -> FalconH1Config:
    return FalconH1Config.from_preset("tiny")


# ---------------------------------------------------------------------------------------------- FLOPs, bytes
def test_flops_of_the_tiny_config_by_hand():
    # tiny: vocab 512, hidden 64, 2 layers, 4 heads x 16 (2 KV heads), MLP 128; Mamba d_ssm 64 = 4 heads x 16,
    # state 16, 1 group, chunk 16, conv_dim 64 + 2*16 = 96, in_proj 64 + 96 + 4 = 164.
    cfg = tiny()
    linears = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64) + (64 * 164 + 64 * 64) + 3 * 64 * 128
    assert linears == 51456 == flops.layer_linear_weights(cfg)
    # per token at l = 64: matmuls 2 * 2 layers * 51456; lm_head 2 * 64 * 512; attention 2 layers * 2*64*16*4;
    # SSD per layer (q = 16): g q n 256 + h q p 1024 + 4 h p n 4096 + 2 h p n / q 128 = 5504, two layers.
    assert flops.attention_flops_per_token(cfg, 64) == 16384
    assert flops.ssd_flops_per_token(cfg, 64) == 11008
    per_token = 205824 + 65536 + 16384 + 11008
    assert flops.forward_flops(cfg, 2, 64) == 128 * per_token == 38_240_256
    assert flops.train_flops(cfg, 2, 64) == 3 * 38_240_256
    # prefill with logits of the last position only: the lm_head runs once per sequence
    assert flops.forward_flops(cfg, 2, 64, logits="last") == 128 * (per_token - 65536) + 2 * 65536
    # shorter than a chunk: the in-chunk terms use the sequence length (q = 8)
    assert flops.ssd_flops_per_token(cfg, 8) == 2 * (8 * 16 + 4 * 8 * 16 + 4 * 4 * 16 * 16 + 2 * 4 * 16 * 16 / 8)
    with pytest.raises(ValueError):
        flops.forward_flops(cfg, 1, 8, logits="some")


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True, "mamba_proj_bias": True,
                                            "projectors_bias": True, "tie_word_embeddings": True,
                                            "mamba_conv_bias": False, "mamba_rms_norm": False}])
@pytest.mark.parametrize("preset", ["tiny", "0.5B", "7B", "34B"])
def test_counts_match_the_module_tree(preset, overrides):
    cfg = FalconH1Config.from_preset(preset, **overrides)
    with torch.device("meta"):
        model = FalconH1ForCausalLM(cfg)
    assert flops.parameter_count(cfg) == model.num_parameters()
    layer_linears = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert flops.layer_linear_weights(cfg) == layer_linears


def test_training_flops_of_7b_are_about_six_per_weight():
    cfg = FalconH1Config.from_preset("7B")
    per_token = flops.train_flops(cfg, 1, 2048) / 2048
    weights = cfg.num_hidden_layers * flops.layer_linear_weights(cfg) + cfg.hidden_size * cfg.vocab_size
    assert 6 * weights < per_token < 1.15 * 6 * weights   # attention + SSD add a few percent at 2048


def test_decode_bytes_of_the_tiny_config_by_hand():
    cfg = tiny()
    # 32768 embedding + 2 x (51456 linears + 96*4 + 96 conv + 12 per-head + 64+64+64 norms) + 64 + 32768 lm_head
    assert flops.parameter_count(cfg) == 169_880
    parts = flops.decode_bytes_per_step(cfg, 2, 20)
    assert parts["weights"] == (169_880 - 32768) * 2 + 2 * 64 * 2          # embedding: 2 gathered rows only
    assert parts["kv_cache"] == 2 * 2 * 2 * 16 * 21 * 2 * 2                   # layers, K+V, kv heads, d, t+1, b, bytes
    assert parts["ssm_state"] == 2 * 2 * 2 * 4 * 16 * 16 * 4                  # layers, read+write, b, h p n, fp32
    assert parts["conv_state"] == 2 * 2 * 2 * 96 * 3 * 2                     # layers, read+write, b, conv_dim, k-1
    assert parts["total"] == 274_480 + 10_752 + 32_768 + 4_608
    tied = flops.decode_bytes_per_step(FalconH1Config.from_preset("tiny", tie_word_embeddings=True), 2, 20)
    assert tied["weights"] == (169_880 - 32768) * 2 + 2 * 64 * 2             # the lm_head reads the tied table
    assert flops.mean_decode_context(512, 128) == 576


def test_decode_step_seconds():
    assert decode_step_seconds([0.10, 0.12, 0.11], [1.38], 128) == pytest.approx((1.38 - 0.11) / 127)
    with pytest.raises(RuntimeError, match="not slower"):
        decode_step_seconds([0.5], [0.4], 8)
    with pytest.raises(ValueError):
        decode_step_seconds([0.1], [0.2], 1)


# ---------------------------------------------------------------------------------------------- records
def rec(system, suite, shape, workload, metric, value, status="ok", reason=None, env=ENV, **extra):
    return make_record(system=system, suite=suite, shape=shape, workload=workload, metric=metric, value=value,
                       status=status, reason=reason, settings=SETTINGS, env=env, run_id="r1", extra=extra)


def test_record_schema():
    r = rec("gyrfalcon", "train", "7B", {"batch": 1, "seqlen": 2048}, "tokens_per_s", 1234.5)
    assert r["schema"] == SCHEMA and r["unit"] == "tok/s" and r["better"] == "higher" and r["reason"] is None
    assert json.loads(json.dumps(r)) == r
    failed = rec("hf-torch", "train", "7B", {"batch": 1, "seqlen": 2048}, "peak_gib", None, "oom", "CUDA OOM")
    assert failed["unit"] == "GiB" and failed["better"] == "lower"
    bad = [({"value": None}, "finite number"), ({"value": float("nan")}, "finite number"),
           ({"status": "oom"}, "value null"), ({"status": "failed", "value": None}, "needs a reason"),
           ({"system": "vllm"}, "system"), ({"metric": "speed"}, "metric"), ({"unit": "s"}, "unit/better"),
           ({"env": {"device": "x"}}, "env lacks"), ({"schema": "other/1"}, "schema")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_record({**r, **change})
    with pytest.raises(ValueError, match="missing 'env'"):
        validate_record({k: v for k, v in r.items() if k != "env"})


def test_jsonl_round_trip_and_stray_lines(tmp_path):
    a = rec("gyrfalcon", "prefill", "0.5B", {"batch": 16, "seqlen": 512}, "tokens_per_s", 9.0e4)
    b = rec("hf-kernels", "maxlen", "0.5B", {"batch": 1}, "max_seqlen", None, "unavailable", "no mamba_ssm")
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [a])
    write_jsonl(path, [b])                       # appends
    with path.open("a") as f:
        f.write("Triton autotuning for function ...\n\n")
    assert read_jsonl([path], strict=False) == [a, b]
    with pytest.raises(ValueError, match="r.jsonl:3"):
        read_jsonl([path])


def test_collect_env_on_cpu():
    env = collect_env("cpu", commit=None)
    assert env["device"].startswith("cpu") and env["torch"] == torch.__version__ and env["commit"] == "unknown"
    assert {"triton", "transformers", "peft", "mamba_ssm"} <= set(env)


# ---------------------------------------------------------------------------------------------- table, docs
def synthetic_records() -> list[dict]:
    t05, t7 = {"batch": 4, "seqlen": 2048}, {"batch": 1, "seqlen": 2048}
    d1 = {"batch": 1, "prompt": 512, "new_tokens": 128}
    kern = {"op": "ssd_scan", "pass": "fwd+bwd", "batch": 4, "seqlen": 2048}
    kenv = {**ENV, "mamba_ssm": "2.3.2.post1"}
    return [
        rec("gyrfalcon", "train", "0.5B", t05, "tokens_per_s", 20000.0),
        rec("gyrfalcon", "train", "0.5B", t05, "flops_share", 0.31),
        rec("gyrfalcon", "train", "0.5B", t05, "peak_gib", 4.0),
        rec("hf-kernels", "train", "0.5B", t05, "tokens_per_s", 7922.0, env=kenv),
        rec("hf-kernels", "train", "0.5B", t05, "flops_share", 0.123, env=kenv),
        rec("hf-kernels", "train", "0.5B", t05, "peak_gib", 4.78, env=kenv),
        rec("hf-torch", "train", "0.5B", t05, "tokens_per_s", None, "oom", "CUDA out of memory. Tried ..."),
        rec("hf-torch", "train", "0.5B", t05, "peak_gib", None, "oom", "CUDA out of memory. Tried ..."),
        rec("gyrfalcon", "train", "7B", t7, "tokens_per_s", 2000.0),
        rec("hf-torch", "train", "7B", t7, "tokens_per_s", 264.0),
        rec("gyrfalcon", "decode", "0.5B", d1, "tokens_per_s", None, "unsupported", "gyrfalcon.generate missing"),
        rec("hf-kernels", "decode", "0.5B", d1, "tokens_per_s", 10.9, env=kenv),
        rec("hf-kernels", "decode", "0.5B", d1, "bandwidth_share", 0.0033, env=kenv),
        rec("hf-torch", "decode", "0.5B", d1, "tokens_per_s", 12.1),
        rec("gyrfalcon", "kernels", "0.5B", kern, "ms", 2.0),
        rec("hf-kernels", "kernels", "0.5B", kern, "ms", 3.0, env=kenv),
        rec("hf-torch", "kernels", "0.5B", kern, "ms", None, "failed", "RuntimeError: boom | with a pipe"),
        rec("gyrfalcon", "maxlen", "7B", {"batch": 1}, "max_seqlen", 65536.0),
        rec("hf-kernels", "maxlen", "7B", {"batch": 1}, "max_seqlen", 32768.0, env=kenv),
    ]


def test_ratio_table_with_failed_and_unsupported_cells(tmp_path):
    path = tmp_path / "results.jsonl"
    write_jsonl(path, synthetic_records())
    table = report.markdown_table(read_jsonl([path]))
    lines = table.splitlines()
    assert lines[0] == ("| suite | shape | workload | metric | gyrfalcon | hf-kernels | hf-torch | "
                        "gyrfalcon / best baseline |")
    row = lambda *parts: next(line for line in lines if all(p in line for p in parts))  # noqa: E731
    assert row("train | 0.5B | b4 x 2048 | tok/s") == \
        "| train | 0.5B | b4 x 2048 | tok/s | 20,000 (31.0%) | 7,922 (12.3%) | OOM | 2.52x |"
    assert row("train | 0.5B", "peak GiB").endswith("| 4.00 | 4.78 | OOM | 0.84x (lower is better) |")
    assert row("train | 7B").endswith("| 2,000 | — | 264 | 7.58x |")             # a missing system is a dash
    decode = row("decode | 0.5B | b1, 512 + 128 new | tok/s")
    assert "| unsupported [1] | 10.9 (0.3%) | 12.1 | — |" in decode              # no ratio without gyrfalcon
    assert row("kernels", "ssd_scan fwd+bwd b4 x 2048").endswith(
        "| 2.00 | 3.00 | failed [2] | 0.67x (lower is better) |")
    assert row("maxlen | 7B | b1 | tokens").endswith("| 65,536 | 32,768 | — | 2.00x |")
    assert "[1] gyrfalcon: gyrfalcon.generate missing" in table
    assert "[2] hf-torch: RuntimeError: boom / with a pipe" in table             # a | would break the table
    # suite order, then shape order: train 0.5B, train 7B, decode, kernels, maxlen
    order = [line.split(" | ")[0] + line.split(" | ")[1] for line in lines[2:] if line.startswith("| ")]
    assert order == ["| train0.5B", "| train0.5B", "| train7B", "| decode0.5B", "| kernels0.5B", "| maxlen7B"]
    one_suite = report.markdown_table(read_jsonl([path]), ("maxlen",))
    assert one_suite.splitlines()[0].startswith("| shape | workload")
    assert report.markdown_table([], ("train",)) == "_No measurements._\n"


def test_latest_record_wins_but_skipped_hides_nothing():
    w = {"batch": 1, "seqlen": 2048}
    old = rec("hf-torch", "train", "7B", w, "tokens_per_s", 250.0)
    new = rec("hf-torch", "train", "7B", w, "tokens_per_s", 264.0)
    skipped = rec("hf-torch", "train", "7B", w, "tokens_per_s", None, "skipped", "time limit")
    failed = rec("hf-torch", "train", "7B", w, "tokens_per_s", None, "failed", "boom")
    key = ("hf-torch", "train", "7B", json.dumps(w, sort_keys=True), "tokens_per_s")
    assert report.latest([old, new])[key]["value"] == 264.0
    assert report.latest([new, skipped])[key]["value"] == 264.0
    assert report.latest([new, failed])[key]["status"] == "failed"
    assert report.latest([skipped])[key]["status"] == "skipped"


def test_docs_section_is_regenerated_between_the_markers(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text(f"# Benchmarks\n\nintro\n\n{report.BEGIN}\nold figures\n{report.END}\n\n## How to reproduce\n")
    plot = tmp_path / "docs" / "plots" / "train_0.5B.png"
    report.update_docs(doc, synthetic_records(), plots=[plot], sources=["bench/results/x.jsonl"])
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n" + report.BEGIN)
    assert text.endswith(report.END + "\n\n## How to reproduce\n")
    assert "old figures" not in text
    assert "NVIDIA H100 80GB HBM3 (79 GiB), " in text and "commit `abc123`" in text and "transformers 5.17.0" in text
    assert "mamba_ssm 2.3.2.post1 (hf-kernels)" in text and "LoRA r=16 alpha=32" in text
    assert "### Training" in text and "![train 0.5B](plots/train_0.5B.png)" in text
    assert text.index("### Training") < text.index("### Decoding") < text.index("### Kernels")
    report.update_docs(doc, synthetic_records(), plots=[], sources=[])       # idempotent: markers survive
    assert text.count(report.BEGIN) == 1
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_docs(doc, [], plots=[], sources=[])


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from gyrfalcon.benchmark.plots import make_plots
    records = []
    for system, speed in (("gyrfalcon", 3.0), ("hf-kernels", 2.0)):
        for seqlen in (1024, 2048, 4096):
            w = {"batch": 1, "seqlen": seqlen}
            records += [rec(system, "train", "0.5B", w, "tokens_per_s", speed * 1000 + seqlen / 10),
                        rec(system, "train", "0.5B", w, "peak_gib", seqlen / 1000 / speed)]
        for batch in (1, 4, 16):
            records.append(rec(system, "decode", "0.5B", {"batch": batch, "prompt": 512, "new_tokens": 128},
                               "tokens_per_s", speed * batch * 10))
    records.append(rec("hf-torch", "train", "0.5B", {"batch": 1, "seqlen": 1024}, "tokens_per_s", None, "oom", "x"))
    # a shape whose every run failed or was skipped has no plot (its failures stay in the tables)
    records.append(rec("hf-torch", "decode", "7B", {"batch": 1, "prompt": 512, "new_tokens": 128}, "tokens_per_s",
                       None, "skipped", "time limit"))
    written = make_plots(records, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["decode_0.5B.png", "train_0.5B.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- plans, CLI
def test_default_plan_is_the_baseline_anchors():
    headline = plan.plan_workloads("default")
    assert [w.label() for w in headline] == ["train 0.5B b4 x 2048", "prefill 0.5B b16 x 512", "train 7B b1 x 2048",
                                             "prefill 7B b1 x 512"]
    wl = plan.plan_workloads("extra")
    labels = [w.label() for w in wl if w.suite != "kernels"]
    assert labels == ["decode 0.5B b1, 512 + 128 new", "decode 0.5B b16, 512 + 128 new", "decode 7B b1, 512 + 128 new"]
    kernels = [w for w in wl if w.suite == "kernels"]
    assert len(kernels) == 2 * len(plan.KERNEL_OPS)
    assert {"op": "ssd_scan", "pass": "fwd+bwd", "batch": 4, "seqlen": 2048} in [w.params for w in kernels]
    assert not [w for w in wl if w.suite == "maxlen"]
    s = plan.Settings()
    assert (s.lora_r, s.lora_alpha, s.dtype, s.gradient_checkpointing) == (16, 32, "bfloat16", True)
    assert s.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj")
    assert plan.Settings.from_dict(s.to_dict()) == s
    everything = plan.plan_workloads("all", shapes=("7B",))
    assert len({w.key for w in everything}) == len(everything)          # the sweep's repeats of default points
    assert [w.params for w in everything if w.suite == "maxlen"] == [{"batch": 1}]
    assert [w.suite for w in plan.plan_workloads("sweep", shapes=("tiny",), suites=("decode",))] == ["decode"] * 2
    with pytest.raises(ValueError, match="unknown plan"):
        plan.plan_workloads("nightly")
    with pytest.raises(ValueError, match="no workloads for shape"):
        plan.plan_workloads("default", shapes=("3B",))
    with pytest.raises(ValueError, match="unknown repeats key"):
        s.with_counts(repeats={"speed": 3})
    assert s.with_counts(repeats={"decode": 3}).repeats["decode"] == 3 and s.repeats["decode"] == 1


def test_worker_arguments(tmp_path):
    args = worker.parse_args(["--system", "hf-torch", "--shape", "tiny", "--suites", "train,prefill",
                              "--device", "cpu", "--dtype", "float32"])
    assert (args.system, args.shape, args.suites, args.device, args.spec, args.records) == \
        ("hf-torch", "tiny", ("train", "prefill"), "cpu", None, None)
    settings, workloads, run_id, commit = worker.load_job(args)
    assert settings.dtype == "float32" and [w.suite for w in workloads] == ["train", "prefill"]
    assert run_id and commit is None
    for bad in (["--system", "vllm", "--shape", "tiny"], ["--shape", "tiny"],
                ["--system", "gyrfalcon", "--shape", "tiny", "--suites", "train,fly"],
                ["--system", "gyrfalcon", "--shape", "tiny", "--spec", "s.json", "--suites", "train"]):
        with pytest.raises(SystemExit):
            worker.parse_args(bad)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"settings": plan.Settings(lora_r=8).to_dict(), "run_id": "R", "commit": "C",
                                "workloads": [plan.Workload("train", "tiny", {"batch": 1, "seqlen": 32}).to_dict()]}))
    settings, workloads, run_id, commit = worker.load_job(worker.parse_args(
        ["--system", "gyrfalcon", "--shape", "tiny", "--spec", str(spec)]))
    assert (settings.lora_r, run_id, commit, workloads[0].params) == (8, "R", "C", {"batch": 1, "seqlen": 32})
    with pytest.raises(ValueError, match="another shape"):
        worker.load_job(worker.parse_args(["--system", "gyrfalcon", "--shape", "7B", "--spec", str(spec)]))


def test_bench_cli_table_and_errors(tmp_path, capsys):
    from gyrfalcon.benchmark.cli import main
    path = tmp_path / "r.jsonl"
    write_jsonl(path, synthetic_records())
    assert main(["table", str(path), "--suites", "train"]) == 0
    out = capsys.readouterr().out
    assert "| 0.5B | b4 x 2048 | tok/s |" in out and "decode" not in out and "(train, prefill)" in out
    assert main(["report", str(path), "--no-plots", "--doc", str(tmp_path / "missing.md")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--systems", "gyrfalcon,vllm"])
    with pytest.raises(SystemExit):
        main(["run", "--repeats", "train"])


def test_bench_parser_mounts_under_a_parent_parser(tmp_path, capsys):
    import argparse
    from gyrfalcon.benchmark.cli import add_bench_parser
    parser = argparse.ArgumentParser(prog="gyrfalcon")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "run", "--dry-run", "--shapes", "tiny", "--out", str(tmp_path)])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "gyrfalcon tiny:" in out and "hf-torch tiny:" in out and "train tiny b2 x 64" in out


# ---------------------------------------------------------------------------------------------- runner
def test_worker_environments(tmp_path):
    base = tmp_path / ".baseline"
    for sub in ("stub", "mamba_ssm-2.3.2.post1", "causal_conv1d-1.7.0", "pydeps"):
        (base / sub).mkdir(parents=True)
    (base / "mamba_ssm-2.3.2.post1.tar.gz").write_text("")            # tarballs are not path entries
    assert [p.name for p in runner.baseline_paths(base)] == ["stub", "mamba_ssm-2.3.2.post1",
                                                             "causal_conv1d-1.7.0", "pydeps"]
    assert runner.baseline_paths(tmp_path / "none") == []
    config = runner.RunConfig(baseline_dir=base)
    inherited = {"PYTHONPATH": os.pathsep.join([str(base / "stub"), "/opt/site"]), "PATH": "/bin"}
    kernels = runner.worker_env("hf-kernels", config, inherited)["PYTHONPATH"].split(os.pathsep)
    assert kernels[0] == str(runner.PACKAGE_ROOT) and kernels[1] == str((base / "stub").resolve())
    assert str((base / "pydeps").resolve()) in kernels and "/opt/site" in kernels
    for system in ("gyrfalcon", "hf-torch"):
        env = runner.worker_env(system, config, inherited)
        assert env["PYTHONPATH"].split(os.pathsep) == [str(runner.PACKAGE_ROOT), "/opt/site"]
        assert env["TRITON_CACHE_AUTOTUNING"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/bin"
        assert env["TRITON_CACHE_DIR"] == str(Path("runs/triton-cache").resolve())
    no_cache = runner.RunConfig(baseline_dir=base, autotune_cache=False)
    assert "TRITON_CACHE_AUTOTUNING" not in runner.worker_env("hf-torch", no_cache, {})
    assert runner.worker_env("hf-torch", no_cache, {"TRITON_CACHE_DIR": "/mine"})["TRITON_CACHE_DIR"] == "/mine"


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for `python -m gyrfalcon.benchmark.worker ... --records PATH`."""
    script = tmp_path / "fake_python"
    script.write_text(f"#!{sys.executable}\nimport sys, time\nargs = sys.argv[1:]\n"
                      f"records = args[args.index('--records') + 1]\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_runner_reports_crashed_workers_and_restarts(tmp_path):
    config = runner.RunConfig(plan="default", systems=("hf-torch",), shapes=("tiny",), suites=("train", "prefill"),
                              device="cpu", out_dir=tmp_path / "out", commit="c0ffee", time_limit_s=60,
                              python=fake_python(tmp_path, "print('Segmentation fault'); sys.exit(139)"))
    records = runner.run(config)
    assert [(r["suite"], r["metric"], r["status"]) for r in records] == [
        ("train", "tokens_per_s", "failed"), ("train", "peak_gib", "failed"),
        ("prefill", "tokens_per_s", "failed"), ("prefill", "peak_gib", "failed")]
    assert "exited with status 139" in records[0]["reason"] and "Segmentation fault" in records[0]["reason"]
    assert records[0]["env"]["commit"] == "c0ffee"
    assert (tmp_path / "out" / "table.md").read_text().count("failed [") == 4
    assert len(read_jsonl([tmp_path / "out" / "results.jsonl"])) == 4


def test_runner_restarts_a_worker_whose_cuda_context_broke(tmp_path):
    # First worker: measures one workload, then exits with RESTART; the next one gets only the rest.
    body = f"""
import json, pathlib
from gyrfalcon.benchmark.records import make_record
spec = json.loads(pathlib.Path(args[args.index('--spec') + 1].strip()).read_text())
calls = pathlib.Path({str(tmp_path / 'calls')!r})
calls.write_text(calls.read_text() + 'x' if calls.exists() else 'x')
todo = spec['workloads'] if len(calls.read_text()) > 1 else spec['workloads'][:1]
with open(records, 'a') as f:
    for w in todo:
        r = make_record(system='gyrfalcon', suite=w['suite'], shape=w['shape'], workload=w['params'],
                        metric='tokens_per_s', value=1.0, settings=spec['settings'], env={ENV!r}, run_id='x')
        f.write(json.dumps(r) + '\\n')
sys.exit(0 if len(calls.read_text()) > 1 else {worker.RESTART})
"""
    config = runner.RunConfig(systems=("gyrfalcon",), shapes=("tiny",), suites=("train", "prefill"), device="cpu",
                              out_dir=tmp_path / "out", python=fake_python(tmp_path, body))
    records = runner.run(config)
    assert [(r["suite"], r["status"]) for r in records] == [("train", "ok"), ("prefill", "ok")]
    assert (tmp_path / "calls").read_text() == "xx"


def test_runner_stops_workers_at_the_time_limit(tmp_path):
    config = runner.RunConfig(plan="default", systems=("gyrfalcon", "hf-torch"), shapes=("tiny",),
                              suites=("train",), device="cpu", out_dir=tmp_path, time_limit_s=1.5, min_start_s=0.5,
                              python=fake_python(tmp_path, "time.sleep(30)"))
    records = runner.run(config)
    assert [(r["system"], r["status"]) for r in records if r["metric"] == "tokens_per_s"] == [
        ("gyrfalcon", "timeout"), ("hf-torch", "skipped")]


def test_runner_resume_skips_measured_workloads(tmp_path, capsys):
    out = tmp_path / "out"
    w = {"batch": 2, "seqlen": 64}
    write_jsonl(out / "results.jsonl", [rec("gyrfalcon", "train", "tiny", w, "tokens_per_s", 10.0),
                                        rec("hf-torch", "train", "tiny", w, "tokens_per_s", None, "failed", "x")])
    config = runner.RunConfig(systems=("gyrfalcon", "hf-torch"), shapes=("tiny",), suites=("train",), device="cpu",
                              out_dir=out, resume=True)
    runner.run(config, dry_run=True)
    printed = capsys.readouterr().out
    assert "gyrfalcon tiny" not in printed and "hf-torch tiny" in printed


def test_maxlen_result_from_probes():
    def probe(length, status):
        return rec("gyrfalcon", "maxlen", "7B", {"batch": 1, "seqlen": length}, "probe_step_s",
                   1.0 if status == "ok" else None, status, None if status == "ok" else "x")
    probes = [probe(2048, "ok"), probe(4096, "ok"), probe(8192, "oom"), probe(6144, "ok"), probe(7168, "oom")]
    value, status, reason, extra = maxlen_result(probes, cap=262144)
    assert (value, status, extra["limited_by"], extra["first_failure"]) == (6144, "ok", "oom", 7168)
    value, status, reason, extra = maxlen_result([probe(2048, "ok"), probe(4096, "ok")], cap=4096)
    assert (value, extra["limited_by"]) == (4096, "cap")
    value, status, reason, _ = maxlen_result([probe(2048, "oom"), probe(1024, "oom")], cap=4096)
    assert value is None and status == "oom" and "1024" in reason


# ---------------------------------------------------------------------------------------------- smoke runs
class OOMAbove(GyrfalconSystem):
    """gyrfalcon on the CPU, pretending the device runs out of memory above `limit` tokens."""

    def __init__(self, limit, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def loss(self, model, ids):
        if ids.shape[1] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().loss(model, ids)


def cpu_context(system, **settings) -> tuple[Context, list]:
    out: list[dict] = []
    s = plan.Settings(dtype="float32", warmup={"train": 1, "prefill": 1, "decode": 1, "kernels": 1},
                      repeats={"train": 2, "prefill": 2, "decode": 1, "decode_short": 3, "kernels": 2}, **settings)
    env = collect_env("cpu", commit="test")
    return Context(system=system, settings=s, device=torch.device("cpu"), run_id="t", env=env, emit=out.append), out


def test_gyrfalcon_train_and_prefill_on_the_tiny_shape():
    ctx, out = cpu_context(GyrfalconSystem())
    for w in plan.plan_workloads("default", shapes=("tiny",), suites=("train", "prefill")):
        run_workload(ctx, w)
    got = {(r["suite"], r["metric"]): r for r in out}
    assert set(got) == {("train", m) for m in ("tokens_per_s", "step_s", "peak_gib", "model_tflops", "flops_share")} \
        | {("prefill", m) for m in ("tokens_per_s", "step_s", "peak_gib", "flops_share")}
    train = got[("train", "tokens_per_s")]
    assert train["status"] == "ok" and train["value"] > 0 and train["extra"]["repeats"] == 2
    assert train["value"] == pytest.approx(2 * 64 / got[("train", "step_s")]["value"])
    assert 0 < train["extra"]["trainable_params"] < 200_000 and train["extra"]["loss"] > 0
    assert got[("train", "flops_share")]["value"] == pytest.approx(
        flops.train_flops(tiny(), 2, 64) / got[("train", "step_s")]["value"] / 989e12)
    assert got[("train", "peak_gib")]["status"] == "unavailable"            # no allocator statistics on CPU
    assert got[("prefill", "tokens_per_s")]["status"] == "ok"


def test_unsupported_features_are_records_not_crashes():
    def no_lora(model, **kwargs):
        raise AttributeError("unused")

    ctx, out = cpu_context(GyrfalconSystem())
    run_workload(ctx, plan.Workload("decode", "tiny", {"batch": 1, "prompt": 16, "new_tokens": 8}))
    statuses = {(r["metric"], r["status"]) for r in out}
    if importlib.util.find_spec("gyrfalcon.generate") is None:
        assert statuses == {("tokens_per_s", "unsupported"), ("peak_gib", "unsupported")}
        assert "gyrfalcon.generate" in out[0]["reason"]
    ctx, out = cpu_context(GyrfalconSystem(lora_fn=no_lora))
    run_workload(ctx, plan.Workload("train", "tiny", {"batch": 1, "seqlen": 16}))
    assert [(r["metric"], r["status"]) for r in out] == [("tokens_per_s", "failed"), ("peak_gib", "failed")]
    assert out[0]["reason"] == "AttributeError: unused"


def test_decode_with_a_stand_in_generate():
    def greedy(model, ids, max_new_tokens, min_new_tokens):
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, model(ids, logits_to_keep=1).logits.argmax(-1)], dim=1)
            time.sleep(0.005)   # a step cost no CPU load can hide: the timing difference must be positive
        return ids

    ctx, out = cpu_context(GyrfalconSystem(generate_fn=greedy))
    run_workload(ctx, plan.Workload("decode", "tiny", {"batch": 2, "prompt": 16, "new_tokens": 8}))
    got = {r["metric"]: r for r in out}
    assert got["tokens_per_s"]["status"] == "ok" and got["bandwidth_share"]["status"] == "ok"
    assert got["tokens_per_s"]["value"] == pytest.approx(2e3 / got["ms_per_step"]["value"])
    ctx, out = cpu_context(GyrfalconSystem(generate_fn=lambda model, ids, max_new_tokens, min_new_tokens: ids))
    run_workload(ctx, plan.Workload("decode", "tiny", {"batch": 1, "prompt": 16, "new_tokens": 8}))
    assert out[0]["status"] == "failed" and "stopped early" in out[0]["reason"]


def test_maxlen_doubles_then_bisects():
    ctx, out = cpu_context(OOMAbove(100), maxlen_start=16, maxlen_cap=1024, maxlen_granularity=8,
                           maxlen_bisect_steps=3)
    run_workload(ctx, plan.Workload("maxlen", "tiny", {"batch": 1}))
    tried = [(r["workload"]["seqlen"], r["status"]) for r in out if r["metric"] == "probe_step_s"]
    assert tried == [(16, "ok"), (32, "ok"), (64, "ok"), (128, "oom"), (96, "ok"), (112, "oom"), (104, "oom")]
    final = out[-1]
    assert (final["metric"], final["status"], final["value"]) == ("max_seqlen", "ok", 96)
    assert final["extra"]["limited_by"] == "oom" and final["extra"]["first_failure"] == 104


def test_kernels_suite_on_the_tiny_shape():
    ctx, out = cpu_context(GyrfalconSystem())
    for w in plan.plan_workloads("extra", shapes=("tiny",), suites=("kernels",)):
        run_workload(ctx, w)
    assert [(r["workload"]["op"], r["workload"]["pass"], r["status"]) for r in out] == [
        (op, kind, "ok") for op, kind in plan.KERNEL_OPS]
    assert all(r["value"] > 0 and len(r["extra"]["samples_ms"]) >= 2 for r in out)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba_ssm is installed here")
def test_transformers_systems_check_their_import_path():
    HFSystem(kernels=False).check()      # this environment has no mamba_ssm: transformers uses its torch path
    assert set(transformers_mamba_backends().values()) <= {"torch", "unknown"}
    with pytest.raises(Unavailable, match="bench/setup_baselines.sh"):
        HFSystem(kernels=True).check()


def test_hf_torch_train_prefill_decode_on_the_tiny_shape():
    ctx, out = cpu_context(HFSystem(kernels=False))
    for w in [w for p in ("default", "extra") for w in plan.plan_workloads(p, shapes=("tiny",),
                                                                        suites=("train", "prefill", "decode"))]:
        run_workload(ctx, w)
    headline = [(r["suite"], r["status"]) for r in out if r["metric"] == "tokens_per_s"]
    assert headline == [("train", "ok"), ("prefill", "ok"), ("decode", "ok"), ("decode", "ok")]
    train = next(r for r in out if r["suite"] == "train")
    assert train["extra"]["trainable_params"] > 0


def test_runner_end_to_end_on_the_cpu(tmp_path):
    """Two real worker processes (gyrfalcon, hf-torch) on the tiny shape: the records, the table, the log."""
    config = runner.RunConfig(systems=("gyrfalcon", "hf-torch"), shapes=("tiny",), suites=("train", "prefill"),
                              device="cpu", out_dir=tmp_path, commit="feedbee", triton_cache_dir=tmp_path / "tc",
                              settings=plan.Settings(dtype="float32"))
    records = runner.run(config)
    headline = {(r["system"], r["suite"]): r["status"] for r in records if r["metric"] == "tokens_per_s"}
    assert headline == {("gyrfalcon", "train"): "ok", ("gyrfalcon", "prefill"): "ok",
                        ("hf-torch", "train"): "ok", ("hf-torch", "prefill"): "ok"}
    assert {r["settings"]["lora_targets"][-1] for r in records} == {"in_proj"}
    assert {r["env"]["commit"] for r in records} == {"feedbee"}
    assert "| train | tiny | b2 x 64 | tok/s |" in (tmp_path / "table.md").read_text()
    assert len(list((tmp_path / "logs").glob("*_hf-torch_tiny.log"))) == 1
    assert all(HEADLINE[r["suite"]] for r in records)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timing_and_memory_on_the_tiny_shape():
    """On a GPU: allocator peaks are recorded and ops are timed with CUDA events (tiny shape, seconds)."""
    out: list[dict] = []
    ctx = Context(system=GyrfalconSystem(), settings=plan.Settings(), device=torch.device("cuda"), run_id="t",
                  env=collect_env("cuda", commit="test"), emit=out.append)
    for w in [w for p in ("default", "extra") for w in plan.plan_workloads(p, shapes=("tiny",),
                                                                        suites=("train", "prefill", "kernels"))]:
        run_workload(ctx, w)
    bad = [(r["suite"], r["metric"], r["reason"]) for r in out if r["status"] != "ok"]
    assert not bad
    assert all(r["value"] > 0 for r in out if r["metric"] in ("peak_gib", "ms", "tokens_per_s"))
    assert out[0]["env"]["device"].startswith("NVIDIA") or "GiB" in out[0]["env"]["device"]
