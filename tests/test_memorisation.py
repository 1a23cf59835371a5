"""Memorisation scores against explicit ablation and finite differences.

Oracles: zeroing a filter's output (``FilterMask``) changes each sample's given-label margin by exactly
the first-order term when the network is linear after the layer (two classes: the margin is linear
in the logits); through a nonlinear tail the per-sample contribution equals the central finite
difference of the margin (or loss) when the filter's output is scaled by 1 ± ε (float64); the
activation variant equals the mean of the hooked activations. Masking then pruning by the score
leaves outputs unchanged.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_interp.dynamics import margins
from lightning_interp.masking import FilterMask
from lightning_interp.memorisation import (
    VARIANTS,
    filter_contributions,
    fitted_clean,
    memorisation_scores,
)
from lightning_interp.models import SimpleCNN
from lightning_interp.pruning import prune_filters

torch.set_num_threads(1)


def _linear_tail(classes=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.Flatten(),
                         nn.Linear(5 * 8 * 8, classes)).double().eval()


def _nonlinear_tail():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                         nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 7), nn.Softplus(),
                         nn.Linear(7, 4)).double().eval()


def _margin(net, x, y):
    with torch.no_grad():
        return margins(net(x), y)


def _scaled(net, layer, k, factor):
    """A forward hook scaling channel k of ``layer``'s output by ``factor``."""
    def hook(module, args, out):
        out = out.clone()
        out[:, k] = out[:, k] * factor
        return out
    return dict(net.named_modules())[layer].register_forward_hook(hook)


def test_margin_is_given_logit_minus_largest_other():
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.5, -1.0, 3.0]])
    torch.testing.assert_close(margins(logits, torch.tensor([1, 0])), torch.tensor([3.0, -2.5]))


def test_taylor_score_equals_explicit_ablation_when_linear_after_the_layer():
    net = _linear_tail()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    suspects, clean = torch.arange(5), torch.arange(5, 12)
    scores = memorisation_scores(net, ["2"], x, y, suspects, clean=clean, batch_size=4)
    base = _margin(net, x, y)
    oracle = []
    for k in range(5):
        with FilterMask(net, {"2": [k]}):
            lost = base - _margin(net, x, y)  # the margin each sample loses without filter k
        oracle.append(lost[:5].mean() - lost[5:].mean())
    torch.testing.assert_close(scores.scores["2"], torch.stack(oracle).float(), atol=1e-5, rtol=1e-4)
    assert scores.scorer == "memorisation/taylor" and scores.settings["num_suspects"] == 5
    assert scores.settings["num_clean"] == 7 and scores.flags() == {}


@pytest.mark.parametrize("target", ["margin", "loss"])
def test_contributions_equal_finite_differences_through_a_nonlinear_tail(target):
    net = _nonlinear_tail()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    c = filter_contributions(net, ["2", "4"], x, y, target=target, batch_size=4)
    assert c["2"].shape == (6, 6) and c["4"].shape == (6, 5)

    def fit(out):
        return margins(out, y) if target == "margin" else -F.cross_entropy(out, y, reduction="none")

    eps = 1e-6
    for layer, channels in (("2", 6), ("4", 5)):
        for k in range(channels):
            values = []
            for factor in (1 + eps, 1 - eps):
                handle = _scaled(net, layer, k, factor)
                try:
                    with torch.no_grad():
                        values.append(fit(net(x)))
                finally:
                    handle.remove()
            # d fit / d s at s = 1 for A_k -> s·A_k is Σ A_k ∂fit/∂A_k
            fd = (values[0] - values[1]) / (2 * eps)
            torch.testing.assert_close(c[layer][:, k].double(), fd, atol=1e-5, rtol=1e-4)


def test_variants_aggregate_suspects_minus_clean():
    net = _nonlinear_tail()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    suspects = torch.zeros(10, dtype=torch.bool)
    suspects[[1, 4, 7]] = True
    clean = torch.tensor([0, 2, 3, 9])
    margin = filter_contributions(net, ["4"], x, y)["4"].double()
    loss = filter_contributions(net, ["4"], x, y, target="loss")["4"].double()
    acts = {}
    handle = net[4].register_forward_hook(lambda m, a, out: acts.setdefault("a", out.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    activation = acts["a"].mean((2, 3))
    s, c = suspects, clean
    diff = margin[s].mean(0) - margin[c].mean(0)
    expected = {
        "taylor": diff,
        "taylor_normalised": diff / (margin[c].mean(0).abs() + 0.1 * margin[c].mean(0).abs().mean()),
        "loss_taylor": loss[s].mean(0) - loss[c].mean(0),
        "activation": activation[s].mean(0) - activation[c].mean(0),
    }
    for variant in VARIANTS:
        got = memorisation_scores(net, ["4"], x, y, suspects, clean=clean, variant=variant).scores["4"]
        torch.testing.assert_close(got, expected[variant].float(), atol=1e-5, rtol=1e-4, msg=variant)


def test_default_clean_samples_are_fitted_non_suspects_as_many_as_suspects():
    logits = torch.tensor([[3.0, 0], [0, 3], [3, 0], [3, 0], [0, 3], [3, 0]])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])  # sample 2 is misfitted
    suspects = torch.tensor([False, True, False, False, False, False])
    assert fitted_clean(logits, labels, suspects).tolist() == [0, 3, 4, 5]
    picked = fitted_clean(logits, labels, suspects, 2, seed=3)
    assert len(picked) == 2 and set(picked.tolist()) <= {0, 3, 4, 5}

    net = _linear_tail(classes=3)
    x = torch.randn(40, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)  # every sample fitted
    y[:4] = (y[:4] + 1) % 3  # the suspects: not fitted here, which does not matter to the score
    scores = memorisation_scores(net, ["4"], x, y, torch.arange(4), seed=5)
    assert scores.settings["num_clean"] == 4
    explicit = memorisation_scores(net, ["4"], x, y, torch.arange(4), clean=4 + fitted_clean(
        net(x[4:]).detach(), y[4:], torch.zeros(36, dtype=torch.bool), 4, seed=5))
    torch.testing.assert_close(scores.scores["4"], explicit.scores["4"])


