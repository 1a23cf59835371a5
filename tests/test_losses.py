"""lightning_interp.losses: every key names its function (``<key>_loss``), ``cam_background`` is the
unnormalised background evidence, and the old names still work for one release with a FutureWarning; every loss passes gradcheck in the input and
in the weights, and the background evidence equals its construction written out pixel by pixel."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp import losses
from lightning_interp.batch import Batch, default_batch_adapter
from lightning_interp.callbacks import AttentionGuidance
from lightning_interp.cam import grad_cam
from lightning_interp.layers import capture_output
from lightning_interp.losses import (
    LOSSES,
    attention_mining_loss,
    attention_supervision_loss,
    cam_background_loss,
    cam_background_share_loss,
    canonical_weights,
    class_evidence_maps,
    guidance_terms,
    rrr_loss,
)
from lightning_interp.models import SimpleCNN

torch.set_num_threads(1)


def pooled_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 1:4, 2:5] = True
    mask[2] = False  # a sample with no foreground
    return Batch(x, torch.tensor([0, 1, 2, 0]), mask)


def numpy_background_evidence(net: nn.Sequential, b: Batch) -> tuple[float, float]:
    """Global average pooling then a linear layer: ∂z_c/∂A_k = W_ck / (h·w), so S_c = Σ_k A_k W_ck / (h·w)."""
    with torch.no_grad():
        a = net[1](net[0](b.x)).numpy()  # B x K x h x w
    w = net[4].weight.detach().numpy()  # C x K
    s = np.einsum("bkij,ck->bcij", a, w) / (a.shape[2] * a.shape[3])
    bg = ~b.mask[:, 0].numpy()  # 1x1 conv: the layer grid is the pixel grid
    on_bg = (s**2 * bg[:, None]).sum((2, 3))  # B x C
    raw = on_bg.mean()
    share = np.mean(on_bg.sum(1) / ((s**2).sum((1, 2, 3)) + 1e-8))
    return float(raw), float(share)


def test_every_key_is_computed_by_the_function_named_after_it():
    net, b = pooled_net(), batch()
    with capture_output(net[1], "1") as store:
        logits = net(b.x)
    raw, share = numpy_background_evidence(net, b)
    assert cam_background_loss(store["output"], logits, b.mask).item() == pytest.approx(raw)
    assert cam_background_share_loss(store["output"], logits, b.mask).item() == pytest.approx(share)
    assert raw != pytest.approx(share)
    terms = guidance_terms(net, "1", b, {"cam_background": 1.0, "cam_background_share": 1.0})
    assert terms["cam_background"].item() == pytest.approx(raw)
    assert terms["cam_background_share"].item() == pytest.approx(share)
    for key in LOSSES:
        assert callable(getattr(losses, f"{key}_loss")), key


def test_all_five_terms_come_back_under_their_keys():
    model = SimpleCNN(in_channels=3, num_classes=3, width=(4, 6, 6)).double().eval()
    b = batch()
    terms = guidance_terms(model, "relu2", b, dict.fromkeys(LOSSES, 1.0))
    assert sorted(terms) == sorted(LOSSES)
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())


def test_the_old_key_is_a_deprecated_alias_of_cam_background():
    net, b = pooled_net(), batch()
    with pytest.warns(FutureWarning, match="'cam_background_raw' is deprecated.*use 'cam_background'"):
        terms = guidance_terms(net, "1", b, {"cam_background_raw": 1.0})
    assert list(terms) == ["cam_background"]
    assert terms["cam_background"].item() == pytest.approx(numpy_background_evidence(net, b)[0])
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="both"):
        canonical_weights({"cam_background_raw": 1.0, "cam_background": 2.0})
    with pytest.warns(FutureWarning, match="use 'cam_background'"):
        guidance = AttentionGuidance("model.relu3", {"cam_background_raw": 2.0, "rrr": 1.0})
    assert guidance.weights == {"cam_background": 2.0, "rrr": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert canonical_weights({"cam_background": 1.0}) == {"cam_background": 1.0}


def test_the_old_function_names_warn_and_give_the_same_values():
    net, b = pooled_net(), batch()
    with capture_output(net[1], "1") as store:
        logits = net(b.x)
    a = store["output"]
    with pytest.warns(FutureWarning, match="cam_background_penalty.*use `cam_background_loss`"):
        old_raw = losses.cam_background_penalty(a, logits, b.mask)
    with pytest.warns(FutureWarning, match="use `cam_background_share_loss`"):
        old_share = losses.cam_background_penalty(a, logits, b.mask, normalize=True)
    torch.testing.assert_close(old_raw, cam_background_loss(a, logits, b.mask))
    torch.testing.assert_close(old_share, cam_background_share_loss(a, logits, b.mask))
    irrelevant = ~b.mask
    with pytest.warns(FutureWarning, match="use `rrr_loss`"):
        torch.testing.assert_close(losses.rrr_input_gradient_penalty(net, b.x, irrelevant),
                                   losses.rrr_loss(net, b.x, irrelevant))
    cam = torch.rand(4, 6, 6, dtype=torch.float64)
    with pytest.warns(FutureWarning, match="use `attention_mining_loss`"):
        torch.testing.assert_close(losses.gain_attention_mining_loss(net, b.x, cam, b.y),
                                   losses.attention_mining_loss(net, b.x, cam, b.y))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.Softplus()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_losses_pass_gradcheck():
    torch.manual_seed(0)
    net = Tiny().double()
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[:, :, 1:4, 1:4] = True

    def mining(inp):
        return attention_mining_loss(net, inp, grad_cam(net, "act", inp, y, create_graph=True), y)

    def supervision(inp):
        return attention_supervision_loss(grad_cam(net, "act", inp, y, create_graph=True), mask)

    def rrr(inp):
        return rrr_loss(net, inp, ~mask)

    for fn in (mining, supervision, rrr):
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5), fn.__name__
    # ... and in the parameters, which is what training uses (double backward through the net).
    def mining_in_weight(w):
        functional = copy.deepcopy(net)
        del functional.conv.weight
        functional.conv.weight = w  # a plain tensor: the loss becomes a function of it
        cam = grad_cam(functional, "act", x.detach(), y, create_graph=True)
        return attention_mining_loss(functional, x.detach(), cam, y)

    weight = net.conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(mining_in_weight, (weight,), eps=1e-6, atol=1e-5)


def _penalty_of(net, layer, inp, mask, normalize):
    with capture_output(getattr(net, layer), layer) as store:
        logits = net(inp)
    return (cam_background_share_loss if normalize else cam_background_loss)(store["output"], logits, mask)


@pytest.mark.parametrize("normalize", [True, False])
def test_cam_background_penalty_passes_gradcheck(normalize):
    torch.manual_seed(0)
    net = Tiny().double()
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[:, :, 1:4, 1:4] = True
    assert torch.autograd.gradcheck(lambda inp: _penalty_of(net, "act", inp, mask, normalize), (x,), eps=1e-6, atol=1e-5)

    def in_weight(w):  # in the parameters, which is what training uses (double backward)
        functional = copy.deepcopy(net)
        del functional.conv.weight
        functional.conv.weight = w
        return _penalty_of(functional, "act", x.detach(), mask, normalize)

    weight = net.conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(in_weight, (weight,), eps=1e-6, atol=1e-5)


def test_class_evidence_maps_sum_to_the_logits_for_global_pooling():
    # GAP + linear: ∂z_c/∂A_k = W_ck / (h·w), so Σ_cells S_c = z_c − b_c (signed, all classes).
    torch.manual_seed(0)
    net = Tiny().double()
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    with capture_output(net.act, "act") as store:
        logits = net(x)
    s = class_evidence_maps(store["output"], logits)
    assert s.shape == (3, 2, 5, 5)
    torch.testing.assert_close(s.sum((2, 3)), logits - net.fc.bias)


@pytest.mark.parametrize("normalize", [True, False])
def test_cam_background_penalty_equals_explicit_construction(normalize):
    # One sample and one class at a time, and the background cells found by looping over the pixels.
    torch.manual_seed(0)
    model = SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)).double().eval()
    with torch.no_grad():
        model.conv2.bias.fill_(0.1)
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    mask = torch.rand(5, 1, 16, 16) > 0.93
    mask[0] = False
    mask[1, :, 3:9, 5:11] = True
    with capture_output(model.relu2, "relu2") as store:
        logits = model(x)
    ours = (cam_background_share_loss if normalize else cam_background_loss)(store["output"], logits, mask)
    terms = guidance_terms(model, "relu2", default_batch_adapter({"image": x, "label": logits.argmax(1), "mask": mask}),
                           {"cam_background_share" if normalize else "cam_background": 1.0})
    torch.testing.assert_close(next(iter(terms.values())), ours)
    per_sample = []
    for b in range(5):
        bg_sq, all_sq = [], []
        for c in range(4):
            with capture_output(model.relu2, "relu2") as store:
                z = model(x[b : b + 1])
            (g,) = torch.autograd.grad(z[0, c], store["output"])
            s = (store["output"][0] * g[0]).sum(0)  # 8 x 8 (relu2 of a 16 x 16 input)
            h, w = s.shape
            fh, fw = 16 // h, 16 // w
            bg = torch.tensor([[not mask[b, 0, i * fh : (i + 1) * fh, j * fw : (j + 1) * fw].any() for j in range(w)]
                               for i in range(h)], dtype=torch.float64)
            bg_sq.append((bg * s**2).sum())
            all_sq.append((s**2).sum())
        per_sample.append(sum(bg_sq) / (sum(all_sq) + 1e-8) if normalize else sum(bg_sq) / 4)
    torch.testing.assert_close(ours.detach(), torch.stack(per_sample).mean())


def test_the_changed_cam_background_key_warns_once(monkeypatch):
    import warnings

    import lightning_interp.losses as losses

    monkeypatch.setattr(losses, "_WARNED_CHANGED_MEANING", False)
    with pytest.warns(UserWarning, match="'cam_background' changed meaning"):
        assert losses.canonical_weights({"cam_background": 2.0}) == {"cam_background": 2.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses.canonical_weights({"cam_background": 2.0})  # once per process
        losses.canonical_weights({"cam_background_share": 1.0})  # the other key never warns


# ---- every term against NumPy on a network whose gradients are known in closed form ----------------
# x (B x 2 x 4 x 4) → 1x1 conv (3 filters) → ReLU → flatten → linear (3 classes). Its forward pass, its
# Grad-CAM and its input gradient are written out below without torch; an RRR that penalises the
# relevant region, a mining loss that keeps the attended region, or a supervision term (A + m)² all
# give other numbers.


def known_net() -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double()
    with torch.no_grad():  # positive Grad-CAM weights: maps that vary over the image, not a lone pixel
        net[3].weight.abs_()
        net[0].bias.fill_(0.2)
    return net


def known_batch() -> Batch:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    mask[0, :, :2, :] = True  # top half is the object
    mask[1, :, :, 1:3] = True
    mask[2, :, 3, 3] = True
    return Batch(x, torch.tensor([0, 2, 1]), mask)


def np_params(net):
    wc, bc = net[0].weight.detach().numpy()[:, :, 0, 0], net[0].bias.detach().numpy()  # 3 x 2, 3
    wl, bl = net[3].weight.detach().numpy(), net[3].bias.detach().numpy()  # 3 x 48, 3
    return wc, bc, wl, bl


def np_forward(net, x):
    """Pre-activations (B x 3 x 4 x 4), ReLU output and logits of ``known_net`` in NumPy."""
    wc, bc, wl, bl = np_params(net)
    pre = np.einsum("fc,bcij->bfij", wc, x) + bc[None, :, None, None]
    h = np.maximum(pre, 0)
    return pre, h, h.reshape(len(x), -1) @ wl.T + bl


def np_log_softmax_sum_grad(net, x):
    """∂Σ_k log p_k/∂x: ∂/∂z_j = 1 − K p_j, back through the linear layer, the ReLU and the 1x1 conv."""
    wc, _, wl, _ = np_params(net)
    pre, _, z = np_forward(net, x)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = 1 - z.shape[1] * p  # B x K
    dh = (dz @ wl).reshape(pre.shape) * (pre > 0)
    return np.einsum("fc,bfij->bcij", wc, dh)


def np_grad_cam(net, x, y):
    """Grad-CAM of the ReLU: ∂z_y/∂h is the linear layer's row y, so w_f is its spatial mean; ReLU, min-max."""
    _, _, wl, _ = np_params(net)
    _, h, _ = np_forward(net, x)
    grads = wl[y].reshape(len(x), 3, 4, 4)
    cam = np.maximum((grads.mean((2, 3))[:, :, None, None] * h).sum(1), 0)
    lo = cam.min((1, 2), keepdims=True)
    return (cam - lo) / ((cam - lo).max((1, 2), keepdims=True) + 1e-7)


