"""Pruning follows real networks: every elementwise activation passes through, blocks map to the
layer that owns their output channels (or are refused), latency is measured before and after; masking then pruning leaves a network's outputs unchanged, and bad
requests are refused with the valid range. Channel counts round as Torch-Pruning's ``round_to`` rounds them;
a pruned network saved as weights + plan loads without pickle into a fresh copy of every torchvision family
and gives the same outputs; old pickled files load only with ``trust_pickle=True``."""

import copy
import warnings

import pytest
import torch
import torch_pruning as tp
import torchvision
from conftest import randomise_bn
from test_user_models import MODELS
from torch import nn

from lightning_interp.masking import FilterMask
from lightning_interp.models import LeNet5, SimpleCNN, resnet18_cifar
from lightning_interp.pruning import (
    PRUNED_FORMAT,
    PruneSummary,
    _warn_if_not_faster,
    check_prunable,
    compare_latency,
    default_round_to,
    is_pass_through,
    load_pruned,
    measure_latency,
    prune_filters,
    prune_target,
    rounded_prune_count,
    save_pruned,
)

torch.set_num_threads(1)

ACTIVATIONS = [nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
               nn.ReLU6, nn.Softplus, nn.Hardtanh, nn.Tanh, nn.Sigmoid]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
def test_masking_then_pruning_through_any_elementwise_activation(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 8, 3, padding=1), act(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert prune_target(net, "2") == "0" and prune_target(net, "4") == "3"
    pruned, summary = prune_filters(net, {"4": [1, 5]}, x, latency=False)
    assert summary.channels["3"] == (8, 6) and pruned(x).shape == (2, 4)
    # Masking the activation's output (what the next layer sees) is what pruning does, for any activation.
    with FilterMask(net, {"4": [1, 5]}), torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)
    # Masking the conv's output instead leaves act(0) in channels 1 and 5, constant after pooling: the
    # pruned output is the masked one with act(0)·W[:, 1] + act(0)·W[:, 5] taken out of the linear bias.
    a0 = act()(torch.zeros(1)).item()
    folded = copy.deepcopy(net)
    with torch.no_grad():
        folded[7].bias -= a0 * folded[7].weight[:, [1, 5]].sum(1)
    with FilterMask(folded, {"3": [1, 5]}), torch.no_grad():
        torch.testing.assert_close(pruned(x), folded(x), atol=1e-5, rtol=1e-5)
    if abs(a0) > 1e-6:  # and the fold is needed: without it the outputs differ
        with FilterMask(net, {"3": [1, 5]}), torch.no_grad():
            assert not torch.allclose(pruned(x), net(x), atol=1e-4)


def test_channel_mixing_modules_are_not_pass_through():
    assert not is_pass_through(nn.Softmax(dim=1)) and not is_pass_through(nn.Flatten())
    assert is_pass_through(nn.Hardswish()) and is_pass_through(nn.Dropout2d()) and is_pass_through(nn.MaxPool2d(2))


def test_blocks_map_to_the_layer_that_owns_their_output_channels():
    x = torch.rand(2, 3, 32, 32)
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4).eval()
    assert prune_target(mobilenet, "features.1", x) == "features.1.block.2.0"  # InvertedResidual: project conv
    assert prune_target(mobilenet, "features.0.2", x) == "features.0.0"  # Hardswish after the stem conv
    pruned, summary = prune_filters(mobilenet, {"features.4": [0, 3]}, x, latency=False)  # a residual InvertedResidual
    assert pruned(x).shape == (2, 4) and summary.params_after < summary.params_before
    resnet = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    assert prune_target(resnet, "layer2.0", x) == "layer2.0.downsample.0"  # the last conv; one residual group
    densenet = torchvision.models.densenet121(weights=None, num_classes=4).eval()
    with pytest.raises(ValueError, match=r"block 'features.denseblock1'.*concatenates.*e.g. 'features.denseblock1"):
        check_prunable(densenet, ["features.denseblock1"], x)
    assert check_prunable(densenet, ["features.transition1"], x) == {"features.transition1": "features.transition1.conv"}


