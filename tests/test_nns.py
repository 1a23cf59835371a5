"""lightning_interp.nns: filter, neuron and layer learning images (against Captum's InputXGradient and the
thesis' explicit construction of eqs. 3-1..3-14 written independently in NumPy), chunking, scan hygiene and
errors, knowledge quantity, the rectify default, pooled mode (images pooled onto a grid), the scan-mode
checks and ScanSpec, and sketch mode (random projections of the learning images, the vmapped and
replicated-batch forward-mode paths, sketched interpretable properties)."""

import gc
import weakref

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient
from torch import nn

from lightning_interp.layers import capture_output, get_layer, list_layers
from lightning_interp.metrics.tip import interpretable_properties
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
    sketch_learning_images,
    sketch_properties,
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


# ---- the thesis' explicit construction (eqs. 3-1..3-14), written independently in NumPy -----------------
# The oracle splits the input into one-pixel images (eqs. 3-1..3-3, 3-14), assigns them to the input
# neurons and pushes them along active paths: a neuron's image is the weighted sum of its inputs'
# images (eqs. 3-4, 3-5, 3-11, 3-13; bias excluded), zeroed when the ReLU is off (eqs. 3-6, 3-9,
# 3-10); a max-pool neuron takes the image of the unit it selects (3.2.3). Filter learning images
# combine neuron images weighted by the neuron values (eq. 5-2).


def split_input(x: np.ndarray) -> np.ndarray:
    """Eqs. 3-1..3-3 / 3-14: one one-pixel image per input neuron, shape (*x.shape, *x.shape)."""
    n = x.size
    images = np.zeros((n, n))
    for p in range(n):
        images[p, p] = x.flat[p]
    assert np.allclose(images.sum(0), x.ravel())  # eq. 3-1: the split images add up to the input
    return images.reshape(*x.shape, *x.shape)


