"""NNS against the thesis' explicit construction (eqs. 3-1..3-14), written independently in NumPy.

The oracle splits the input into one-pixel images (eqs. 3-1..3-3, 3-14), assigns them to the input
neurons and pushes them along active paths: a neuron's image is the weighted sum of its inputs'
images (eqs. 3-4, 3-5, 3-11, 3-13; bias excluded), zeroed when the ReLU is off (eqs. 3-6, 3-9,
3-10); a max-pool neuron takes the image of the unit it selects (3.2.3). Filter learning images
combine neuron images weighted by the neuron values (eq. 5-2).
"""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp.nns import filter_learning_images, layer_learning_image, neuron_learning_images


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
