"""Packed rows (seq_idx): several documents in one row give the same logits, loss and gradients as the documents
run one by one: no attention, conv or SSM state crosses a document boundary."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.model import positions_within_documents
from helpers import randomize_, rel_err, tiny_config


def test_positions_restart_per_document():
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_within_documents(seq_idx).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("case", [{}, {"mamba_n_groups": 2, "mamba_rms_norm": False}])
def test_packed_row_equals_documents_run_separately(case):
    config = tiny_config(**case)
    model = randomize_(FalconH1ForCausalLM.from_config(config, dtype=torch.float64, device="cpu"), seed=0)
    lengths = [9, 20, 3, 18]  # boundaries inside and across chunks of 16
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, config.vocab_size, (1, n), generator=gen) for n in lengths]
    ids = torch.cat(docs, 1)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    labels = ids.clone()
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    labels[0, starts] = -100  # nothing in the row before a document may predict its first token

    packed = model(ids, labels=labels, seq_idx=seq_idx)
    packed.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total, count, logits = 0.0, 0, []
    for doc in docs:
        out = model(doc, labels=doc)
        n_targets = doc.shape[1] - 1
        total = total + out.loss * n_targets
        count += n_targets
        logits.append(out.logits)
    separate_loss = total / count
    separate_loss.backward()

    assert rel_err(packed.logits, torch.cat(logits, 1)) <= 1e-12
    assert abs(packed.loss.item() - separate_loss.item()) <= 1e-12
    for name, p in model.named_parameters():
        assert rel_err(packed_grads[name], p.grad) <= 1e-10, name


def test_bad_seq_idx():
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 512, (1, 6))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, seq_idx=torch.tensor([[0, 0, 1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(ids, seq_idx=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="either attention_mask"):
        model(ids, seq_idx=torch.zeros(1, 6, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
