import gc
import weakref

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient
from torch import nn

from lightning_interp.layers import capture_output, get_layer, list_layers
from lightning_interp.models import LeNet5, SimpleCNN, resnet18_cifar
from lightning_interp.nns import (
    SCAN_MODES,
    check_scan_mode,
    filter_knowledge_quantity,
    filter_learning_images,
    knowledge_quantity,
    layer_activations,
    layer_knowledge_quantity,
    layer_learning_image,
    neuron_learning_images,
    pooled_learning_images,
    pooling_basis,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class HalfSquaredFilter(nn.Module):
    """½ Σ_ij f_k² of one layer's channel as a scalar model output, for Captum."""

    def __init__(self, model, layer, k, rectify=False):
        super().__init__()
        self.model, self.layer, self.k, self.rectify = model, layer, k, rectify

    def forward(self, x):
        with capture_output(get_layer(self.model, self.layer), self.layer) as store:
            self.model(x)
        f = store["output"][:, self.k]
        f = torch.relu(f) if self.rectify else f
        return (0.5 * f**2).flatten(1).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = resnet18_cifar().double()
    # Non-trivial running statistics, so eval-mode BatchNorm is not the identity.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32, dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize(
    "layer,rectify,filters",
    [("layer4.1.conv2", False, [0, 77, 511]), ("layer2.0.bn1", True, [3, 64, 127]),
     ("layer3.1", False, [5, 200]), ("conv1", True, [0, 63])],
)
def test_filter_learning_images_equal_captum_input_x_gradient(resnet, layer, rectify, filters):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    got = filter_learning_images(resnet, layer, x, filters=filters, rectify=rectify)
    assert got.shape == (3, len(filters), 3, 32, 32)
    for j, k in enumerate(filters):
        ref = InputXGradient(HalfSquaredFilter(resnet, layer, k, rectify)).attribute(x.clone(), target=0)
        torch.testing.assert_close(got[:, j], ref, rtol=1e-9, atol=1e-12)


def test_resnet_shared_relu_is_refused_with_advice(resnet):
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than once.*rectify=True"):
        filter_learning_images(resnet, "layer1.0.relu", x, filters=[0])
    assert "layer1.0.relu" not in list_layers(resnet, x)
    assert list_layers(resnet, x)["layer4.1.conv2"] == 512


@pytest.mark.parametrize("device", DEVICES)
def test_chunking_and_layer_image_agree(device):
    torch.manual_seed(0)
    model = SimpleCNN(in_channels=3).double().to(device)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=device)
    full = filter_learning_images(model, "conv2", x, rectify=True)
    one = filter_learning_images(model, "conv2", x, rectify=True, chunk_size=1)
    seven = filter_learning_images(model, "conv2", x, rectify=True, chunk_size=7)
    torch.testing.assert_close(full, one)
    torch.testing.assert_close(full, seven)
    torch.testing.assert_close(full.sum(1), layer_learning_image(model, "conv2", x, rectify=True))
    picked = filter_learning_images(model, "conv2", x, rectify=True, filters=[9, 2])
    torch.testing.assert_close(picked, full[:, [9, 2]])
    # Batch independence: samples are scanned in eval mode, so splitting the batch changes nothing.
    torch.testing.assert_close(full[2:], filter_learning_images(model, "conv2", x[2:], rectify=True))
    assert full.device.type == device


def test_flat_vector_inputs_and_lenet():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(5, 20, dtype=torch.float64)
    li = filter_learning_images(mlp, "1", x)
    assert li.shape == (5, 16, 20)
    # A Linear unit's filter image is its neuron image times its value (1x1 map).
    neurons = neuron_learning_images(mlp, "1", x, [(k,) for k in range(16)])
    values = layer_activations(mlp, "1", x)
    torch.testing.assert_close(li, neurons * values[:, :, None])
    lenet = LeNet5(image_size=28).double()
    xl = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    assert filter_learning_images(lenet, "relu2", xl).shape == (2, 16, 1, 28, 28)
    assert neuron_learning_images(lenet, "fc2", xl, [(0,), (83,)]).shape == (2, 2, 1, 28, 28)


