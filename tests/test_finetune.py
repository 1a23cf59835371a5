"""fine_tune trains in place and lowers the loss; it leaves the modes as found; without_samples drops
exactly the flagged samples; under torch.distributed (2 processes) the ranks end with identical
weights, equal to one process taking the same steps on the union of their batches."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.finetune import fine_tune, loader_without, without_samples
from lightning_interp.masking import FilterMask
from lightning_interp.memorisation import memorisation_scores
from lightning_interp.models import SimpleCNN
from lightning_interp.pruning import prune_filters

torch.set_num_threads(1)
SCRIPT = os.path.join(os.path.dirname(__file__), "ddp", "run_finetune.py")


def _problem(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 12, 12, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # learnable: 4 classes
    return TensorDataset(x, y)


def _loss(model, data):
    with torch.no_grad():
        model.eval()
        return F.cross_entropy(model(data.tensors[0]), data.tensors[1]).item()


def test_fine_tune_changes_weights_lowers_the_loss_and_restores_modes():
    torch.manual_seed(0)
    model = SimpleCNN(in_channels=3, num_classes=4, width=(4, 6, 8), batch_norm=True)
    model.eval()
    model.bn1.train()  # a mixed state the user chose
    data = _problem()
    before_loss, before = _loss(model, data), [p.detach().clone() for p in model.parameters()]
    model.eval()
    model.bn1.train()
    losses = fine_tune(model, DataLoader(data, batch_size=16, shuffle=True), epochs=6, lr=1e-2)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert not model.training and model.bn1.training and not model.bn2.training
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert _loss(model, data) < before_loss


def test_fine_tune_after_masking_then_pruning_by_memorisation_scores():
    """The pruned network computes what the masked one does; then it trains like any other module."""
    torch.manual_seed(0)
    net = SimpleCNN(in_channels=3, num_classes=4, width=(4, 6, 8)).eval()
    data = _problem()
    x, y = data.tensors
    scores = memorisation_scores(net, ["relu3"], x, y, torch.arange(8), clean=torch.arange(8, 64), amount=3)
    with FilterMask(net, scores.flags()), torch.no_grad():
        masked = net(x)
    pruned, summary = prune_filters(net, scores.flags(), x[:2], latency=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, atol=1e-5, rtol=1e-5)
    assert summary.channels["conv3"] == (8, 5)
    loader = loader_without(DataLoader(data, batch_size=16), torch.arange(8))
    assert len(loader.dataset) == 56
    before = _loss(pruned, data)
    fine_tune(pruned, loader, epochs=5, lr=1e-2)
    assert _loss(pruned, data) < before


def test_without_samples_drops_indices_or_a_mask_and_refuses_bad_input():
    data = _problem(10)
    kept = without_samples(data, [0, 3, 3, 9])
    assert kept.indices == [1, 2, 4, 5, 6, 7, 8]
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5]] = True
    assert without_samples(data, mask).indices == [0, 1, 3, 4, 6, 7, 8, 9]
    assert without_samples(data, None) is data
    with pytest.raises(ValueError, match=r"indices in \[0, 9\] but got \[10\]"):
        without_samples(data, [10])
    with pytest.raises(ValueError, match="boolean mask of 10 entries"):
        without_samples(data, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="nothing is left"):
        without_samples(data, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="`epochs` to be a positive int but got 0"):
        fine_tune(nn.Linear(2, 2), [], epochs=0)
    with pytest.raises(ValueError, match="at least one batch"):
        fine_tune(nn.Linear(2, 2), [], epochs=1)
    with pytest.raises(RuntimeError, match="process group"):
        fine_tune(nn.Linear(2, 2), [(torch.randn(2, 2), torch.tensor([0, 1]))], sync=True)


def test_fine_tune_under_torch_distributed_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1, single = (torch.load(tmp_path / f, weights_only=True) for f in ("rank0.pt", "rank1.pt", "single.pt"))
    for name, w in rank0["state"].items():
        assert torch.equal(w, rank1["state"][name]), name
        torch.testing.assert_close(w, single["state"][name], atol=1e-5, rtol=1e-4)
    assert rank0["losses"] != rank1["losses"]  # each rank trained on its own half
