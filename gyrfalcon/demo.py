"""`gyrfalcon demo`: the built-in tiny Falcon-H1 end to end on this machine, in seconds, with no download.

Builds the tiny preset with random weights, saves it as a Hugging Face checkpoint and loads it back, then runs a
forward + backward pass on random tokens and checks that left padding leaves the real tokens' logits unchanged.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .config import ConfigError, FalconH1Config
from .model import FalconH1ForCausalLM


def run_demo(seed: int = 0, batch: int = 4, seq_len: int = 128, console: Console | None = None) -> dict:
    """Run the demo; returns the figures it printed."""
    if batch < 1 or seq_len < 2:
        raise ConfigError(f"--batch must be >= 1 and --seq-len >= 2, got {batch} and {seq_len}")
    console = console or Console()
    torch.manual_seed(seed)
    config = FalconH1Config.from_preset("tiny")
    model = FalconH1ForCausalLM.from_config(config, seed=seed)
    console.print(f"[bold]gyrfalcon demo[/]: tiny Falcon-H1, {model.num_parameters():,} parameters, "
                  f"{config.num_hidden_layers} hybrid layers, on {model.device} ({model.dtype})")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-falcon-h1"
        model.save_pretrained(path)
        model = FalconH1ForCausalLM.from_pretrained(path, device=model.device, dtype=model.dtype)
        files = sorted(p.name for p in path.iterdir())
    console.print(f"saved and reloaded as a Hugging Face checkpoint: {', '.join(files)}")

    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=model.device)
    model.train()
    start = time.perf_counter()
    out = model(ids, labels=ids)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None))

    model.eval()
    pad = seq_len // 4
    with torch.no_grad():
        plain = model(ids[:1]).logits
        padded_ids = torch.cat([torch.full((1, pad), config.pad_token_id, device=ids.device), ids[:1]], dim=1)
        mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, seq_len, dtype=torch.long)], 1)
        padded = model(padded_ids, attention_mask=mask.to(ids.device)).logits[:, pad:]
    pad_error = ((padded - plain).abs().max() / plain.abs().max()).item()

    figures = {"loss": out.loss.item(), "uniform_loss": float(torch.log(torch.tensor(float(config.vocab_size)))),
               "grad_norm": grad_norm.item(), "tokens_per_s": batch * seq_len / elapsed,
               "left_padding_rel_error": pad_error}
    table = Table(title="forward + backward on random tokens", show_header=False)
    table.add_row("batch x length", f"{batch} x {seq_len}")
    table.add_row("loss (uniform guess)", f"{figures['loss']:.4f} ({figures['uniform_loss']:.4f})")
    table.add_row("gradient norm", f"{figures['grad_norm']:.4f}")
    table.add_row("forward + backward", f"{elapsed * 1000:.0f} ms, {figures['tokens_per_s']:,.0f} tokens/s")
    table.add_row("left padding vs none", f"max relative logit difference {pad_error:.1e}")
    console.print(table)
    if pad_error > 1e-4:
        raise RuntimeError(f"left-padded logits differ from unpadded ones by {pad_error:.2e}: a bug, please report")
    return figures
