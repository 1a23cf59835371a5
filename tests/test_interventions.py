import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from lightning_interp.batch import default_batch_adapter
from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    AttentionGuidance,
    FilterMasking,
    PruneFlaggedFilters,
)
from lightning_interp.callbacks.prune import load_pruned
from lightning_interp.cam import class_activation_map, grad_cam
from lightning_interp.data import ShapesDataModule
from lightning_interp.layers import capture_output
from lightning_interp.losses import (
    attention_mining_loss,
    attention_supervision_loss,
    cam_background_loss,
    cam_background_share_loss,
    class_evidence_maps,
    guidance_terms,
    rrr_loss,
)
from lightning_interp.masking import FilterMask
from lightning_interp.models import ImageClassifier, LeNet5, SimpleCNN, resnet18_cifar
from lightning_interp.pruning import prune_filters


def randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("name", ["resnet18_cifar", "simple_cnn"])
def test_grad_cam_equals_pytorch_grad_cam(name):
    torch.manual_seed(0)
    if name == "resnet18_cifar":
        model, layer, module = randomise_bn(resnet18_cifar()).eval(), "layer4", None
        module = model.layer4[-1]
    else:
        model = SimpleCNN(in_channels=3).eval()
        with torch.no_grad():
            model.conv3.bias.fill_(0.1)  # keep the last conv layer alive at random init
        layer, module = "relu3", model.relu3
    x = torch.randn(6, 3, 32, 32)
    targets = [0, 3, 5, 7, 9, 2]
    ours = grad_cam(model, layer, x, torch.tensor(targets))
    ref = GradCAM(model=model, target_layers=[module])(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in targets])
    compared = 0
    for i in range(len(targets)):
        a, b = ours[i].flatten().numpy(), ref[i].flatten()
        if b.std() == 0:
            assert np.allclose(a, a[0]), "both maps must be constant"
            continue
        assert np.corrcoef(a, b)[0, 1] > 0.999
        compared += 1
    assert compared >= 3
    assert ours.shape == (6, 32, 32) and ours.min() >= 0 and ours.max() <= 1


def test_cam_for_global_pooling_networks():
    torch.manual_seed(0)
    model = randomise_bn(resnet18_cifar()).eval()
    x = torch.randn(2, 3, 32, 32)
    cam = class_activation_map(model, "layer4", x, torch.tensor([1, 2]), fc="fc")
    # For GAP + linear, Grad-CAM's weights are the fc weights / (h·w): same normalised map.
    torch.testing.assert_close(cam.detach(), grad_cam(model, "layer4", x, torch.tensor([1, 2])), atol=1e-5, rtol=1e-4)


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


class GuidedByHand(ImageClassifier):
    """The reference: the same terms added inside training_step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        terms = guidance_terms(self, "model.relu3", default_batch_adapter(batch), WEIGHTS)
        return loss + sum(WEIGHTS[n] * t for n, t in terms.items())


WEIGHTS = {"attention_mining": 0.5, "attention_supervision": 2.0, "rrr": 0.1}


def test_callback_step_equals_loss_in_training_step(tmp_path):
    data = ShapesDataModule(num_train=16, num_val=8, num_test=8, batch_size=8, image_size=16)

    def fit(module, callbacks):
        trainer = make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=1, limit_train_batches=1,
                               limit_val_batches=0, enable_checkpointing=False)
        pl.seed_everything(1)
        trainer.fit(module, datamodule=data)
        return module

    pl.seed_everything(0)
    base = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), optimizer="sgd", lr=0.1)
    start = copy.deepcopy(base.state_dict())
    guided = fit(base, [AttentionGuidance("model.relu3", WEIGHTS, probe_size=8)])
    assert "training_step" not in vars(guided), "the wrapper is removed at teardown"
    by_hand = GuidedByHand(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), optimizer="sgd", lr=0.1)
    by_hand.load_state_dict(start)
    by_hand = fit(by_hand, [])
    plain = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), optimizer="sgd", lr=0.1)
    plain.load_state_dict(start)
    plain = fit(plain, [])
    for (name, a), b in zip(guided.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert any(not torch.allclose(a, c) for a, c in zip(guided.state_dict().values(), plain.state_dict().values()))


class Manual(ImageClassifier):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.automatic_optimization = False


def test_guidance_refuses_bad_setups(tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        AttentionGuidance("model.relu3", {"rrr": -1.0})
    with pytest.raises(ValueError, match="attention_mining"):
        AttentionGuidance("model.relu3", {"gain": 1.0})
    data = ShapesDataModule(num_train=16, num_val=8, num_test=8, batch_size=8, image_size=16)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[AttentionGuidance("model.relu3", {"rrr": 1.0})])
    with pytest.raises(ValueError, match="automatic optimisation"):
        trainer.fit(Manual(SimpleCNN(in_channels=3, num_classes=4)), datamodule=data)


def mask_then_prune(model, filters, x):
    model.eval()
    with FilterMask(model, filters), torch.no_grad():
        masked = model(x)
    pruned, summary = prune_filters(model, filters, x)
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
    with pytest.raises(ValueError, match="no channels|channels to prune"):
        prune_filters(net, {"flatten": [0]}, x)
    with pytest.raises(ValueError, match="ignored layer"):
        prune_filters(net, {"fc2": [0]}, x)
    with pytest.raises(ValueError, match="without channels"):
        prune_filters(net, {"relu1": list(range(32))}, x)


def test_filter_masking_callback_from_list_and_from_monitor(tmp_path, digits):
    pl.seed_everything(0)
    module = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    masking = FilterMasking(filters={"model.relu3": [0, 1, 2]}, start_epoch=1, when="eval_only")
    trainer = make_trainer(tmp_path, logger=CSVLogger(str(tmp_path)), callbacks=[masking], max_epochs=2)
    trainer.fit(module, datamodule=digits)
    assert [h["num_masked"] for h in masking.history] == [0, 3]
    assert masking._mask is None and not any(m._forward_hooks for m in module.modules())

    monitor = AnomalyFilterMonitor("model.relu3", probe_size=64, k_max=4, min_cluster_size=0.1)
    live = FilterMasking(monitor=monitor, start_epoch=1)
    prune = PruneFlaggedFilters(monitor=monitor, out_path=str(tmp_path / "pruned.pt"))
    module2 = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor, live, prune], max_epochs=2)
    trainer.fit(module2, datamodule=digits)
    flagged_after_epoch0 = monitor.history[0]["interp/anomaly/model.relu3/count"]
    assert live.history[1]["num_masked"] == flagged_after_epoch0
    if monitor.flagged.get("model.relu3"):
        pruned, summary = load_pruned(str(tmp_path / "pruned.pt"))
        assert summary["params_after"] < summary["params_before"]
        assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_cli_prune_from_checkpoint(tmp_path, digits):
    from lightning_interp.cli import main
    from lightning_interp.scores import FilterScores

    module = ImageClassifier(arch="simple_cnn", arch_kwargs={"width": [8, 16, 16]})
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1)
    trainer.fit(module, datamodule=digits)
    ckpt = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(ckpt)
    report = FilterScores({}, {"model.relu2": [3, 4]}, "given").save(tmp_path / "report.json")
    out = str(tmp_path / "pruned.pt")
    main(["prune", ckpt, "--report", report, "--out", out, "--datamodule", "digits"])
    pruned, summary = load_pruned(out)
    assert summary["channels"]["conv2"] == [16, 14] and "val_acc_after" in summary
    assert pruned.conv2.out_channels == 14
    with pytest.raises(SystemExit):
        main(["prune", ckpt, "--report", report, "--out", out])  # no way to trace the model
