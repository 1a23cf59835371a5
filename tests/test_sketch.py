import pytest
import torch
from conftest import make_trainer
from torch import nn

from lightning_interp.callbacks import AnomalyFilterMonitor, TIPMonitor
from lightning_interp.metrics.tip import interpretable_properties
from lightning_interp.models import ImageClassifier, LeNet5, SimpleCNN, resnet18_cifar
from lightning_interp.nns import filter_learning_images, sketch_learning_images, sketch_properties


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


def test_monitors_run_in_sketch_mode(tmp_path, digits):
    module = ImageClassifier(SimpleCNN(width=(4, 8, 8)))
    anomaly = AnomalyFilterMonitor("model.relu3", probe_size=48, k_max=4, mode="sketch", num_projections=16)
    tip = TIPMonitor("model.relu3", probe_size=16, mode="sketch", num_projections=8, aipc_fractions=[1.0], top_filters=0)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[anomaly, tip], max_epochs=1)
    trainer.fit(module, datamodule=digits)
    assert "interp/anomaly/count" in anomaly.history[0]
    assert "interp/tip/model.relu3/fg_covariance" in tip.history[0]
    with pytest.raises(ValueError, match="mode"):
        AnomalyFilterMonitor("model.relu3", mode="fast")


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
