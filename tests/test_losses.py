"""lightning_interp.losses: every key names its function (``<key>_loss``), ``cam_background`` is the
unnormalised background evidence, and the old names still work for one release with a FutureWarning."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_interp import losses
from lightning_interp.batch import Batch
from lightning_interp.callbacks import AttentionGuidance
from lightning_interp.layers import capture_output
from lightning_interp.losses import (
    LOSSES,
    cam_background_loss,
    cam_background_share_loss,
    canonical_weights,
    guidance_terms,
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