def dense_images(prev_images: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Eqs. 3-4/3-5: I'_q = Σ_p w_qp I_p (bias excluded)."""
    n_in = weight.shape[1]
    flat = prev_images.reshape(n_in, -1)
    out = np.zeros((weight.shape[0], flat.shape[1]))
    for q in range(weight.shape[0]):
        for p in range(n_in):
            out[q] += weight[q, p] * flat[p]
    return out.reshape(weight.shape[0], *prev_images.shape[-(prev_images.ndim - 1):])


def gate(images: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Eqs. 3-6/3-9/3-10: a neuron's image is zero when its value is not positive."""
    s = (values > 0).astype(float)
    return images * s.reshape(s.shape + (1,) * (images.ndim - s.ndim))


def conv_images(prev_images: np.ndarray, weight: np.ndarray, padding: int) -> np.ndarray:
    """3.2.3: a conv neuron (k, i, j) is a dense neuron over its receptive field."""
    c_in, h, w = prev_images.shape[:3]
    k_out, _, kh, kw = weight.shape
    h_out, w_out = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    img_shape = prev_images.shape[3:]
    out = np.zeros((k_out, h_out, w_out, *img_shape))
    for k in range(k_out):
        for i in range(h_out):
            for j in range(w_out):
                for c in range(c_in):
                    for di in range(kh):
                        for dj in range(kw):
                            ii, jj = i + di - padding, j + dj - padding
                            if 0 <= ii < h and 0 <= jj < w:
                                out[k, i, j] += weight[k, c, di, dj] * prev_images[c, ii, jj]
    return out


def maxpool_images(prev_images: np.ndarray, values: np.ndarray, size: int):
    """3.2.3: a max-pool neuron takes, unchanged, the image of the unit it selects."""
    k, h, w = values.shape
    out_vals = np.zeros((k, h // size, w // size))
    out = np.zeros((k, h // size, w // size, *prev_images.shape[3:]))
    for c in range(k):
        for i in range(h // size):
            for j in range(w // size):
                window = values[c, i * size : (i + 1) * size, j * size : (j + 1) * size]
                a, b = np.unravel_index(np.argmax(window), window.shape)
                out_vals[c, i, j] = window[a, b]
                out[c, i, j] = prev_images[c, i * size + a, j * size + b]
    return out_vals, out


def filter_images_from_neurons(images: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Eq. 5-2: L^k = Σ_ij I_{k,ij} f_{k,ij}."""
    k = values.shape[0]
    v = values.reshape(k, -1)
    imgs = images.reshape(k, v.shape[1], -1)
    return np.einsum("kn,knp->kp", v, imgs).reshape(k, *images.shape[values.ndim:])


class FCNet(nn.Module):
    def __init__(self, d=12, h=(9, 7), out=4):
        super().__init__()
        self.fc1, self.relu1 = nn.Linear(d, h[0]), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(h[0], h[1]), nn.ReLU()
        self.fc3 = nn.Linear(h[1], out)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.pool = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.flatten, self.fc = nn.Flatten(), nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        return self.fc(self.flatten(self.relu2(self.conv2(x))))


def np_(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fully_connected_every_neuron_and_filter(seed):
    torch.manual_seed(seed)
    net = FCNet().double()
    x = torch.randn(3, 12, dtype=torch.float64)
    for b in range(3):
        xb = np_(x[b])
        i0 = split_input(xb)  # (12, 12)
        z1 = np_(net.fc1.weight) @ xb + np_(net.fc1.bias)
        i1_lin = dense_images(i0, np_(net.fc1.weight))
        i1 = gate(i1_lin, z1)
        a1 = np.maximum(z1, 0)
        z2 = np_(net.fc2.weight) @ a1 + np_(net.fc2.bias)
        i2_lin = dense_images(i1, np_(net.fc2.weight))
        i2 = gate(i2_lin, z2)
        z3 = np_(net.fc3.weight) @ np.maximum(z2, 0) + np_(net.fc3.bias)
        i3 = dense_images(i2, np_(net.fc3.weight))
        cases = [
            ("fc1", False, i1_lin, z1), ("relu1", False, i1, a1), ("fc1", True, i1, a1),
            ("fc2", False, i2_lin, z2), ("fc2", True, i2, np.maximum(z2, 0)), ("fc3", False, i3, z3),
        ]
        for layer, rectify, oracle, values in cases:
            units = [(q,) for q in range(values.shape[0])]
            got = neuron_learning_images(net, layer, x, units, rectify=rectify)[b]
            np.testing.assert_allclose(np_(got), oracle, atol=1e-12, err_msg=f"{layer} neurons")
            got_f = filter_learning_images(net, layer, x, rectify=rectify)[b]
            np.testing.assert_allclose(
                np_(got_f), filter_images_from_neurons(oracle, values), atol=1e-12, err_msg=f"{layer} filters"
            )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_maxpool_linear_every_neuron_and_filter(seed):
    torch.manual_seed(seed)
    net = ConvNet().double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    for b in range(2):
        xb = np_(x[b])
        i0 = split_input(xb)  # (2, 6, 6, 2, 6, 6)
        z1 = np_(net.conv1(x[b : b + 1])[0])
        i1_lin = conv_images(i0, np_(net.conv1.weight), padding=1)
        i1 = gate(i1_lin, z1)
        p_vals, p_imgs = maxpool_images(i1, np.maximum(z1, 0), 2)
        z2 = np_(net.conv2(torch.from_numpy(p_vals)[None])[0])
        i2_lin = conv_images(p_imgs, np_(net.conv2.weight), padding=1)
        i2 = gate(i2_lin, z2)
        a2 = np.maximum(z2, 0)
        z3 = np_(net.fc.weight) @ a2.ravel() + np_(net.fc.bias)
        i3 = dense_images(i2.reshape(-1, *xb.shape), np_(net.fc.weight))
        cases = [
            ("conv1", False, i1_lin, z1), ("relu1", False, i1, np.maximum(z1, 0)), ("pool", False, p_imgs, p_vals),
            ("conv2", True, i2, a2), ("relu2", False, i2, a2), ("fc", False, i3, z3),
        ]
        for layer, rectify, oracle, values in cases:
            units = [tuple(idx) for idx in np.ndindex(values.shape)]
            got = neuron_learning_images(net, layer, x, units, rectify=rectify)[b]
            np.testing.assert_allclose(
                np_(got), oracle.reshape(len(units), *xb.shape), atol=1e-12, err_msg=f"{layer} neurons"
            )
            got_f = filter_learning_images(net, layer, x, rectify=rectify)[b]
            expected = filter_images_from_neurons(oracle, values)
            np.testing.assert_allclose(np_(got_f), expected, atol=1e-12, err_msg=f"{layer} filters")
            np.testing.assert_allclose(
                np_(layer_learning_image(net, layer, x, rectify=rectify)[b]), expected.sum(0), atol=1e-12
            )


# ---- sketch mode: random projections of the learning images, from forward-mode products ---------------


def resnet_with_statistics():
    torch.manual_seed(0)
    model = resnet18_cifar().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


CASES = [
    (lambda: SimpleCNN(in_channels=3).double(), "conv3", True, (3, 3, 16, 16)),
    (lambda: LeNet5().double(), "relu3", False, (2, 1, 32, 32)),
    (resnet_with_statistics, "layer2.1.bn2", True, (2, 3, 16, 16)),
]


@pytest.mark.parametrize("make,layer,rectify,shape", CASES)
def test_sketch_projections_equal_projected_exact_images(make, layer, rectify, shape):
    model = make().train()
    x = torch.randn(*shape, dtype=torch.float64)
    exact = filter_learning_images(model, layer, x, rectify=rectify)
    proj, r = sketch_learning_images(model, layer, x, num_projections=6, seed=3, rectify=rectify, return_directions=True)
    assert proj.shape == (shape[0], exact.shape[1], 6) and r.shape == (6, *shape[1:])
    torch.testing.assert_close(proj, torch.einsum("bk...,p...->bkp", exact, r), atol=1e-6, rtol=1e-6)
    per, rs = sketch_learning_images(model, layer, x, num_projections=4, rectify=rectify, per_sample=True,
                                     return_directions=True, chunk_size=3)
    assert rs.shape == (shape[0], 4, *shape[1:])
    torch.testing.assert_close(per, torch.einsum("bk...,bp...->bkp", exact, rs), atol=1e-6, rtol=1e-6)
    assert model.training, "mode restored"
    assert not any("forward" in vars(m) for m in model.modules()), "BatchNorm forwards restored"


@pytest.mark.parametrize("make,layer,rectify,shape", CASES)
def test_vmap_and_dual_forward_modes_agree(make, layer, rectify, shape):
    # The vmapped torch.func.jvp (default) against the replicated-batch forward_ad path it replaced.
    from lightning_interp.nns import _elementwise_eval_batchnorm, _jvp_projections, scan_mode

    model = make().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    tangents = torch.randn(shape[0], 5, *shape[1:], dtype=torch.float64)
    with scan_mode(model), torch.no_grad(), _elementwise_eval_batchnorm(model):
        got = _jvp_projections(model, layer, x, tangents, rectify, 2, impl="vmap")
        ref = _jvp_projections(model, layer, x, tangents, rectify, 5, impl="dual")
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match=r"\['vmap', 'dual'\]"):
        _jvp_projections(model, layer, x, tangents, rectify, 2, impl="loop")


@pytest.mark.parametrize("make,layer,rectify,shape", CASES)
def test_sketch_mean_and_covariance_are_exact(make, layer, rectify, shape):
    model = make().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    mask = torch.rand(shape[0], 1, *shape[2:]) > 0.5
    exact = interpretable_properties(filter_learning_images(model, layer, x, rectify=rectify), x, mask)
    sketch = sketch_properties(model, layer, x, mask, num_projections=4, rectify=rectify)
    for name in ("mean", "covariance", "fg_mean", "fg_covariance", "bg_mean", "bg_covariance"):
        torch.testing.assert_close(sketch[name], exact[name], atol=1e-10, rtol=1e-8, msg=name)
    assert all(torch.isfinite(v).all() for v in sketch.values())


def test_hutchinson_variance_converges():
    torch.manual_seed(0)
    model = SimpleCNN(in_channels=1, width=(4, 8, 8)).double()
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    exact = interpretable_properties(filter_learning_images(model, "relu2", x), x)["variance"]
    errors = []
    for p in (8, 512):
        est = sketch_properties(model, "relu2", x, num_projections=p, seed=1)["variance"]
        errors.append(((est - exact).abs() / exact.clamp_min(1e-12)).median().item())
    assert errors[1] < errors[0] and errors[1] < 0.15


class _ChannelsLastInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SimpleCNN(in_channels=3, width=(4, 8, 8)).double().to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.net(x.contiguous(memory_format=torch.channels_last))


def test_ops_vmap_cannot_batch_fall_back_to_forward_ad():
    # A channels_last clone has no vmap batching rule: the replicated-batch path takes over, same values.
    torch.manual_seed(0)
    model = _ChannelsLastInside().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    exact = filter_learning_images(model, "net.relu3", x, rectify=True)
    with pytest.warns(UserWarning, match="replicated-batch"):
        proj, r = sketch_learning_images(model, "net.relu3", x, num_projections=5, rectify=True, return_directions=True)
    torch.testing.assert_close(proj, torch.einsum("bk...,p...->bkp", exact, r), atol=1e-6, rtol=1e-6)


def test_sketch_properties_per_sample_directions_are_hutchinson_by_hand():
    torch.manual_seed(0)
    model = SimpleCNN(in_channels=3).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    shared = sketch_properties(model, "relu3", x, num_projections=5, seed=7)
    own = sketch_properties(model, "relu3", x, num_projections=5, seed=7, per_sample=True)
    for name in ("mean", "covariance"):  # exact either way
        torch.testing.assert_close(own[name], shared[name])
    # Oracle: directions drawn as documented, one set per sample, against exact learning images.
    r = torch.Generator().manual_seed(7)
    r = (torch.randint(0, 2, (3 * 5, 3, 16, 16), generator=r).double() * 2 - 1).view(3, 5, -1)
    li = filter_learning_images(model, "relu3", x).flatten(2)  # (B, K, E)
    sq = (torch.einsum("bpe,bke->bkp", r, li) ** 2).mean(-1) / li.shape[-1]
    torch.testing.assert_close(own["variance"], (sq - li.mean(-1) ** 2).clamp_min(0))


def test_sample_indices_and_neurons_are_one_seeded_subsample():
    from lightning_interp.nns import sample_indices, sample_neurons

    assert torch.equal(sample_indices(10, None), torch.arange(10))
    assert torch.equal(sample_indices(10, 10), torch.arange(10))
    want = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:6].sort().values
    assert torch.equal(sample_indices(50, 6, seed=7), want)
    # Row-major unravel of the same indices, as (channel, i, j) of a K x H x W output.
    assert sample_neurons((2, 5, 5), 6, seed=7) == [(i // 25, i % 25 // 5, i % 5) for i in want.tolist()]
    assert sample_neurons((4,), None) == [(0,), (1,), (2,), (3,)]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="`max_neurons`"):
            sample_indices(10, bad)


def test_knowledge_quantity_reduction_lets_a_monitor_keep_images_from_the_same_pass():
    from lightning_interp.nns import iter_filter_learning_images, reduce_knowledge_quantity

    torch.manual_seed(0)
    net = SimpleCNN(in_channels=1).eval()
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    filters, shown = [5, 1, 7, 2, 0], [5, 2]
    kept = {}

    def keep(chunks):
        for idx, li in chunks:
            kept.update({c: li[:3, j] for j, c in enumerate(idx.tolist()) if c in shown})
            yield idx, li

    chunks = iter_filter_learning_images(net, "relu2", x, filters=filters, chunk_size=2)
    got = reduce_knowledge_quantity(keep(chunks), x)
    assert got == filter_knowledge_quantity(net, "relu2", x, filters=filters, chunk_size=2)
    ref = filter_learning_images(net, "relu2", x[:3], filters=shown)
    for j, c in enumerate(shown):
        torch.testing.assert_close(kept[c], ref[:, j])
    bad = [(torch.tensor([0]), torch.full((6, 1, 1, 16, 16), float("nan")))]
    with pytest.raises(FloatingPointError, match="images of relu9"):
        reduce_knowledge_quantity(bad, x, what="images of relu9")