class ScriptedForward(nn.Module):
    """A forward that advances a fake clock by a scripted time per call: the test reads no wall time."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.clock, self.seconds, self.modes = clock, list(seconds), []

    def forward(self, x):
        self.modes.append(self.training)
        self.clock[0] += self.seconds.pop(0)
        return x


def test_latency_is_the_median_of_the_timed_forwards_in_ms(monkeypatch):
    import lightning_interp.pruning as pruning

    clock = [0.0]
    monkeypatch.setattr(pruning.time, "perf_counter", lambda: clock[0])
    # Two warm-up calls, then 1, 40, 80, 120 and 160 ms on the scripted clock: the median is exactly 80 ms
    # (the second-smallest or the minimum would be 40 or 1 ms, a value in seconds 0.08), and the model is in
    # eval mode while timed and in training mode after.
    net = ScriptedForward(clock, [0.0, 0.0, 0.001, 0.04, 0.08, 0.12, 0.16]).train()
    assert measure_latency(net, torch.zeros(1), repeats=5, warmup=2) == pytest.approx(80.0)
    assert net.seconds == [] and net.modes == [False] * 7 and net.training
    # By default 2 warm-up and 7 timed forwards: exactly 9 calls.
    net = ScriptedForward(clock, [0.0] * 9)
    measure_latency(net, torch.zeros(1))
    assert net.seconds == [] and len(net.modes) == 9
    # Inputs on a device other than CUDA never synchronise CUDA (a meta tensor would make it raise).
    assert measure_latency(nn.Identity(), torch.zeros(1, device="meta"), repeats=1, warmup=0) == 0.0


def test_latency_is_measured_before_and_after():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4))
    x = torch.rand(2, 3, 8, 8)
    assert measure_latency(net, x, repeats=3) > 0
    assert len(compare_latency(net, net, net, example_inputs=x, repeats=2)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny network may time equal; the warning's rule is tested below
        _, summary = prune_filters(net, {"1": [0, 1, 2]}, x)
    d = summary.as_dict()
    assert d["latency_ms_before"] > 0 and d["latency_ms_after"] > 0 and d["latency_device"] == "cpu"
    _, quiet = prune_filters(net, {"1": [0]}, x, latency=False)
    assert "latency_ms_before" not in quiet.as_dict()


class Logged(nn.Module):
    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return x


def test_latency_rounds_interleave_and_alternate_the_order():
    """Each round times every network once, the order reversed every other round, so neither is always second."""
    log = []
    compare_latency(Logged("a", log), Logged("b", log), example_inputs=torch.zeros(1), repeats=4, warmup=1)
    assert log[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"] and sorted(log[:2]) == ["a", "b"]  # after warm-up


def summary_with(before, after, macs_after, round_to=1, device="cpu"):
    return PruneSummary(params_before=10, params_after=8, macs_before=1000.0, macs_after=macs_after,
                        pruned={"conv": [1, 2]}, latency_ms_before=before, latency_ms_after=after,
                        latency_device=device, latency_batch=2, round_to=round_to)


def test_a_pruned_network_that_is_not_faster_is_warned_about():
    with pytest.warns(UserWarning, match=r"not faster on cpu: 10.00 ms -> 11.00 ms.*2 filters and 0.5% of the MACs, "
                                         r"less than timing resolves"):
        _warn_if_not_faster(summary_with(10.0, 11.0, 995.0))
    with pytest.warns(UserWarning, match=r"not faster on cuda:0.*40.0% of the MACs.*pass round_to=8"):
        _warn_if_not_faster(summary_with(10.0, 10.0, 600.0, device="cuda:0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_not_faster(summary_with(10.0, 9.0, 600.0))  # faster: silent


# ---- round_to: Torch-Pruning's rule ----------------------------------------------------------------------


@pytest.mark.parametrize("round_to", [2, 4, 8, 16])
def test_rounded_count_is_torch_pruning_round_to(round_to):
    """The oracle is Torch-Pruning's own ``BasePruner._round_to``; where it would empty the layer we keep the ask."""
    for channels in (8, 16, 24, 30, 64, 100, 256):
        for n in range(channels):
            ours = rounded_prune_count(n, channels, round_to)
            theirs = tp.pruner.BasePruner._round_to(None, n, channels, round_to) if n else 0
            if channels - theirs > 0:
                assert ours == theirs, (channels, n, round_to)
            else:  # Torch-Pruning would remove every channel (its group check then refuses); we prune as asked
                assert ours == n
            assert (channels - ours) % round_to == 0 or channels - n < round_to or n == 0
    with pytest.raises(ValueError, match="round_to"):
        rounded_prune_count(1, 8, 0)


