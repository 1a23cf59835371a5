"""lightning_interp.budget: the time budget's decisions against hand-computed ones, and a real Trainer
whose monitors follow them on a scripted clock (decisions that do not depend on how fast the machine is)."""

import copy
import logging
import random
import types

import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_interp.callbacks.base as base
from lightning_interp.budget import (
    check_max_overhead,
    overhead_for_one_scan,
    pilot_estimate,
    pilot_fits_budget,
    pilot_size,
    plan_scans,
    scan_fits_budget,
)
from lightning_interp.callbacks import AnomalyFilterMonitor, LearningImageLogger, TIPMonitor
from lightning_interp.models import ImageClassifier, SimpleCNN


def test_one_more_scan_must_fit_max_overhead_times_the_training_time():
    assert scan_fits_budget(10.0, 0.0, None, 0.1)  # no cost known (the pilot failed): scan, to measure
    assert scan_fits_budget(10.0, 0.5, 0.5, 0.1)  # 0.5 + 0.5 <= 0.1 x 10
    assert not scan_fits_budget(10.0, 0.5, 0.6, 0.1)  # 1.1 > 1.0
    assert not scan_fits_budget(10.0, 0.0, 1.5, 0.1)  # a first scan estimated at 1.5 s waits: 1.5 > 1.0
    with pytest.raises(ValueError, match=r"`max_overhead` to be a positive fraction.*got 0"):
        check_max_overhead(0)
    with pytest.raises(ValueError, match=r"`max_overhead`.*got True"):
        check_max_overhead(True)
    assert check_max_overhead(None) is None and check_max_overhead(1) == 1.0


def test_the_pilot_scans_an_eighth_of_the_probe_and_extrapolates_linearly():
    # ceil(n / 8), at least 8, at most the probe.
    assert [pilot_size(n) for n in (1, 16, 64, 128, 129, 1000)] == [1, 8, 8, 16, 17, 125]
    assert pilot_size(64, min_samples=12) == 12
    # 16 of 128 samples in 0.5 s: 0.5 x 128 / 16 = 4 s; a scan costing 0.2 + 0.01 n (0.36 s for the pilot's 16)
    # is over-estimated (2.88 s against 1.48 s), never under-estimated.
    assert pilot_estimate(0.5, 16, 128) == 4.0
    assert pilot_estimate(0.2 + 0.01 * 16, 16, 128) >= 0.2 + 0.01 * 128
    # Spent 1 s, next scan 4 s, 20 s of training: (1 + 4) / 20.
    assert overhead_for_one_scan(20.0, 1.0, 4.0) == 0.25


@pytest.mark.parametrize("epochs, scans, budget, every, pilot, estimate, expected", [
    # 1 s epochs, 3 s scans, 50 %, an exact free pilot: 0 + 3 <= 0.5 x T at T = 6 (epoch 5); then 3 + 3 at T = 12.
    ([1.0] * 12, 3.0, 0.5, 1, 0.0, None, [5, 11]),
    # The pilot costs 1 s and over-estimates (4 s): 1 + 4 <= 0.5 x T at T = 10; then 1 + 3 + 3 > 0.5 x 12.
    ([1.0] * 12, 3.0, 0.5, 1, 1.0, 4.0, [9]),
    # With a cadence of 2 as well: epochs 1, 3, 5, 7 are due; spent + 1 <= 0.5 x T holds at T = 2, 4, 6, 8.
    ([1.0] * 8, 1.0, 0.5, 2, 0.0, None, [1, 3, 5, 7]),
    # Costs change scan by scan (the i-th made costs scans[i]); each decision uses the last measured cost:
    # e0: 0 + 1 <= 2 yes (spent 1); e1: 1 + 1 <= 4 yes (spent 5); e2: 5 + 4 > 6; e3: 9 > 8; e4: 9 <= 10 yes
    # (spent 6); e5: 7 <= 12 yes.
    ([2.0] * 6, [1.0, 4.0, 1.0, 1.0], 1.0, 1, 0.0, None, [0, 1, 4, 5]),
    # No budget: the cadence alone (no pilot).
    ([1.0] * 4, 10.0, None, 2, 5.0, None, [1, 3]),
    # A scan that costs 13 epochs (a small data set) at 10 %: the first once 0.1 x T >= 13, the next at 26.
    ([1.0] * 300, 13.0, 0.1, 1, 0.0, None, [129, 259]),
    # The same with a pilot of 1.5 s estimating 8 x too much (104 s): 1.5 + 104 > 0.1 x 300: no scan at all.
    ([1.0] * 300, 13.0, 0.1, 1, 1.5, 104.0, []),
])
def test_plan_scans_against_hand_computed_decisions(epochs, scans, budget, every, pilot, estimate, expected):
    assert plan_scans(epochs, scans, budget, every_n_epochs=every, pilot_seconds=pilot,
                      first_estimate=estimate) == expected