def np_attention_mining(net, x, cam, y, sigma=10.0, omega=0.5):
    t = 1 / (1 + np.exp(-sigma * (cam - omega)))  # GAIN's soft mask T(A)
    _, _, z = np_forward(net, x - t[:, None] * x)  # the attended region erased
    return float(np.mean(1 / (1 + np.exp(-z[np.arange(len(y)), y]))))


def test_rrr_loss_equals_numpy_on_a_known_network():
    net, b = known_net(), known_batch()
    x, background = b.x.numpy(), (~b.mask).double().numpy()
    g = np_log_softmax_sum_grad(net, x)
    # The input gradient itself, then RRR: Σ (A ⊙ g)² over the input, mean over the batch, A = background.
    xi = b.x.clone().requires_grad_(True)
    (got_g,) = torch.autograd.grad(torch.log_softmax(net(xi), 1).sum(), xi)
    np.testing.assert_allclose(got_g.numpy(), g, rtol=1e-10, atol=1e-12)
    want = float(((background * g) ** 2).reshape(3, -1).sum(1).mean())
    assert rrr_loss(net, b.x, ~b.mask).item() == pytest.approx(want, rel=1e-10)
    # The foreground's share is another number: the test sees which region is penalised.
    on_object = float(((b.mask.double().numpy() * g) ** 2).reshape(3, -1).sum(1).mean())
    assert on_object != pytest.approx(want, rel=1e-3)
    assert guidance_terms(net, "1", b, {"rrr": 1.0})["rrr"].item() == pytest.approx(want, rel=1e-10)