def test_rounding_prunes_what_torch_pruning_prunes():
    """Torch-Pruning's MetaPruner (group L2 magnitude, round_to=8) and prune_filters given the channels it would
    prune before rounding end with the same kept filters, weight for weight."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 30, 3, padding=1), nn.BatchNorm2d(30), nn.ReLU(), nn.Conv2d(30, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    randomise_bn(net)
    x = torch.rand(2, 3, 16, 16)
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=x)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    whole = graph.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(30)))
    asked = torch.argsort(importance(whole))[: 30 - int(30 * 0.7)].tolist()  # TP's count before rounding: 9
    theirs = copy.deepcopy(net)
    tp.pruner.MetaPruner(theirs, x, importance=importance, pruning_ratio=0.3, round_to=8,
                         ignored_layers=[theirs[3], theirs[7]]).step()
    ours, summary = prune_filters(net, {"0": asked}, x, round_to=8, latency=False)
    assert ours[0].out_channels == theirs[0].out_channels == 16
    assert len(summary.rounded["0"]) == 14 - 9 and set(summary.rounded["0"]).isdisjoint(asked)
    torch.testing.assert_close(ours[0].weight, theirs[0].weight)
    torch.testing.assert_close(ours(x), theirs(x))


def test_round_to_defaults_from_the_device():
    assert default_round_to("cpu") == 1 and default_round_to(torch.device("cuda", 0)) == 8
    net = SimpleCNN(in_channels=3)
    x = torch.rand(2, 3, 16, 16)
    _, exact = prune_filters(net, {"relu2": [1, 2, 3]}, x, latency=False)  # CPU inputs: exactly the ask
    assert exact.channels["conv2"] == (64, 61) and exact.rounded == {} and exact.round_to == 1


# ---- files: weights + plan, no pickle ---------------------------------------------------------------------

#: Every torchvision family of the test matrix (tests/test_user_models.py) and the three issue 23 adds, with
#: a layer to prune (the block the matrix watches: its prune target).
FAMILIES = {
    **{name: (build, layer[len("net."):]) for name, (build, layer) in MODELS.items()},
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=4), "trunk_output.block1.block1-0"),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=4), "stage2.0.branch2.2"),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=4), "features.1.0"),
}


# Torch-Pruning 1.6 cannot build the dependency graph through ShuffleNet's channel_shuffle (a ZeroDivisionError in
# its reshape index mapping), so nothing of shufflenet can be pruned yet: pruning.dependency_graph refuses it with
# a ValueError naming the cause; strict, so a fixed release shows up here.
NOT_TRACEABLE = pytest.mark.xfail(raises=ValueError, strict=True, reason="Torch-Pruning: channel_shuffle")


@pytest.mark.parametrize("name", [pytest.param(n, marks=NOT_TRACEABLE) if n.startswith("shufflenet") else n
                                  for n in FAMILIES])
def test_saved_pruned_network_loads_without_pickle_into_a_fresh_copy(tmp_path, name):
    build, layer = FAMILIES[name]
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    net = randomise_bn(build()).eval()
    target = prune_target(net, layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning's note on convnext's layer_scale parameters
        pruned, summary = prune_filters(net, {target: [0, 2, 3]}, x, round_to=4, latency=False)
    path = save_pruned(tmp_path / "pruned.pt", pruned, summary.as_dict() | {"val_acc_after": 0.5}, model_attr="net")
    payload = torch.load(path, weights_only=True)  # tensors and plain data only: no class is unpickled
    assert payload["format"] == PRUNED_FORMAT and payload["summary"]["val_acc_after"] == 0.5
    before, after = summary.channels[target]
    assert payload["plan"]["layers"][target]["kept"] == [i for i in range(before) if i not in summary.pruned[target]]
    assert after % 4 == 0 or after < 4
    torch.manual_seed(1)  # other initial weights: everything must come from the file
    fresh = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt, loaded = load_pruned(path, fresh)
    assert rebuilt is fresh and loaded["channels"] == payload["summary"]["channels"]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x), rtol=0, atol=0)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_load_pruned_needs_the_same_architecture(tmp_path):
    x = torch.rand(2, 3, 16, 16)
    pruned, summary = prune_filters(SimpleCNN(in_channels=3), {"relu2": [4, 5]}, x, latency=False)
    path = save_pruned(tmp_path / "p.pt", pruned, summary)
    with pytest.raises(ValueError, match=r"Expected `model`, a fresh instance.*SimpleCNN"):
        load_pruned(path)
    with pytest.raises(ValueError, match=r"(?s)same arguments.*size mismatch for fc2"):
        load_pruned(path, SimpleCNN(in_channels=3, num_classes=7))
    with pytest.raises(ValueError, match=r"SimpleCNN.*lacks \['conv2'\]"):
        load_pruned(path, nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="Expected `model` to be the pruned network"):
        save_pruned(tmp_path / "q.pt", SimpleCNN(in_channels=3), summary)  # the un-pruned network
    with pytest.raises(TypeError, match=r"plain data.*`note`"):
        save_pruned(tmp_path / "q.pt", pruned, summary, note=object())


def test_pickled_files_load_only_when_trusted(tmp_path):
    x = torch.rand(2, 3, 16, 16)
    pruned, summary = prune_filters(SimpleCNN(in_channels=3), {"relu2": [4, 5]}, x, latency=False)
    old = {k: v for k, v in summary.as_dict().items() if k not in ("input_shape", "round_to", "rounded")}
    path = tmp_path / "old.pt"
    torch.save({"model": pruned, "summary": old}, path)  # what earlier versions wrote: the network pickled
    with pytest.raises(ValueError, match=r"pickled network.*runs any code.*trust_pickle=True"):
        load_pruned(path, SimpleCNN(in_channels=3))
    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded, loaded_summary = load_pruned(path, trust_pickle=True)
    assert loaded_summary == old
    with pytest.raises(ValueError, match="input_shape="):
        save_pruned(tmp_path / "new.pt", loaded, loaded_summary)
    # The way out of pickle: re-save with an input shape, then load the new file into a fresh network.
    save_pruned(tmp_path / "new.pt", loaded, loaded_summary, input_shape=(1, 3, 16, 16))
    rebuilt, _ = load_pruned(tmp_path / "new.pt", SimpleCNN(in_channels=3))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x), rtol=0, atol=0)


def mask_then_prune(model, filters, x):
    model.eval()
    with FilterMask(model, filters), torch.no_grad():
        masked = model(x)
    pruned, summary = prune_filters(model, filters, x, latency=False)
    with torch.no_grad():
        out = pruned(x)
    return masked, out, summary


@pytest.mark.parametrize(
    "model,filters,shape",
    [
        (lambda: SimpleCNN(in_channels=3), {"relu1": [0, 31], "relu2": [1, 5, 9], "relu3": [0, 63], "relu4": [7]}, (2, 3, 32, 32)),
        (lambda: LeNet5(), {"relu1": [2], "relu2": [0, 15], "relu3": [0, 5], "relu4": [3]}, (2, 1, 32, 32)),
        (lambda: randomise_bn(resnet18_cifar()), {"layer1.0.bn1": [3, 7], "layer2.1.bn1": [0], "layer4.0.bn1": [5, 500]}, (2, 3, 32, 32)),
    ],
)
def test_masking_then_pruning_leaves_outputs_unchanged(model, filters, shape):
    torch.manual_seed(0)
    net = model()
    x = torch.randn(*shape)
    masked, out, summary = mask_then_prune(net, filters, x)
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-5)
    assert summary.params_after < summary.params_before and summary.macs_after < summary.macs_before
    for target, (before, after) in summary.channels.items():
        assert after == before - len(summary.pruned[target])


def test_pruning_errors():
    net = SimpleCNN()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        prune_filters(net, {"relu2": [64]}, x)
    with pytest.raises(ValueError, match=r"\[0, 63\] but got \[65, 300\]"):
        prune_filters(net, {"relu2": [1, 65, 300]}, x)
    with pytest.raises(ValueError, match="no channels|channels to prune"):
        prune_filters(net, {"flatten": [0]}, x)
    with pytest.raises(ValueError, match="ignored layer"):
        prune_filters(net, {"fc2": [0]}, x)
    with pytest.raises(ValueError, match="without channels"):
        prune_filters(net, {"relu1": list(range(32))}, x)
