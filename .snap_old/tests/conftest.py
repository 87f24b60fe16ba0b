"""Test-wide setup: Triton kernels run in the CPU interpreter when there is no GPU, the hub is never contacted,
and transformers' oracle model is built the same way in every parity test."""

import os

import torch

# Must precede any import of a *_triton module: triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests build every model from configs; a test that reached for the hub would hang or fail on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