def test_attention_mining_loss_equals_numpy_on_a_known_network():
    net, b = known_net(), known_batch()
    x, y = b.x.numpy(), b.y.numpy()
    cam = torch.linspace(0, 1, 16, dtype=torch.float64).reshape(1, 4, 4).repeat(3, 1, 1)
    cam[1] = cam[1].flip(-1)
    want = np_attention_mining(net, x, cam.numpy(), y)
    assert attention_mining_loss(net, b.x, cam, b.y).item() == pytest.approx(want, rel=1e-10)
    assert attention_mining_loss(net, b.x, cam, b.y, sigma=3.0, omega=0.2).item() == pytest.approx(
        np_attention_mining(net, x, cam.numpy(), y, sigma=3.0, omega=0.2), rel=1e-10)
    kept = float(np.mean(1 / (1 + np.exp(-np_forward(net, (1 / (1 + np.exp(-10 * (cam.numpy() - 0.5))))[:, None] * x)[2][
        np.arange(3), y]))))
    assert kept != pytest.approx(want, rel=1e-3)  # keeping the attended region instead gives another number
    # Inside guidance_terms: Grad-CAM of the ReLU (written out in NumPy) feeds the mining term.
    np_cam = np_grad_cam(net, x, y)
    torch.testing.assert_close(grad_cam(net, "1", b.x, b.y), torch.from_numpy(np_cam))
    terms = guidance_terms(net, "1", b, {"attention_mining": 1.0, "attention_supervision": 1.0})
    assert terms["attention_mining"].item() == pytest.approx(np_attention_mining(net, x, np_cam, y), rel=1e-8)
    m = b.mask[:, 0].double().numpy()
    assert terms["attention_supervision"].item() == pytest.approx(float(np.mean((np_cam - m) ** 2)), rel=1e-8)
    assert float(np.mean((np_cam + m) ** 2)) != pytest.approx(float(np.mean((np_cam - m) ** 2)), rel=1e-3)


