"""lightning_interp.budget: the time budget's decisions against hand-computed ones, and a real Trainer
whose monitors follow them (decisions that do not depend on how fast the machine is)."""

import pytest
import torch
from conftest import make_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.budget import check_max_overhead, plan_scans, scan_fits_budget
from lightning_interp.callbacks import AnomalyFilterMonitor, LearningImageLogger
from lightning_interp.models import ImageClassifier, SimpleCNN


def test_one_more_scan_must_fit_max_overhead_times_the_training_time():
    assert scan_fits_budget(10.0, 0.0, None, 0.1)  # no scan measured yet: scan, to measure
    assert scan_fits_budget(10.0, 0.5, 0.5, 0.1)  # 0.5 + 0.5 <= 0.1 x 10
    assert not scan_fits_budget(10.0, 0.5, 0.6, 0.1)  # 1.1 > 1.0
    with pytest.raises(ValueError, match=r"`max_overhead` to be a positive fraction.*got 0"):
        check_max_overhead(0)
    with pytest.raises(ValueError, match=r"`max_overhead`.*got True"):
        check_max_overhead(True)
    assert check_max_overhead(None) is None and check_max_overhead(1) == 1.0


@pytest.mark.parametrize("epochs, scans, budget, every, expected", [
    # 1 s epochs, 3 s scans, 50 %: the first scan measures (spent 3); the next needs 3 + 3 <= 0.5 x T: T = 12.
    ([1.0] * 12, 3.0, 0.5, 1, [0, 11]),
    # With a cadence of 2 as well: epochs 1, 3, 5, 7 are due; spent + 1 <= 0.5 x T holds at T = 4, 6, 8.
    ([1.0] * 8, 1.0, 0.5, 2, [1, 3, 5, 7]),
    # Costs change scan by scan (the i-th made costs scans[i]); each decision uses the last measured cost:
    # e1: 1 + 1 <= 4 yes (spent 5); e2: 5 + 4 > 6; e3: 9 > 8; e4: 9 <= 10 yes (spent 6 + ... = 10); e5: 11 <= 12.
    ([2.0] * 6, [1.0, 4.0, 1.0, 1.0], 1.0, 1, [0, 1, 4, 5]),
    # No budget: the cadence alone.
    ([1.0] * 4, 10.0, None, 2, [1, 3]),
    # A scan that costs 13 epochs (a small data set) at 10 %: after the first, one per 130 epochs' worth.
    ([1.0] * 300, 13.0, 0.1, 1, [0, 259]),
])
def test_plan_scans_against_hand_computed_decisions(epochs, scans, budget, every, expected):
    assert plan_scans(epochs, scans, budget, every_n_epochs=every) == expected


def fit(tmp_path, callbacks, epochs=3):
    data = TensorDataset(torch.rand(32, 1, 16, 16), torch.randint(0, 10, (32,)))
    trainer = make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=epochs, limit_val_batches=0,
                           enable_checkpointing=False)
    trainer.fit(ImageClassifier(SimpleCNN(width=(4, 8, 8))), DataLoader(data, batch_size=16))
    return trainer


def scanned(cb):
    return [h["epoch"] for h in cb.history if "fit_end" not in h]


def test_monitors_follow_the_budget_in_a_real_fit(tmp_path, caplog):
    import logging

    def monitors(budget, **kw):
        return [AnomalyFilterMonitor("model.relu3", probe_size=16, k_max=3, max_overhead=budget, **kw),
                LearningImageLogger("model.relu2", probe_size=4, num_images=1, max_overhead=budget, **kw)]

    # A budget no scan can fit: each monitor's first scan measures, none follows (the budget is shared).
    tight = monitors(1e-9)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, tight)
    assert [scanned(cb) for cb in tight] == [[0], [0]]
    assert "1 scans in 3 epochs within max_overhead=1e-09" in caplog.text
    # The fit-end exact rescan is budgeted too: the flags stay the last (pooled) scan's.
    assert tight[0].filter_scores().settings.get("scanned") != "fit end" and "no exact rescan at fit end" in caplog.text
    # A budget every scan fits: the cadence decides.
    loose = monitors(1e9)
    fit(tmp_path, loose)
    assert [scanned(cb) for cb in loose] == [[0, 1, 2], [0, 1, 2]]
    assert loose[0].filter_scores().settings.get("scanned") == "fit end"
    loose = monitors(1e9, every_n_epochs=2)
    fit(tmp_path, loose, epochs=4)
    assert [scanned(cb) for cb in loose] == [[1, 3], [1, 3]]