def test_scan_hygiene_mode_grads_graph_and_inference_mode():
    torch.manual_seed(0)
    model = SimpleCNN()
    model.train()
    x = torch.randn(3, 1, 16, 16)
    saved = []

    def pack(t):
        # Keep a detached alias (no grad_fn, so no reference cycle through the graph) and watch it.
        alias = t.detach()
        saved.append(weakref.ref(alias))
        return alias

    params = {p.data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = filter_learning_images(model, "relu2", x)
        neuron_learning_images(model, "conv3", x, [(0, 1, 1)])
        layer_learning_image(model, "relu3", x)
    assert model.training, "the caller's train mode must be restored"
    assert all(p.grad is None for p in model.parameters())
    assert not out.requires_grad and out.grad_fn is None
    gc.collect()
    alive = [r() for r in saved if r() is not None and r().data_ptr() not in params]
    assert saved and not alive, f"{len(alive)} saved activations outlived the scan"

    model.eval()
    with torch.inference_mode():
        xi = torch.randn(3, 1, 16, 16)
        inside = filter_learning_images(model, "relu2", xi)
    with torch.no_grad():
        inside_ng = filter_learning_images(model, "relu2", xi.clone())
    torch.testing.assert_close(inside, inside_ng)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_scan_restores_mode_after_an_error():
    model = SimpleCNN().train()
    with pytest.raises(ValueError):
        filter_learning_images(model, "relu2", torch.randn(1, 1, 16, 16), filters=[64])
    assert model.training


def test_bad_inputs_have_clear_errors():
    model = SimpleCNN()
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"'conv2'"):
        filter_learning_images(model, "cnv2", x)
    with pytest.raises(ValueError, match="list_layers"):
        get_layer(model, "nothing.like.this")
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\) or \(B, D\)"):
        filter_learning_images(model, "conv2", torch.randn(16))
    with pytest.raises(ValueError, match="empty batch"):
        filter_learning_images(model, "conv2", torch.randn(0, 1, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        filter_learning_images(model, "conv2", torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        filter_learning_images(model, "conv2", x, filters=[64])
    with pytest.raises(ValueError, match=r"\(channel, i, j\)"):
        neuron_learning_images(model, "conv2", x, [(1,)])
    with pytest.raises(ValueError, match="within the unit grid"):
        neuron_learning_images(model, "conv2", x, [(1, 8, 0)])


def test_knowledge_quantity_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 5, 5)) * (rng.random((3, 2, 5, 5)) > 0.3)
    li = rng.standard_normal((3, 4, 2, 5, 5)) * (rng.random((3, 4, 2, 5, 5)) > 0.6)
    kq = knowledge_quantity(torch.from_numpy(li), torch.from_numpy(x))
    for b in range(3):
        for k in range(4):
            count = np.count_nonzero(li[b, k]) / np.count_nonzero(x[b])
            intensity = np.abs(li[b, k]).sum() / np.abs(x[b]).sum()
            assert kq.activation_count[b, k].item() == pytest.approx(count)
            assert kq.activation_intensity[b, k].item() == pytest.approx(intensity)
    zero = knowledge_quantity(torch.from_numpy(li), torch.zeros(3, 2, 5, 5, dtype=torch.float64))
    assert torch.all(zero.activation_count == 0) and torch.all(zero.activation_intensity == 0)
    with pytest.raises(ValueError, match="Expected `learning_images` of shape"):
        knowledge_quantity(torch.from_numpy(li)[:, 0], torch.from_numpy(x))


def test_layer_knowledge_quantity_is_the_thesis_mean_over_all_neurons():
    # 1x1 conv + ReLU: neuron (k, i, j)'s learning image is x_ij·w_k at (i, j) alone, when active.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU()).double()
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    w, b = net[0].weight.detach().numpy().reshape(-1), net[0].bias.detach().numpy()
    xs = x[:, 0].numpy()
    counts, intensities = [], []
    for i in range(4):
        for k in range(3):
            active = w[k] * xs[i] + b[k] > 0
            for r in range(5):
                for c in range(5):
                    on = active[r, c] and xs[i, r, c] != 0
                    counts.append(on / np.count_nonzero(xs[i]))
                    intensities.append(on * abs(xs[i, r, c] * w[k]) / np.abs(xs[i]).sum())
    got = layer_knowledge_quantity(net, "0", x, rectify=True, max_neurons=None)
    assert got["neurons"] == 75
    assert got["activation_count"] == pytest.approx(np.mean(counts))
    assert got["activation_intensity"] == pytest.approx(np.mean(intensities))
    assert layer_knowledge_quantity(net, "0", x, rectify=True, max_neurons=10)["neurons"] == 10


def test_filter_knowledge_quantity_is_the_mean_over_samples_and_filters():
    # 1x1 conv + ReLU: L^k(x) = x ⊙ w_k f_k with f_k = ReLU(w_k x + b_k) (eq. 5-2), in closed form.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU()).double()
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    w, b = net[0].weight.detach().numpy().reshape(-1), net[0].bias.detach().numpy()
    xs = x[:, 0].numpy()
    for filters in (None, [2, 0]):
        chosen = range(3) if filters is None else filters
        counts, intensities = [], []
        for i in range(4):
            for k in chosen:
                image = xs[i] * w[k] * np.maximum(w[k] * xs[i] + b[k], 0)
                counts.append(np.count_nonzero(image) / np.count_nonzero(xs[i]))
                intensities.append(np.abs(image).sum() / np.abs(xs[i]).sum())
        got = filter_knowledge_quantity(net, "0", x, filters=filters, chunk_size=2)  # rectify: the default
        assert got["filters"] == len(chosen)
        assert got["activation_count"] == pytest.approx(np.mean(counts))
        assert got["activation_intensity"] == pytest.approx(np.mean(intensities))


def test_scans_give_every_submodule_its_own_mode_back():
    model = SimpleCNN(batch_norm=True).train()
    model.bn1.eval()  # frozen by the user inside a training network
    x = torch.randn(2, 1, 16, 16)
    for scan in (lambda: filter_learning_images(model, "relu2", x), lambda: layer_activations(model, "relu3", x),
                 lambda: filter_knowledge_quantity(model, "relu2", x, filters=[0, 1])):
        scan()
        assert model.training and model.bn2.training and not model.bn1.training


def test_list_layers_static_and_traced():
    model = SimpleCNN()
    static = list_layers(model)
    assert static == {"conv1": 32, "conv2": 64, "conv3": 64, "fc1": 64, "fc2": 10}
    traced = list_layers(model, torch.randn(1, 1, 16, 16))
    assert traced["relu2"] == 64 and traced["pool1"] == 32 and traced["fc1"] == 64
    assert model.training


def test_rectify_defaults_to_true_everywhere():
    # One default (the thesis' "conv layer = convolution + activation") in every scan function and monitor.
    import importlib
    import inspect
    import pkgutil

    import lightning_interp

    found = []
    for info in pkgutil.walk_packages(lightning_interp.__path__, "lightning_interp."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name or not callable(obj):
                continue
            try:
                param = inspect.signature(obj).parameters.get("rectify")
            except (TypeError, ValueError):
                continue
            if param is not None and param.default is not inspect.Parameter.empty:
                found.append((f"{info.name}.{name}", param.default))
    assert len(found) > 15
    assert [n for n, default in found if default is not True] == []


# ---- pooled mode: learning images pooled onto a fixed grid, from forward-mode products ------------------


def _bn_cnn():
    model = SimpleCNN(in_channels=3, batch_norm=True).double().eval()
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return model


@pytest.mark.parametrize("grid", [2, 3, (2, 4)])
@pytest.mark.parametrize("layer", ["conv2", "relu3"])
def test_pooled_learning_images_equal_exact_images_pooled_by_hand(layer, grid):
    model = _bn_cnn()
    x = torch.randn(4, 3, 18, 18, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 18: cells overlap at 4
    pooled = pooled_learning_images(model, layer, x, grid=grid)
    exact = filter_learning_images(model, layer, x)  # (B, K, C, H, W)
    # Oracle: the channel sum of each exact image, averaged over adaptive_avg_pool2d's cells.
    oracle = torch.nn.functional.adaptive_avg_pool2d(exact.sum(2), grid).flatten(2)
    assert pooled.shape == oracle.shape
    torch.testing.assert_close(pooled, oracle, rtol=1e-9, atol=1e-12)
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_pooled_learning_images_of_vectors_and_one_cell():
    model = nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = filter_learning_images(model, "1", x)  # (B, 7, 12)
    pooled = pooled_learning_images(model, "1", x, grid=3)
    torch.testing.assert_close(pooled, exact.view(5, 7, 3, 4).mean(-1))
    # One cell: the mean of the whole learning image (TIP's P_m, eq. 5-7), channels summed.
    cnn = _bn_cnn()
    xi = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    whole = pooled_learning_images(cnn, "relu3", xi, grid=1)
    torch.testing.assert_close(whole[..., 0], filter_learning_images(cnn, "relu3", xi).sum(2).mean((2, 3)))


def test_pooling_basis_is_adaptive_average_pooling():
    basis = pooling_basis((2, 7, 5), (3, 2), dtype=torch.float64)  # (6, 2, 7, 5)
    image = torch.randn(2, 7, 5, dtype=torch.float64)
    reference = torch.nn.functional.adaptive_avg_pool2d(image.sum(0, keepdim=True), (3, 2)).flatten()
    torch.testing.assert_close((basis * image).flatten(1).sum(1), reference)
    with pytest.raises(ValueError, match="grid"):
        pooling_basis((3, 4, 4), 0)
    with pytest.raises(ValueError, match="no finer"):
        pooling_basis((3, 4, 4), 5)


def test_scan_modes_are_checked_in_one_place():
    assert check_scan_mode("pooled") == "pooled"
    assert set(SCAN_MODES) == {"exact", "sketch", "pooled"}
    with pytest.raises(ValueError, match=r"Expected `mode` to be one of \['exact', 'sketch', 'pooled'\] but got 'fast'"):
        check_scan_mode("fast")


def test_scan_spec_is_validated_once():
    from lightning_interp.nns import ScanSpec

    assert ScanSpec(mode="pooled", grid=[2, 3]).grid == (2, 3)
    for bad, error, match in (
        (dict(mode="fast"), ValueError, r"\['exact', 'sketch', 'pooled'\]"),
        (dict(num_projections=1), ValueError, "num_projections"),
        (dict(grid=0), ValueError, "grid"),
        (dict(grid=(2, True)), ValueError, "grid"),
        (dict(rectify=1), TypeError, "rectify"),
    ):
        with pytest.raises(error, match=match):
            ScanSpec(**bad)