def test_attention_supervision_loss_and_its_gradient_equal_numpy():
    g = torch.Generator().manual_seed(5)
    cam = torch.rand(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 3, 3, generator=g) > 0.5
    c, m = cam.detach().numpy(), mask[:, 0].double().numpy()
    loss = attention_supervision_loss(cam, mask)
    assert loss.item() == pytest.approx(float(np.mean((c - m) ** 2)), rel=1e-12)
    assert loss.item() != pytest.approx(float(np.mean((c + m) ** 2)), rel=1e-3)
    (grad,) = torch.autograd.grad(loss, cam)
    np.testing.assert_allclose(grad.numpy(), 2 * (c - m) / c.size, rtol=1e-12)  # d mean((A − m)²)/dA
    assert attention_supervision_loss(cam, mask[:, 0]).item() == loss.item()  # B x H x W masks too
    with pytest.raises(ValueError, match="Expected `mask` of shape"):
        attention_supervision_loss(cam, mask[:1])


def test_bad_cam_shapes_are_refused_naming_the_expected_shape():
    net, b = known_net(), known_batch()
    for shape in ((3, 4, 3), (3, 4, 5), (2, 4, 4), (4, 4, 4)):  # smaller and larger than (3, 4, 4)
        with pytest.raises(ValueError, match=r"Expected `cam` of shape \(3, 4, 4\) but got"):
            attention_mining_loss(net, b.x, torch.zeros(shape, dtype=torch.float64), b.y)


def test_the_changed_key_warning_points_at_the_callers_line(monkeypatch):
    monkeypatch.setattr(losses, "_WARNED_CHANGED_MEANING", False)
    net, b = pooled_net(), batch()
    with pytest.warns(UserWarning, match="changed meaning") as record:
        guidance_terms(net, "1", b, {"cam_background": 1.0})
    assert record[0].filename == __file__
    with pytest.warns(FutureWarning, match="deprecated") as record:
        guidance_terms(net, "1", b, {"cam_background_raw": 1.0})
    assert record[0].filename == __file__


def test_the_evidence_functions_take_their_documented_keywords():
    net, b = pooled_net(), batch()
    with capture_output(net[1], "1") as store:
        logits = net(b.x)
    a = store["output"]
    torch.testing.assert_close(class_evidence_maps(activations=a, logits=logits, create_graph=False),
                               class_evidence_maps(a, logits))
    torch.testing.assert_close(cam_background_share_loss(activations=a, logits=logits, mask=b.mask, eps=1e-8),
                               cam_background_share_loss(a, logits, b.mask))
    with pytest.raises(TypeError):
        class_evidence_maps(a, logits, False)  # create_graph is keyword-only
