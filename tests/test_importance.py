"""Torch-Pruning's importances as filter scores: equal to calling ``torch_pruning.importance`` on the same
group directly, the group-L1 equation written out, and taken by the consumers like every other source."""

import copy

import pytest
import torch
import torch_pruning as tp
from conftest import make_trainer, randomise_bn
from torch.nn import functional as F

from lightning_interp.callbacks import FilterMasking, PruneFlaggedFilters
from lightning_interp.importance import CRITERIA, ImportanceScorer, importance_scores
from lightning_interp.models import ImageClassifier, SimpleCNN
from lightning_interp.scores import Selection, resolve_scores

torch.set_num_threads(1)

DIRECT = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(),
}


def _net(batch_norm=True):
    torch.manual_seed(0)
    return randomise_bn(SimpleCNN(in_channels=3, width=(4, 6, 8), batch_norm=batch_norm)).eval()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_scores_equal_torch_pruning_called_directly(criterion):
    net = _net()
    x, y = torch.randn(10, 3, 16, 16), torch.randint(0, 10, (10,))
    layers = ["relu2", "bn3"] + ([] if criterion == "bn_scale" else ["fc1"])  # fc1 has no BatchNorm
    got = importance_scores(net, layers, x[:2], criterion, inputs=x, labels=y, batch_size=4)
    assert got.scorer == f"torch_pruning/{criterion}" and got.flags() == {}

    ref = copy.deepcopy(net)
    if criterion == "taylor":  # the way Torch-Pruning's own examples fill the gradients
        F.cross_entropy(ref(x), y).backward()
    graph = tp.DependencyGraph().build_dependency(ref, example_inputs=x[:2])
    for layer, module in (("relu2", ref.conv2), ("bn3", ref.conv3), ("fc1", ref.fc1))[: len(layers)]:
        fn = tp.prune_linear_out_channels if layer == "fc1" else tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, fn, idxs=list(range(module.weight.shape[0])))
        expected = DIRECT[criterion]()(group)
        torch.testing.assert_close(got.scores[layer], expected.float(), rtol=1e-5, atol=1e-6)


def test_group_l1_is_the_mean_of_the_coupled_weights_magnitudes():
    net = _net(batch_norm=False)
    got = importance_scores(net, ["relu2"], torch.randn(2, 3, 16, 16), "l1").scores["relu2"]
    out_rows = net.conv2.weight.detach().abs().flatten(1).sum(1)  # filter k of conv2
    in_cols = net.conv3.weight.detach().abs().transpose(0, 1).flatten(1).sum(1)  # its input channel in conv3
    group = (out_rows + in_cols) / 2
    torch.testing.assert_close(got, group / group.mean())


def test_gradients_and_modes_are_restored_and_bad_requests_refused():
    net = _net().train()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    net.conv1.weight.grad = torch.ones_like(net.conv1.weight)
    importance_scores(net, ["relu2"], x[:2], "taylor", inputs=x, labels=y)
    assert (net.conv1.weight.grad == 1).all() and net.conv2.weight.grad is None and net.training
    with pytest.raises(ValueError, match=r"`criterion` to be one of \['l1', 'l2', 'taylor', 'bn_scale', 'lamp'\]"):
        importance_scores(net, ["relu2"], x[:2], "fpgm")
    with pytest.raises(ValueError, match="`inputs` and `labels` for criterion 'taylor'"):
        ImportanceScorer(net, ["relu2"], x[:2], criterion="taylor")
    with pytest.raises(ValueError, match="no BatchNorm in its group"):
        importance_scores(_net(batch_norm=False), ["relu2"], x[:2], "bn_scale")


def test_scorer_is_a_source_and_follows_the_weights():
    net = _net()
    x = torch.randn(2, 3, 16, 16)
    scorer = ImportanceScorer(net, ["relu2", "relu3"], x)
    lowest = resolve_scores(scorer, Selection("l2", amount=2, lowest=True))
    l2 = importance_scores(net, ["relu2", "relu3"], x, "l2")
    for layer in ("relu2", "relu3"):
        assert lowest.flags()[layer] == sorted(torch.argsort(l2.scores[layer])[:2].tolist())
    with torch.no_grad():
        net.conv2.weight[3] = 0  # the next read sees the new weights
    assert resolve_scores(scorer, Selection(amount=1, lowest=True)).flags()["relu2"] == [3]


def test_prune_flagged_filters_takes_an_importance_source(tmp_path, digits):
    module = ImageClassifier(SimpleCNN(in_channels=1, width=(4, 6, 8), batch_norm=True))
    source = ImportanceScorer(module, ["model.relu2"], torch.randn(2, 1, 16, 16), criterion="bn_scale")
    prune = PruneFlaggedFilters(source, select=Selection("bn_scale", amount=2, lowest=True),
                                out_path=str(tmp_path / "pruned.pt"), strict=True)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune], max_epochs=1, enable_checkpointing=False)
    trainer.fit(module, datamodule=digits)
    gamma = module.model.bn2.weight.detach().abs()
    assert prune.summary["pruned"] == {"conv2": sorted(torch.argsort(gamma)[:2].tolist())}
    assert prune.summary["channels"]["conv2"] == [6, 4]


def test_filter_masking_takes_an_importance_source(tmp_path, digits):
    torch.manual_seed(0)
    module = ImageClassifier(SimpleCNN(in_channels=1, width=(4, 6, 8)))
    x = torch.randn(2, 1, 16, 16)
    lamp = importance_scores(module.model, ["relu3"], x, "lamp").scores["relu3"]  # the weights at epoch 0's start
    masking = FilterMasking(ImportanceScorer(module, ["model.relu3"], x), select=Selection("lamp", amount=3, lowest=True))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[masking], max_epochs=2, enable_checkpointing=False)
    trainer.fit(module, datamodule=digits)
    assert masking.history[0]["filters"] == {"model.relu3": sorted(torch.argsort(lamp)[:3].tolist())}
    assert len(masking.history[1]["filters"]["model.relu3"]) == 3  # re-read from the trained weights
