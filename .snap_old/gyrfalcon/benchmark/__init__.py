"""gyrfalcon's benchmark harness: gyrfalcon against transformers + PEFT (with and without mamba_ssm's kernels).

    gyrfalcon bench run --plan default              # train, prefill, decode, kernels at 0.5B and 7B, 3 systems
    gyrfalcon bench table runs/bench/results.jsonl  # ratios gyrfalcon / best baseline
    gyrfalcon bench report runs/bench/results.jsonl # PNG plots + the figures section of docs/benchmarks.md

Modules: plan (settings, workloads), runner (one worker process per system and shape), worker + suites + systems
(the measuring side), flops (model FLOPs, decode bytes), records (the JSON schema), report (tables, docs),
plots (matplotlib, optional). docs/benchmarks.md describes the method.
"""