class ScriptedClock(Callback):
    """The monitors' clock (``base.time.perf_counter``) made a script: each training epoch takes
    ``epoch_seconds``, each scan (and pilot) of ``probe`` samples ``fixed + per_probe x probe / probe_size``.
    Put it first in the callbacks: its epoch end runs before the monitors decide."""

    def __init__(self, monkeypatch, epoch_seconds=1.0):
        self.t, self.epoch_seconds = 0.0, epoch_seconds
        self.calls = []  # (monitor, epoch, probe samples) of every scan and pilot
        monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=lambda: self.t))

    def on_train_epoch_end(self, trainer, pl_module):
        self.t += self.epoch_seconds

    def cost(self, monitor, fixed, per_probe):
        real = monitor.scan

        def scan(trainer, pl_module, probe):
            out = real(trainer, pl_module, probe)
            self.calls.append((monitor, trainer.current_epoch, len(probe)))
            self.t += fixed + per_probe * len(probe) / monitor.probe_size
            return out

        monitor.scan = scan
        return monitor


def fit(tmp_path, callbacks, epochs=3, logger=False):
    seed_everything(0, verbose=False)  # torch, NumPy and random
    data = TensorDataset(torch.rand(32, 1, 16, 16), torch.randint(0, 10, (32,)))
    module = ImageClassifier(SimpleCNN(width=(4, 8, 8)))
    trainer = make_trainer(tmp_path, logger=logger, callbacks=callbacks, max_epochs=epochs, limit_val_batches=0,
                           enable_checkpointing=False)
    trainer.fit(module, DataLoader(data, batch_size=16, shuffle=True))
    return trainer


def scanned(cb):
    return [h["epoch"] for h in cb.history if "fit_end" not in h]


