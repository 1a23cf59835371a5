"""lightning_interp.layers: eval_mode restores every submodule's own mode; filter_owner gives the one
answer SoU and pruning share to "which conv makes these filters"."""

import pytest
import torch
import torchvision
from torch import nn

from lightning_interp.layers import eval_mode, filter_owner, list_layers, trace_layers
from lightning_interp.metrics.tip import weight_layer_for
from lightning_interp.models import SimpleCNN
from lightning_interp.pruning import prune_target

torch.set_num_threads(1)


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_eval_mode_keeps_a_frozen_batchnorm_in_eval_mode():
    model = SimpleCNN(batch_norm=True).train()
    model.bn2.eval()  # a user's frozen BatchNorm inside a training network
    before = modes(model)
    assert before["bn2"] is False and before[""] is True
    with eval_mode(model):
        assert not any(modes(model).values())
    assert modes(model) == before
    # What the hand-written save/restore did: the frozen BatchNorm comes back in training mode.
    was_training = model.training
    model.eval()
    model.train(was_training)
    assert model.bn2.training, "the peer this replaces gets it wrong"


def test_eval_mode_restores_after_an_error_and_when_nested():
    model = SimpleCNN(batch_norm=True).train()
    model.bn1.eval()
    before = modes(model)
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert modes(model) == before
    with eval_mode(model):
        with eval_mode(model.conv1):
            pass
        assert not any(modes(model).values())
    assert modes(model) == before


# ---- filter_owner -------------------------------------------------------------------------------


def test_simple_cnn_every_layer_is_owned_by_the_conv_or_linear_before_it():
    net = SimpleCNN()
    want = {"conv1": "conv1", "relu1": "conv1", "pool1": "conv1", "relu2": "conv2", "relu3": "conv3",
            "pool3": "conv3", "fc1": "fc1", "relu4": "fc1", "fc2": "fc2"}
    x = torch.randn(2, 1, 16, 16)
    for layer, owner in want.items():
        assert filter_owner(net, layer) == owner, layer
        assert filter_owner(net, layer, x) == owner, layer  # traced: the same answer
        assert weight_layer_for(net, layer) == prune_target(net, layer, x) == owner  # SoU scores what pruning cuts


def test_batchnorm_chain_matches_the_channel_count():
    net = SimpleCNN(batch_norm=True)
    assert filter_owner(net, "bn2") == filter_owner(net, "relu2") == "conv2"
    # A side conv registered between the conv and its BatchNorm: the nearest conv *with the BN's channels*.
    class SideConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.side = nn.Conv2d(3, 5, 1)  # registered here, used on another path
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU()
            self.norm_act = nn.Sequential(nn.BatchNorm2d(8), nn.SiLU())  # a block of norms/activations only

        def forward(self, x):
            return self.norm_act(self.act(self.bn(self.conv(x)))).mean((2, 3)) + self.side(x).mean((1, 2, 3))[:, None]

    chain = SideConv()
    assert filter_owner(chain, "bn") == "conv"
    assert filter_owner(chain, "norm_act") == "conv"
    assert filter_owner(chain, "act") == "side"  # no declared channels, no trace: the nearest conv
    assert filter_owner(chain, "act", torch.randn(2, 3, 8, 8)) == "conv"  # traced: 8 channels, the conv with 8
    assert weight_layer_for(chain, "bn") == prune_target(chain, "bn") == "conv"
    gn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    assert filter_owner(gn, "1") == "0"  # GroupNorm: the conv, not the norm's own weight


def test_torchvision_resnet18_blocks():
    resnet = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    assert filter_owner(resnet, "layer1.0", x) == "layer1.0.conv2"  # identity shortcut: the main path's conv
    assert filter_owner(resnet, "layer2.0", x) == "layer2.0.downsample.0"  # the last conv: one residual group
    assert filter_owner(resnet, "layer2.0.bn1") == "layer2.0.conv1"
    assert filter_owner(resnet, "layer2.0.bn2") == "layer2.0.conv2"
    assert filter_owner(resnet, "layer2.0.downsample") == "layer2.0.downsample.0"
    assert filter_owner(resnet, "fc") == "fc"
    for layer in ("layer1.0", "layer2.0", "layer2.0.bn1", "layer4.1.bn2"):
        assert weight_layer_for(resnet, layer) == prune_target(resnet, layer, x)
    # The block's ReLU is one module called twice: ambiguous, refused with the layers to name instead.
    with pytest.raises(ValueError, match=r"'layer1\.0\.relu'.*called 2 times.*'layer1\.0\.conv2', 'layer1\.0\.bn2'"):
        filter_owner(resnet, "layer1.0.relu", x)


def test_concatenating_block_is_refused_with_choices():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    net = nn.Sequential(Concat(), nn.ReLU())
    x = torch.randn(1, 3, 4, 4)
    assert filter_owner(net, "0") == "0.b"  # untraced: the last conv inside
    with pytest.raises(ValueError, match=r"block '0'.*10 channels.*concatenates.*e\.g\. '0\.a', '0\.b'"):
        filter_owner(net, "0", x)


def test_layers_without_an_owner_are_refused_naming_valid_choices():
    net = SimpleCNN()
    with pytest.raises(ValueError, match=r"'flatten'.*Flatten.*channels to prune or score.*'conv1'"):
        filter_owner(net, "flatten")
    first = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match=r"conv or linear layer with 3 channels before '0'.*Valid choices include '1'\."):
        filter_owner(first, "0")
    with pytest.raises(ValueError, match="Softmax"):
        filter_owner(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Softmax(dim=1)), "1")
    with pytest.raises(ValueError, match="Closest valid choices: .conv3."):
        filter_owner(net, "conv9")


def test_list_layers_leaves_out_channels_last_outputs_and_accepts_a_batch():
    # ConvNeXt's blocks permute to (B, H, W, C) around their LayerNorm/Linear/GELU (issue 23): dim 1 is the map
    # height there. The oracle is torchvision's own module layout: CNBlock.block = [dwconv, Permute, LayerNorm,
    # Linear, GELU, Linear, Permute].
    torch.manual_seed(0)
    net = torchvision.models.convnext_tiny(weights=None, num_classes=4)
    x = torch.rand(2, 3, 32, 32)
    _, traced = trace_layers(net, x)
    block = "features.3.2.block"
    assert [traced[f"{block}.{i}"].channels_last for i in range(7)] == [False] + [True] * 5 + [False]
    assert traced[f"{block}.4"].shape == (2, 4, 4, 768)  # the GELU: 4 is the height, 768 = 4 x 192 channels
    listed = list_layers(net, (x, torch.zeros(2, dtype=torch.long)))  # a batch as the dataloader yields it
    assert listed == list_layers(net, x)
    assert f"{block}.4" not in listed and listed[f"{block}.0"] == 192 and listed["features.3.2"] == 192
    with pytest.raises(TypeError, match="Expected `example_inputs` to be a tensor the model accepts or a batch"):
        list_layers(net, "images")
