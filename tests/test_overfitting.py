"""lightning_interp.overfitting: the benchmark's bookkeeping and the alarm rule, against hand-computed
values and independent constructions (SciPy, NumPy)."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from lightning_interp.overfitting import (
    activation_divergence,
    onset_epoch,
    precision_at_k,
    rise_alarm,
    spearman,
)

# A tiny synthetic run: test loss falls to its minimum at epoch 4, then rises and stays above.
EPOCHS = [1, 2, 3, 4, 5, 6, 7, 8]
TEST_LOSS = [2.0, 1.5, 1.2, 1.0, 1.1, 1.05, 1.3, 1.6]
VAL_LOSS = [2.1, 1.6, 1.25, 1.02, 1.04, 1.08, 1.35, 1.7]
COUNT = [5, 4, 6, 5, 5, 9, 10, 12]


def test_onset_is_the_last_minimum_after_which_the_loss_stays_above():
    assert onset_epoch(EPOCHS, TEST_LOSS) == 4
    # A later tie with the minimum moves the onset to the tie.
    assert onset_epoch(EPOCHS, [2.0, 1.0, 1.2, 1.0, 1.1, 1.2, 1.3, 1.4]) == 4
    # Never rises: no onset; a final rise smaller than min_rise: no onset.
    assert onset_epoch(EPOCHS, [8, 7, 6, 5, 4, 3, 2, 1]) is None
    assert onset_epoch(EPOCHS, [2.0, 1.0, 1.01, 1.02, 1.01, 1.02, 1.03, 1.04], min_rise=0.05) is None
    assert onset_epoch(EPOCHS, [2.0, 1.0, 1.01, 1.02, 1.01, 1.02, 1.03, 1.06], min_rise=0.05) == 2
    assert onset_epoch(EPOCHS, [2.0, 1.0, 1.01, 1.02, 1.01, 1.02, 1.03, None], min_rise=0.05) is None  # last finite


def test_rise_alarm_hand_computed():
    # val loss: running min 1.02 at index 3; 5 % over it = 1.071: index 5 (1.08) is the first above.
    assert rise_alarm(VAL_LOSS, rel=0.05) == 5
    # patience 2: indices 5 and 6 both above -> fires at 6.
    assert rise_alarm(VAL_LOSS, rel=0.05, patience=2) == 6
    # count: running min 4 (index 1); margin 2 -> first value > 6 is index 5 (9).
    assert rise_alarm(COUNT, margin=2.0, rel=0.0) == 5
    # relative 20 % of 4 = 0.8 -> index 2 (6 > 4.8) fires, unless min_index forbids it.
    assert rise_alarm(COUNT, rel=0.2) == 2
    assert rise_alarm(COUNT, rel=0.2, min_index=3) == 3  # 5 > 4.8 as well
    assert rise_alarm(COUNT, rel=0.5, min_index=3) == 5  # 5 <= 6 until the 9
    # A None scan breaks the run of consecutive scans.
    assert rise_alarm([1.0, 2.0, None, 2.0, 2.0], rel=0.5, patience=2) == 4
    assert rise_alarm([3.0, 2.0, 1.0], rel=0.05) is None
    with pytest.raises(ValueError, match="patience"):
        rise_alarm(COUNT, patience=0)


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 20).astype(float)  # many ties
    b = rng.normal(size=20)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman(VAL_LOSS, TEST_LOSS) == pytest.approx(spearmanr(VAL_LOSS, TEST_LOSS).statistic)
    # Hand-computed: a monotone transform has correlation 1, its reverse -1.
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    # NaN pairs are dropped.
    assert spearman([1, 2, np.nan, 3, 4], [1, 2, 9, 3, 4]) == pytest.approx(1.0)


def test_precision_at_k():
    scores = [0.9, 0.1, 0.8, 0.3, 0.7]
    positives = [True, False, False, True, True]
    assert precision_at_k(scores, positives, 1) == 1.0
    assert precision_at_k(scores, positives, 3) == pytest.approx(2 / 3)  # 0.9, 0.8, 0.7
    assert precision_at_k(scores, positives, 5) == pytest.approx(3 / 5)
    # Ties at the cut-off count in expectation: votes 2, 1, 1, 1, 0 with k = 2 -> the 2 (positive)
    # plus one of the three tied 1s, of which one is positive: (1 + 1 * 1/3) / 2.
    assert precision_at_k([2, 1, 1, 1, 0], [True, False, True, False, True], 2) == pytest.approx((1 + 1 / 3) / 2)
    # The same in any order of the samples.
    assert precision_at_k([1, 1, 0, 1, 2], [False, True, True, False, True], 2) == pytest.approx((1 + 1 / 3) / 2)
    assert np.isnan(precision_at_k([0, 0, 0], [True, False, True], 2))  # no sample scored: ranks nothing
    with pytest.raises(ValueError, match="k"):
        precision_at_k(scores, positives, 0)


@pytest.mark.parametrize("seed", range(3))
def test_activation_divergence_is_cohens_d(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(30, 5, 4, 4, generator=gen) + torch.arange(5.0).view(1, 5, 1, 1)
    b = torch.randn(40, 5, 4, 4, generator=gen)
    d = activation_divergence(a, b)
    ma, mb = a.mean((2, 3)).double().numpy(), b.mean((2, 3)).double().numpy()
    pooled = np.sqrt((ma.var(0, ddof=1) * 29 + mb.var(0, ddof=1) * 39) / 68)
    np.testing.assert_allclose(d.numpy(), np.abs(ma.mean(0) - mb.mean(0)) / pooled, rtol=1e-10)
    # A constant filter diverges by 0; more shift, more divergence.
    assert activation_divergence(torch.ones(5, 2), torch.ones(6, 2)).tolist() == [0.0, 0.0]
    assert d[4] > d[1]


def test_activation_divergence_on_the_smallest_sets():
    # 2 and 3 samples (the fewest allowed; n1 + n2 − 2 = 3 degrees of freedom), written out by hand.
    a, b = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [2.0], [6.0]])
    pooled = np.sqrt((2.0 * 1 + 7.0 * 2) / 3)  # sample variances 2 and 7
    assert activation_divergence(a, b).item() == pytest.approx(abs(1.0 - 3.0) / pooled)
    assert activation_divergence(b, a).item() == pytest.approx(abs(1.0 - 3.0) / pooled)
    for one in ((a[:1], b), (a, b[:1])):
        with pytest.raises(ValueError, match="at least 2 samples"):
            activation_divergence(*one)


def test_hard_sample_loss_is_the_mean_of_the_top_fraction():
    from lightning_interp.overfitting import hard_sample_loss

    loss = torch.tensor([0.1, 3.0, 0.5, 2.0, 0.2, 1.0, 0.3, 0.4, 0.6, 0.7])
    assert hard_sample_loss(loss, 0.2) == pytest.approx((3.0 + 2.0) / 2)
    assert hard_sample_loss(loss) == pytest.approx((3.0 + 2.0) / 2)  # 20 % by default
    assert hard_sample_loss(loss, 1.0) == pytest.approx(float(loss.double().mean()))
    assert hard_sample_loss(loss, 0.01) == pytest.approx(3.0)  # at least one sample
    with pytest.raises(ValueError, match="fraction"):
        hard_sample_loss(loss, 0.0)


def test_alarm_rule_matches_rise_alarm_and_the_count_rule():
    from lightning_interp.overfitting import AlarmRule, best_epoch, overfit_alarm

    losses = [1.0, 0.8, 0.7, 0.72, 0.75, 0.9]
    epochs = list(range(6))
    rule = AlarmRule("val_loss", rel=0.01, patience=2, min_epoch=3)
    # Hand check: best 0.70 at epoch 2; 0.72 and 0.75 are > 1 % above it on two consecutive scans -> fires at 4.
    assert not rule.fired(epochs[:4], [0] * 4, losses[:4]) and rule.fired(epochs[:5], [0] * 5, losses[:5])
    assert rule.fired(epochs, [0] * 6, losses) == (rise_alarm(losses, rel=0.01, patience=2) is not None)
    # Scans without validation are skipped, not counted as breaks.
    assert rule.fired([0, 1, 2, 3, 4, 5], [0] * 6, [1.0, 0.8, 0.7, None, 0.72, 0.75])
    # min_epoch: nothing fires before 6 epochs have been trained.
    assert not AlarmRule("val_loss", rel=0.01, patience=2, min_epoch=6).fired(epochs[:5], [0] * 5, losses[:5])
    counts = [3, 3, 4, 5, 5]
    assert AlarmRule("count", rel=0.0, margin=0.5, patience=2, min_epoch=0).fired(epochs[:5], counts, [None] * 5)
    both = AlarmRule("count_and_val_loss", patience=2, min_epoch=0)
    assert both.fired(epochs[:4], [3, 3, 4, 5], [0.5, 0.6, 0.6, 0.7]) == overfit_alarm([3, 3, 4, 5], [0.5, 0.6, 0.6, 0.7])
    for bad in (dict(rule="loss"), dict(patience=0), dict(rel=-1.0), dict(min_epoch=True)):
        with pytest.raises(ValueError, match="Expected `alarm"):
            AlarmRule(**bad)
    # min_epoch counts trained epochs: with 2, the scan after epoch 1 (0-based) may already fire.
    early = dict(rel=0.01, patience=1)
    assert AlarmRule("val_loss", min_epoch=2, **early).fired([0, 1], [0, 0], [1.0, 2.0])
    assert not AlarmRule("val_loss", min_epoch=3, **early).fired([0, 1], [0, 0], [1.0, 2.0])
    history = [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1}, {"epoch": 2, "val_acc": 0.7}, {"epoch": 3, "val_acc": 0.7}]
    assert best_epoch(history, "val_acc") == 2 and best_epoch(history, "val_acc", mode="min") == 0
    assert best_epoch([], "val_acc") is None


def test_grouped_gradient_magnitude_is_the_group_means_of_per_sample_gradients():
    from lightning_interp.gradients import per_sample_gradient_magnitude
    from lightning_interp.models import SimpleCNN
    from lightning_interp.overfitting import grouped_gradient_magnitude

    torch.manual_seed(0)
    model = SimpleCNN(width=(4, 8, 8))
    x, y = torch.randn(10, 1, 16, 16), torch.randint(0, 10, (10,))
    groups = torch.tensor([True, False] * 5)
    g = per_sample_gradient_magnitude(model, x, y)
    out, normal = grouped_gradient_magnitude(model, x, y, groups)
    assert out == pytest.approx(g[groups].mean().item()) and normal == pytest.approx(g[~groups].mean().item())
    assert grouped_gradient_magnitude(model, x, y, torch.zeros(10, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="one group flag per sample"):
        grouped_gradient_magnitude(model, x, y, groups[:3])


def test_overfit_alarm_over_the_last_patience_plus_one_scans():
    from lightning_interp.overfitting import overfit_alarm

    # Exactly patience + 1 scans are enough; fewer are not.
    assert overfit_alarm([1, 1, 2], [0.5, 0.6, 0.7], patience=2)  # never fell, rose overall (1 -> 2)
    assert not overfit_alarm([1, 2], [0.5, 0.7], patience=2)
    assert overfit_alarm([1, 2], [0.5, 0.7], patience=1)
    # Only the last patience + 1 scans count: an earlier fall or a higher earlier loss does not matter.
    assert overfit_alarm([9, 1, 1, 2], [0.9, 0.5, 0.6, 0.7], patience=2)
    assert not overfit_alarm([1, 2, 2, 2], [0.5, 0.6, 0.6, 0.7], patience=2)  # flat over the window
    assert not overfit_alarm([1, 2, 1, 3], [0.5, 0.6, 0.7, 0.8], patience=2)  # fell inside the window
    assert not overfit_alarm([1, 1, 2], [0.7, 0.6, 0.7], patience=2)  # the loss did not rise overall