def test_decisions_of_a_real_fit_on_a_scripted_clock(tmp_path, monkeypatch, caplog):
    # A scan costs 1 + 2 n / 16 s: the pilot (8 of the 16 probe samples) 2 s, estimated at 2 x 16 / 8 = 4 s;
    # a scan 3 s. Epochs of 1 s, max_overhead=1: e0..e4 wait (2 + 4 > T); e5: 2 + 4 <= 6 yes (spent 5);
    # e6: 5 + 3 > 7; e7: 8 <= 8 yes.
    clock = ScriptedClock(monkeypatch)
    monitor = clock.cost(LearningImageLogger("model.relu2", probe_size=16, num_images=1, max_overhead=1.0), 1.0, 2.0)
    fit(tmp_path, [clock, monitor], epochs=8)
    assert monitor.pilot_seconds == 2.0 and monitor.scan_estimate == 4.0 and monitor.scan_seconds == [3.0, 3.0]
    assert scanned(monitor) == [5, 7] == plan_scans([1.0] * 8, 3.0, 1.0, pilot_seconds=2.0, first_estimate=4.0)

    # At max_overhead=0.1 none fits in 3 epochs: train end says so, once, with the estimate, the training time
    # and the budget that would allow one: (2 + 4) / 3 = 2.
    clock = ScriptedClock(monkeypatch)
    monitor = clock.cost(LearningImageLogger("model.relu2", probe_size=16, num_images=1, max_overhead=0.1), 1.0, 2.0)
    with pytest.warns(UserWarning, match=r"made no scan") as record:
        fit(tmp_path, [clock, monitor], epochs=3)
    [warning] = [str(w.message) for w in record if "made no scan" in str(w.message)]
    assert ("LearningImageLogger (model.relu2) made no scan in this fit: one scan is estimated at 4.0 s (a pilot of "
            "8 of 16 probe samples took 2.00 s), the training took 3.0 s and the budgeted monitors spent 2.0 s, so "
            "max_overhead=0.1 allowed none. max_overhead=2 would allow one scan") in warning
    assert "every_n_epochs=3 for one scan at the last epoch" in warning and scanned(monitor) == []

    # Two monitors share the budget; the second pilots once the budget has room for a pilot costed as the first's.
    # e0 (T = 1): A pilots (spent 2), 2 + 4 > 1; B waits (2 + 2 > 1) until e3 (4 <= 4; spent 4). A scans once
    # 4 + 4 <= T, at e7 (spent 7); B then needs 7 + 4 > 8. B warns: (7 + 4) / 8 = 1.375 would allow one.
    clock = ScriptedClock(monkeypatch)
    a, b = (clock.cost(LearningImageLogger(layer, probe_size=16, num_images=1, max_overhead=1.0), 1.0, 2.0)
            for layer in ("model.relu2", "model.relu3"))
    with pytest.warns(UserWarning, match=r"LearningImageLogger \(model.relu3\) made no scan.*spent 7.0 s.*"
                                         r"max_overhead=1.38 would allow one scan"):
        fit(tmp_path, [clock, a, b], epochs=8)
    assert (scanned(a), scanned(b), a.pilot_seconds, b.pilot_seconds) == ([7], [], 2.0, 2.0)
    assert [(epoch, n) for cb, epoch, n in clock.calls if cb is b] == [(3, 8)]  # B's pilot, at e3
    assert [(epoch, n) for cb, epoch, n in clock.calls if cb is a] == [(0, 8), (7, 16)]
    assert pilot_fits_budget(4.0, 2.0, 2.0, 1.0) and not pilot_fits_budget(3.0, 2.0, 2.0, 1.0)
    assert pilot_fits_budget(0.0, 0.0, None, 1e-9)  # the first pilot of a fit: nothing to go by

    # The fit-end exact rescan is budgeted too, costed as the last scan. A scan costs n / 16 s: the pilot (8 of
    # 16, k_max + 2 = 5 fewer) 0.5 s, estimated at 1 s = a scan. e0: 0.5 + 1 > 0.5; e1: 1.5 > 1; e2: 1.5 <= 1.5
    # yes (spent 1.5); e3: 2.5 > 2; fit end: 2.5 > 2: no rescan, the flags stay the last (pooled) scan's.
    clock = ScriptedClock(monkeypatch)
    anomaly = clock.cost(AnomalyFilterMonitor("model.relu3", probe_size=16, k_max=3, max_overhead=0.5), 0.0, 1.0)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [clock, anomaly], epochs=4)
    assert scanned(anomaly) == [2] == plan_scans([1.0] * 4, 1.0, 0.5, pilot_seconds=0.5, first_estimate=1.0)
    assert anomaly.filter_scores().settings.get("scanned") != "fit end" and "no exact rescan at fit end" in caplog.text


def test_monitors_follow_the_budget_in_a_real_fit(tmp_path):
    def monitors(budget, **kw):
        return [AnomalyFilterMonitor("model.relu3", probe_size=16, k_max=3, max_overhead=budget, **kw),
                LearningImageLogger("model.relu2", probe_size=4, num_images=1, max_overhead=budget, **kw)]

    # A budget no scan can fit: the first monitor's pilot estimates its scan and overdraws the budget, so the
    # second never pilots; neither scans, and each says so and what would allow a scan.
    tight = monitors(1e-9)
    with pytest.warns(UserWarning) as record:
        fit(tmp_path, tight)
    said = [str(w.message) for w in record if "made no scan in this fit" in str(w.message)]
    assert len(said) == 2 and "max_overhead=" in said[0] and "would allow one scan" in said[0]
    assert "before this monitor could estimate its scan" in said[1] and "every_n_epochs=3" in said[1]
    assert [scanned(cb) for cb in tight] == [[], []] and tight[0].scan_estimate is not None and tight[1].pilot_seconds is None
    # A budget every scan fits: the cadence decides.
    loose = monitors(1e9)
    fit(tmp_path, loose)
    assert [scanned(cb) for cb in loose] == [[0, 1, 2], [0, 1, 2]]
    assert loose[0].filter_scores().settings.get("scanned") == "fit end"
    loose = monitors(1e9, every_n_epochs=2)
    fit(tmp_path, loose, epochs=4)
    assert [scanned(cb) for cb in loose] == [[1, 3], [1, 3]]