def test_modes_hooks_and_grads_are_left_as_found():
    net = SimpleCNN(in_channels=3, width=(4, 6, 8), batch_norm=True).train()
    net.bn2.eval()  # a user's frozen BatchNorm stays frozen
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    with torch.inference_mode():
        x_inf = x.clone()
    scores = memorisation_scores(net, ["relu2", "relu3"], x_inf, y, torch.arange(3), clean=torch.arange(3, 8))
    assert set(scores.scores) == {"relu2", "relu3"} and scores.scores["relu3"].shape == (8,)
    assert net.training and not net.bn2.training and net.bn1.training
    assert all((p.grad == 7).all() for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())


def test_masking_then_pruning_the_top_memorisation_filters_leaves_outputs_unchanged():
    torch.manual_seed(0)
    net = SimpleCNN(in_channels=3, width=(4, 6, 8), batch_norm=True).eval()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    scores = memorisation_scores(net, ["relu2", "relu3"], x, y, torch.arange(6), clean=torch.arange(6, 16), amount=2)
    flags = scores.flags()
    assert [len(v) for v in flags.values()] == [2, 2]
    for layer in flags:  # the flagged filters are the two highest scores
        assert set(flags[layer]) == set(torch.topk(scores.scores[layer], 2).indices.tolist())
    with FilterMask(net, flags), torch.no_grad():
        masked = net(x)
    pruned, _ = prune_filters(net, flags, x[:2], latency=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused_naming_the_choices():
    net = _linear_tail()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match=r"`variant` to be one of \['taylor', 'taylor_normalised', 'loss_taylor', 'activation'\]"):
        memorisation_scores(net, ["2"], x, y, [0], variant="grad")
    with pytest.raises(ValueError, match="Closest valid choices"):
        memorisation_scores(net, ["conv9"], x, y, [0])
    with pytest.raises(ValueError, match=r"boolean mask of shape \(6,\)"):
        memorisation_scores(net, ["2"], x, y, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"indices in \[0, 5\] but got \[6\]"):
        memorisation_scores(net, ["2"], x, y, torch.tensor([6]))
    with pytest.raises(TypeError, match="boolean mask .* or a 1-D tensor of sample indices"):
        memorisation_scores(net, ["2"], x, y, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="at least one suspect"):
        memorisation_scores(net, ["2"], x, y, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="disjoint"):
        memorisation_scores(net, ["2"], x, y, [0, 1], clean=[1, 2])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        memorisation_scores(net, ["2"], x, y.double(), [0])
    with pytest.raises(ValueError, match=r"one label per sample \(6\)"):
        memorisation_scores(net, ["2"], x, y[:5], [0])
    with pytest.raises(ValueError, match="at least one clean reference sample"):
        memorisation_scores(net, ["2"], x, 1 - net(x).argmax(1), [0])  # nothing else is fitted
    with pytest.raises(ValueError, match=r"`target` to be one of \['margin', 'loss', 'activation'\]"):
        filter_contributions(net, ["2"], x, y, target="logit")


def test_filter_suspects_ranks_filters_by_score_and_samples_by_the_filters_margin_contribution():
    from lightning_interp.memorisation import filter_suspects
    from lightning_interp.scores import FilterScores

    torch.manual_seed(0)
    # conv -> relu -> global average -> linear: the margin contribution of filter k to sample i is written out
    # as mean_pos(A_ik) * (W[y_i, k] - W[r_i, k]) (r_i the runner-up class).
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(6, 4))
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 4, (20,))
    with torch.no_grad():
        a = net[1](net[0](x)).mean((2, 3))
        z = net(x)
    runner = z.masked_fill(torch.nn.functional.one_hot(y, 4).bool(), float("-inf")).argmax(1)
    w = net[4].weight.detach()
    c = a * (w[y] - w[runner])
    scores = FilterScores({"1": torch.tensor([0.1, 0.9, -0.2, 0.9, 0.5, 0.0])}, {}, scorer="memorisation/taylor")
    held = filter_suspects(net, scores, x, y, num_filters=3, num_samples=5)["1"]
    assert [k for k, _, _ in held] == [1, 3, 4]  # highest first, ties by index
    assert [s for _, s, _ in held] == pytest.approx([0.9, 0.9, 0.5])
    for k, _, picks in held:
        assert picks == torch.argsort(-c[:, k], stable=True)[:5].tolist()
    with pytest.raises(ValueError, match="`num_samples` to be a positive int"):
        filter_suspects(net, scores, x, y, num_samples=0)
