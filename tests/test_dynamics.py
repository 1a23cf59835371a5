"""lightning_interp.dynamics: every running statistic against a NumPy recomputation from stored per-epoch
logits, AUM against the ``aum`` package, flags against scikit-learn / NumPy, cleanlab's input shape."""

import math

import numpy as np
import pytest
import torch

from lightning_interp.dynamics import (
    SCORES,
    SampleDynamics,
    SampleScores,
    flag_samples,
    label_wave_alarm,
    margins,
    suspect_scores,
)


def _stored_run(seed=0, n=40, c=5, epochs=6):
    """Per-epoch logits of ``n`` samples with some samples missing in some epochs and some seen twice."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(epochs, n, c, generator=g, dtype=torch.float64) * 2
    seen = torch.rand(epochs, n, generator=g) > 0.2
    return labels, logits, seen


def _numpy_oracle(labels, logits, seen):
    """The running statistics written out per sample over its list of observed epochs."""
    y = labels.numpy()
    z = logits.numpy()
    s = seen.numpy()
    E, n, c = z.shape
    out = {k: np.full(n, np.nan) for k in ("aum", "conf", "std", "miscl", "forget", "fit_since", "last_margin")}
    probs = np.full((n, c), np.nan)
    flips = []
    last_pred = np.full(n, -1)
    for e in range(E):
        zz = z[e]
        p = np.exp(zz - zz.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        pred = zz.argmax(1)
        both = s[e] & (last_pred >= 0)
        flips.append((pred[both] != last_pred[both]).mean() if both.any() else np.nan)
        last_pred = np.where(s[e], pred, last_pred)
    for i in range(n):
        ep = [e for e in range(E) if s[e, i]]
        if not ep:
            continue
        zi = z[ep, i]  # (k, c)
        other = np.delete(zi, y[i], axis=1).max(1)
        m = zi[:, y[i]] - other
        pi = np.exp(zi - zi.max(1, keepdims=True))
        pi /= pi.sum(1, keepdims=True)
        correct = zi.argmax(1) == y[i]
        out["aum"][i] = m.mean()
        out["conf"][i] = pi[:, y[i]].mean()
        out["std"][i] = pi[:, y[i]].std()  # population std
        out["miscl"][i] = (~correct).sum()
        out["forget"][i] = sum(correct[j - 1] and not correct[j] for j in range(1, len(ep)))
        since = -1
        for j, e in enumerate(ep):
            since = (since if (j > 0 and correct[j - 1] and since >= 0) else e) if correct[j] else -1
        out["fit_since"][i] = since
        out["last_margin"][i] = m[-1]
        probs[i] = pi.mean(0)
    return out, probs, flips


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_running_statistics_match_a_numpy_recomputation(seed):
    labels, logits, seen = _stored_run(seed)
    dyn = SampleDynamics(len(labels))
    flips = []
    for e in range(len(logits)):
        pos = seen[e].nonzero().squeeze(1)
        # Batches in a shuffled order, as a training loop would deliver them.
        perm = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(e))]
        for chunk in perm.split(7):
            dyn.observe(chunk, logits[e, chunk], labels[chunk])
        flips.append(dyn.end_epoch(e)["flips"])
    ref, probs, ref_flips = _numpy_oracle(labels, logits, seen)
    obs = dyn.observed.numpy()
    np.testing.assert_allclose(dyn.aum.numpy()[obs], ref["aum"][obs], rtol=1e-10)
    np.testing.assert_allclose(dyn.confidence.numpy()[obs], ref["conf"][obs], rtol=1e-10)
    np.testing.assert_allclose(dyn.variability.numpy()[obs], ref["std"][obs], atol=1e-7)
    np.testing.assert_array_equal(dyn.misclassified.numpy()[obs], ref["miscl"][obs])
    np.testing.assert_array_equal(dyn.forgetting.numpy()[obs], ref["forget"][obs])
    np.testing.assert_array_equal(dyn.fit_since.numpy()[obs], ref["fit_since"][obs])
    np.testing.assert_allclose(dyn.last_margin.numpy()[obs], ref["last_margin"][obs], rtol=1e-10)
    np.testing.assert_allclose(dyn.mean_probs().numpy()[obs], probs[obs], rtol=1e-10)
    np.testing.assert_allclose(flips, ref_flips, rtol=1e-12, equal_nan=True)
    assert math.isnan(flips[0]) and not np.isnan(flips[1:]).any()
    # Never observed: NaN statistics, never a score.
    assert np.isnan(dyn.aum.numpy()[~obs]).all()


def test_aum_equals_the_aum_package():
    import aum as aum_pkg
    labels, logits, _ = _stored_run(3, n=30, c=4, epochs=5)
    calc = aum_pkg.AUMCalculator("unused", compressed=True)
    dyn = SampleDynamics(len(labels))
    ids = list(range(len(labels)))
    for e in range(len(logits)):
        calc.update(logits[e].float(), labels, ids)
        dyn.observe(torch.arange(len(labels)), logits[e].float(), labels)
        dyn.end_epoch(e)
    ref = np.array([calc.sums[i] / calc.counts[i] for i in ids])
    np.testing.assert_allclose(dyn.aum.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_a_sample_seen_twice_in_an_epoch_counts_once_with_its_mean_logits():
    dyn = SampleDynamics(2)
    dyn.observe(torch.tensor([0, 1, 0]), torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([0, 1, 0]))
    dyn.end_epoch(0)
    assert dyn.epochs.tolist() == [1, 1]
    assert dyn.aum.tolist() == [1.0, 1.0]  # sample 0: mean logits (1, 0) -> margin 1


def test_margins_and_scores_orientation():
    z = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    assert margins(z, torch.tensor([0, 1])).tolist() == [2.0, -3.0]
    dyn = SampleDynamics(2)
    for e in range(3):
        dyn.observe(torch.arange(2), z, torch.tensor([0, 1]))
        dyn.end_epoch(e)
    s = suspect_scores(dyn)
    assert set(s) == set(SCORES)
    # Sample 1 (never fitted, negative margin) is more suspect than sample 0 by every score that separates them.
    for name in ("aum", "confidence", "misclassified", "fit_since", "margin", "loss"):
        assert s[name][1] > s[name][0], name
    assert dyn.fit_since.tolist() == [0, -1] and s["fit_since"].tolist() == [0.0, 3.0]


def test_changed_labels_and_bad_inputs_are_refused():
    dyn = SampleDynamics(3)
    with pytest.raises(ValueError, match=r"\(B,\) positions, \(B, C\) logits"):
        dyn.observe(torch.arange(3), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError, match=r"positions in \[0, 2\]"):
        dyn.observe(torch.tensor([3]), torch.zeros(1, 2), torch.tensor([0]))
    dyn.observe(torch.arange(3), torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    dyn.end_epoch(0)
    dyn.observe(torch.arange(3), torch.zeros(3, 2), torch.tensor([1, 1, 0]))
    with pytest.raises(ValueError, match="keep its given label"):
        dyn.end_epoch(1)
    with pytest.raises(ValueError, match="`num_samples`"):
        SampleDynamics(0)


def test_gmm_flags_match_scikit_learn_and_counts_match_numpy():
    from sklearn.mixture import GaussianMixture

    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.randn(300, generator=g), torch.randn(60, generator=g) * 0.5 + 4])
    scores[5] = float("nan")
    flags = flag_samples(scores, "gmm", seed=3)
    ok = torch.isfinite(scores)
    v = scores[ok].double().numpy()[:, None]
    gm = GaussianMixture(2, random_state=3, reg_covar=1e-6 * v.var()).fit(v)
    ref = gm.predict_proba(v)[:, gm.means_[:, 0].argmax()] > 0.5
    np.testing.assert_array_equal(flags[ok].numpy(), ref)
    assert not flags[5] and 55 <= int(flags.sum()) <= 65
    # Counts and fractions: the highest scores, ties broken by position (NumPy's stable argsort).
    s = torch.tensor([1.0, 3.0, 3.0, 0.0, float("nan"), 2.0])
    assert flag_samples(s, 2).nonzero().squeeze(1).tolist() == [1, 2]
    assert flag_samples(s, 0.4).nonzero().squeeze(1).tolist() == [1, 2]  # 40 % of the 5 scored
    assert not flag_samples(torch.ones(20), "gmm").any(), "scores that do not split flag nothing"
    with pytest.raises(ValueError, match="`flag_rule` to be one of"):
        flag_samples(s, "otsu")


def test_label_wave_alarm_fires_after_the_first_minimum_persists():
    flips = [0.5, 0.4, 0.3, 0.35, 0.2, 0.25, 0.3, 0.1]
    # First minimum 0.3 at index 2 is broken at index 4 (0.2); 0.2 persists through indices 5 and 6.
    assert label_wave_alarm(flips, patience=2) == 6
    assert label_wave_alarm(flips, patience=1) == 3
    assert label_wave_alarm([float("nan"), 0.5, 0.4], patience=1) is None
    assert label_wave_alarm([0.5, 0.6, 0.7], patience=2, min_index=3) is None


def test_sample_scores_rows_csv_and_cleanlab_input(tmp_path):
    labels, logits, _ = _stored_run(4, n=50, c=4, epochs=4)
    dyn = SampleDynamics(50)
    for e in range(4):
        dyn.observe(torch.arange(50), logits[e], labels)
        dyn.end_epoch(e)
    indices = torch.arange(100, 150)
    s = SampleScores.from_dynamics(dyn, indices, score="aum", rule=5)
    assert s.flagged.sum() == 5 and s.epoch == 3
    expected = indices[torch.argsort(dyn.aum)[:5]]
    assert s.flagged_indices.tolist() == expected.tolist()  # lowest AUM = most suspect, in order
    fitted = dyn.last_pred[s.flagged] == labels[s.flagged]
    assert s.fit_rate() == pytest.approx(float(fitted.double().mean()))
    path = s.save_csv(tmp_path / "label_issues.csv")
    import csv

    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 50 and rows[0]["index"] == str(int(expected[0]))
    assert {"is_label_issue", "label_score", "given_label", "predicted_label", "aum"} <= set(rows[0])
    assert sum(r["is_label_issue"] == "True" for r in rows) == 5
    import cleanlab.filter as cleanlab
    probs = dyn.mean_probs().numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-9)
    issues = cleanlab.find_label_issues(labels.numpy(), probs)
    assert issues.shape == (50,)


def test_state_dict_round_trip_continues_identically():
    labels, logits, seen = _stored_run(5)
    a, b = SampleDynamics(len(labels)), None
    for e in range(len(logits)):
        pos = seen[e].nonzero().squeeze(1)
        a.observe(pos, logits[e, pos], labels[pos])
        a.end_epoch(e)
        if e == 2:
            b = SampleDynamics(len(labels))
            b.load_state_dict(a.state_dict())
        elif b is not None:
            b.observe(pos, logits[e, pos], labels[pos])
            b.end_epoch(e)
    for name, value in a.state_dict().items():
        other = b.state_dict()[name]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, rtol=0, atol=0, equal_nan=True)
        else:
            assert other == value, name


def test_fitted_empty_epochs_and_the_label_buffer_between_epochs():
    dyn = SampleDynamics(4)
    assert dyn.end_epoch(0) == {"seen": 0.0, "flips": pytest.approx(float("nan"), nan_ok=True),
                                "fit": pytest.approx(float("nan"), nan_ok=True),
                                "forgotten": pytest.approx(float("nan"), nan_ok=True)}
    assert dyn.last_epoch is None, "an epoch with no observation is not an epoch of the state"
    assert not dyn.has_observations
    with pytest.raises(RuntimeError, match="no observation yet"):
        dyn.buffers()
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    dyn.observe(torch.tensor([0, 1, 2]), z, torch.tensor([0, 2, 2]))
    assert dyn.has_observations
    dyn.end_epoch(1)
    # Fitted: observed and predicted as the given label (sample 3 never observed, sample 1 misfitted).
    assert dyn.fitted.tolist() == [True, False, True, False]
    # Between epochs the label buffer says "unseen" (-1) everywhere: under DDP it is combined by maximum.
    assert dyn.buffers()["labels"].tolist() == [-1, -1, -1, -1]
    # A changed label is refused whatever the label was (here 2 -> 1).
    dyn.observe(torch.tensor([2]), z[:1], torch.tensor([1]))
    with pytest.raises(ValueError, match="keep its given label"):
        dyn.end_epoch(2)


def test_csv_label_score_is_minus_the_suspect_score_and_ties_keep_dataset_order(tmp_path):
    import csv

    dyn = SampleDynamics(4)
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    dyn.observe(torch.arange(4), z, torch.tensor([0, 0, 0, 1]))
    dyn.end_epoch(0)
    s = SampleScores.from_dynamics(dyn, torch.tensor([10, 11, 12, 13]), rule=2)
    # Samples 0 and 1 tie (margin -1): the lower dataset index first.
    assert s.flagged_indices.tolist() == [10, 11]
    rows = list(csv.DictReader(open(s.save_csv(tmp_path / "x.csv"))))
    for row in rows:
        assert float(row["label_score"]) == pytest.approx(-float(row["suspect_aum"]))
    assert label_wave_alarm([0.5, 0.4, 0.45, 0.5, 0.6]) == 3  # the default patience is 2