def same(a, b) -> bool:
    """Equal, recursively: tensors and arrays element for element (and dtype), containers entry for entry."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class DrawingLogger(LearningImageLogger):
    """A user's monitor whose scan draws from the global generators (torch, NumPy, ``random``) and keeps a count."""

    def scan(self, trainer, pl_module, probe):
        self.draws = getattr(self, "draws", 0) + 1
        scalars = super().scan(trainer, pl_module, probe)
        return {**scalars, "interp/draw": float(torch.rand(()) + np.random.rand() + random.random())}


def test_the_pilot_changes_neither_the_monitor_nor_the_training(tmp_path):
    def monitors(**kw):
        return [AnomalyFilterMonitor("model.relu3", probe_size=32, k_max=3, **kw),
                TIPMonitor("model.relu3", probe_size=32, **kw), DrawingLogger("model.relu2", probe_size=8, **kw)]

    # The same seeded fit twice, once with a budget that lets every scan through (a pilot runs before the first
    # scan of each monitor) and once without: the same weights, the same scans, the same logged metrics.
    budgeted, plain = monitors(max_overhead=1e9), monitors()
    runs = [fit(tmp_path / name, cbs, epochs=2, logger=CSVLogger(tmp_path / name))
            for name, cbs in (("budgeted", budgeted), ("plain", plain))]
    assert all(cb.pilot_seconds is not None for cb in budgeted) and all(cb.pilot_seconds is None for cb in plain)
    for a, b in zip(*(r.lightning_module.state_dict().values() for r in runs)):
        assert torch.equal(a, b)
    for a, b in zip(budgeted, plain):
        assert same(a.state_dict(), b.state_dict()) and a.history and a.state_dict()["history"] == b.state_dict()["history"]
    assert {k: float(v) for k, v in runs[0].logged_metrics.items()} == {k: float(v) for k, v in runs[1].logged_metrics.items()}

    # A pilot after the fit: state_dict, pictures, metrics, files under the log dir and the generators as before.
    trainer, files = runs[1], sorted(p.relative_to(tmp_path) for p in (tmp_path / "plain").rglob("*"))
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    for cb in plain:
        before, figures = copy.deepcopy(cb.state_dict()), copy.deepcopy(cb.figures)
        metrics = dict(trainer.callback_metrics)
        cb.run_pilot(trainer, trainer.lightning_module)
        assert cb.scan_estimate > 0 and same(cb.state_dict(), before)
        assert figures and same(cb.figures, figures)
        assert dict(trainer.callback_metrics) == metrics and not cb._piloting
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "plain").rglob("*")) == files
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2] and plain[2].draws == 2  # the two scans of the fit, not the pilot


class WholeProbeLogger(LearningImageLogger):
    """A monitor whose scan refuses anything but its whole probe: its pilot (a slice) fails."""

    def scan(self, trainer, pl_module, probe):
        if len(probe) < self.probe_size:
            raise ValueError(f"needs all {self.probe_size} samples")
        return super().scan(trainer, pl_module, probe)


def test_a_failing_pilot_warns_and_the_first_scan_measures(tmp_path):
    monitor = WholeProbeLogger("model.relu2", probe_size=32, num_images=1, max_overhead=1e-9)
    with pytest.warns(UserWarning, match=r"WholeProbeLogger could not estimate a scan's cost \(its pilot scan of 8 "
                                         r"probe samples failed.*ValueError: needs all 32 samples"):
        fit(tmp_path, [monitor])
    assert monitor.scan_estimate is None and scanned(monitor) == [0] and monitor.skipped_scans == []
    with pytest.raises(ValueError, match="needs all 32 samples"):  # strict: the pilot raises like a scan
        fit(tmp_path, [WholeProbeLogger("model.relu2", probe_size=32, num_images=1, max_overhead=1e-9, strict=True)])
