"""lightning_interp.scores: the one contract for filter scores and flags, from any scorer to any consumer."""

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer

from lightning_interp.callbacks import (
    FilterMasking,
    InterpReport,
    PruneFlaggedFilters,
    TIPMonitor,
    load_pruned,
)
from lightning_interp.metrics.anomaly import AnomalyCriteria, anomaly_scores, detect_anomaly_filters
from lightning_interp.models import ImageClassifier, SimpleCNN
from lightning_interp.scores import (
    ANOMALY_REPORT_FORMAT,
    FilterScores,
    Selection,
    check_source,
    resolve_scores,
)


def random_scores(seed=0, layers=(("a", 7), ("b.c", 12))):
    g = torch.Generator().manual_seed(seed)
    # Rounded so that ties occur and the tie rule is exercised.
    return FilterScores({name: (torch.rand(k, generator=g) * 4).round() for name, k in layers}, {}, "test")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("amount,lowest", [(3, False), (3, True), (0.25, False), (0.5, True), (1.0, False), (0, True)])
def test_select_matches_a_numpy_ranking(seed, amount, lowest):
    scores = random_scores(seed)
    chosen = scores.select(amount, lowest=lowest)
    for layer, s in scores.scores.items():
        v = s.numpy().astype(np.float64)
        k = len(v)
        n = amount if isinstance(amount, int) else max(1, int(math.floor(amount * k + 0.5)))
        # Oracle: NumPy's stable sort of (score, index) pairs — the highest (lowest) scores, lower index first on ties.
        order = np.lexsort((np.arange(k), v if lowest else -v))
        assert chosen.flagged[layer] == tuple(sorted(order[:n].tolist()))
    assert chosen.scores.keys() == scores.scores.keys()
    assert chosen.settings["selection"] == f"{'lowest' if lowest else 'highest'} {amount}"


def test_select_refuses_bad_amounts_and_flags_without_scores():
    scores = random_scores()
    for bad, error in ((-1, ValueError), (1.5, ValueError), (0.0, ValueError), ("3", TypeError), (True, TypeError)):
        with pytest.raises(error, match="amount"):
            scores.select(bad)
    with pytest.raises(ValueError, match="flags but no scores"):
        FilterScores({}, {"a": [1]}, "given").select(1)


def test_construction_checks_shapes_indices_and_details():
    with pytest.raises(ValueError, match="1-D"):
        FilterScores({"a": torch.zeros(2, 3)}, {}, "x")
    with pytest.raises(ValueError, match=r"\[0, 3\] but got \[4, 7\]"):  # the offending indices, named
        FilterScores({"a": torch.zeros(4)}, {"a": [1, 4, 7]}, "x")
    with pytest.raises(ValueError, match="non-negative"):
        FilterScores({}, {"a": [-1]}, "x")
    with pytest.raises(ValueError, match=r"non-negative.*but got \[-1\]"):
        FilterScores({}, {"a": [2, -1]}, "x")  # mixed: the lowest index is the negative one
    with pytest.raises(TypeError, match="lists of filter indices"):
        FilterScores({}, {"a": [1.5]}, "x")
    with pytest.raises(ValueError, match="one detail entry per flagged filter"):
        FilterScores({"a": torch.zeros(4)}, {"a": [1, 2]}, "x", details={"a": [{"n": 1}]})
    s = FilterScores({"a": torch.arange(4.0)}, {"a": torch.tensor([3, 1, 3])}, "x")
    assert s.flagged == {"a": (1, 3)} and s.flags() == {"a": [1, 3]} and s.count == 2 and s.num_filters("a") == 4


def test_json_round_trip_and_prefix(tmp_path):
    scores = FilterScores(
        {"model.l1": torch.tensor([0.5, float("nan"), 2.0]), "model.l2": torch.tensor([1.0, 3.0])},
        {"model.l1": [2], "model.l2": []}, "anomaly", higher_is="more", epoch=4, settings={"k_max": 3},
        details={"model.l1": [{"num_clusters": 3, "cluster_sizes": [5, 1]}]},
    )
    path = scores.save(tmp_path / "s.json", extra_key=1)
    data = json.loads(open(path).read())
    assert data["format"] == "lightning_interp.filter_scores/1" and data["extra_key"] == 1
    back = FilterScores.load(path)
    assert back.flagged == scores.flagged and back.details == scores.details and back.epoch == 4
    assert back.settings == {"k_max": 3} and back.scorer == "anomaly" and back.higher_is == "more"
    for layer in scores.scores:
        torch.testing.assert_close(back.scores[layer], scores.scores[layer], equal_nan=True)
    bare = back.strip_prefix("model.")
    assert bare.flags() == {"l1": [2]} and set(bare.scores) == {"l1", "l2"}
    columns, rows = scores.rows()
    assert columns == ["layer", "filter", "score", "num_clusters", "cluster_sizes"]
    assert rows == [["model.l1", 2, 2.0, 3, [5, 1]]]


def test_an_anomaly_report_written_before_scores_existed_gives_its_flags(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": ANOMALY_REPORT_FORMAT, "layers": {
        "model.relu2": {"num_filters": 8, "flagged": [{"filter": 4, "epoch": 2}, {"filter": 3, "epoch": 2}]}}}))
    scores = FilterScores.load(path)
    assert scores.flags() == {"model.relu2": [3, 4]} and scores.scorer == "anomaly" and not scores.scores
    path.write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match="lightning_interp.filter_scores/1"):
        FilterScores.load(path)


def test_anomaly_scores_carry_the_detectors_flags_and_ch_index():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 5, 2, generator=g)
    feats[:4, 1] += 12.0  # filter 1: a small far cluster (an outlier cluster of 4 samples)
    res = detect_anomaly_filters(feats, torch.ones(5), AnomalyCriteria(min_cluster_size=5, k_max=4, beta=0.0))
    scores = anomaly_scores({"relu3": res}, epoch=7, settings=AnomalyCriteria(min_cluster_size=5, k_max=4))
    assert scores.flagged["relu3"] == tuple(res.flagged) and 1 in res.flagged
    torch.testing.assert_close(scores.scores["relu3"], res.ch_index.float())
    assert scores.settings["k_max"] == 4 and scores.epoch == 7
    d = scores.details["relu3"][res.flagged.index(1)]
    assert d["outlier_clusters"] >= 1 and d["num_clusters"] == int(res.num_clusters[1]) and d["epoch"] == 7
    assert sum(d["cluster_sizes"]) == 60


def test_resolve_every_kind_of_source(tmp_path):
    scores = random_scores()
    assert resolve_scores(scores) is scores
    assert resolve_scores({"a": [2, 1]}).flags() == {"a": [1, 2]}
    path = scores.select(2).save(tmp_path / "s.json")
    assert resolve_scores(path).flags() == scores.select(2).flags()
    assert resolve_scores(lambda: path, Selection(amount=1, lowest=True)).flags() == scores.select(1, lowest=True).flags()
    with pytest.raises(ValueError, match="scores of 'sou'"):
        resolve_scores(scores, Selection("sou"))
    with pytest.raises(TypeError, match="map layer names to lists of filter indices"):
        check_source([3, 7])
    with pytest.raises(ValueError, match="flags but no scores"):
        check_source({"a": [1]}, Selection(amount=2))
    with pytest.raises(TypeError, match="Selection"):
        check_source(scores, select={"amount": 2})
    with pytest.raises(ValueError, match="amount"):
        Selection(amount=2.5)


def test_a_monitor_is_a_source_and_its_score_names_are_checked_before_training():
    tip = TIPMonitor("model.relu3", probe_size=16)
    with pytest.raises(ValueError, match=r"one of \[.*'sou'\].*'saliency'"):
        FilterMasking(tip, select=Selection("saliency", amount=2))
    assert tip.filter_scores("sou").layers == []  # before its first scan: nothing to mask


class RecordSoU(pl.Callback):
    """Placed after the TIP monitor: each epoch's SoU of relu3, as the monitor scanned it."""

    def __init__(self, tip):
        self.tip, self.sou = tip, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.sou.append(self.tip.last["model.relu3"]["sou"].clone())


def test_prune_and_mask_by_tip_saliency_in_a_real_run(tmp_path, digits):
    """Users prune by a TIP score as easily as by anomaly flags: the same consumers, one Selection."""
    tip = TIPMonitor("model.relu3", probe_size=16, top_filters=0, aipc_fractions=(0.0, 0.5))
    record = RecordSoU(tip)
    lowest_two = Selection("sou", amount=2, lowest=True)
    masking = FilterMasking(tip, select=lowest_two, start_epoch=1)
    prune = PruneFlaggedFilters(tip, select=lowest_two, out_path=str(tmp_path / "pruned.pt"), evaluate=False)
    report = InterpReport(str(tmp_path / "report"), scores=[(tip, lowest_two)])
    module = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[tip, record, masking, prune, report], max_epochs=2)
    trainer.fit(module, datamodule=digits)

    def two_lowest(sou):  # the oracle: NumPy's stable argsort of the scanned SoU
        return sorted(np.argsort(sou.double().numpy(), kind="stable")[:2].tolist())

    # Epoch 1 masked the two least salient filters of epoch 0's scan.
    assert masking.history[1]["filters"] == {"model.relu3": two_lowest(record.sou[0])}
    # Pruning removed the two least salient filters of the last scan: the other conv3 filters are kept as they were.
    removed = two_lowest(record.sou[-1])
    keep = [k for k in range(16) if k not in removed]
    pruned, summary = load_pruned(tmp_path / "pruned.pt", SimpleCNN(width=(8, 16, 16)))
    assert summary["channels"]["conv3"] == [16, 14]
    torch.testing.assert_close(pruned.conv3.weight, module.model.conv3.weight.detach()[keep])
    assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    html = open(report.path).read()
    assert "Filter scores: tip/sou (lowest 2)" in html


def test_fq_diversity_is_a_source_for_masking_in_a_real_run(tmp_path):
    """FeatureQuantityMonitor's diversity and FQ travel the same way (shapes carry the masks FQ needs)."""
    from lightning_interp.callbacks import FeatureQuantityMonitor
    from lightning_interp.data import ShapesDataModule

    data = ShapesDataModule(num_train=64, num_val=32, num_test=16, batch_size=32, image_size=16)
    fq = FeatureQuantityMonitor("model.relu3", probe_size=8, top_neurons=4, num_diverse=2)
    least_diverse = Selection("diversity", amount=3, lowest=True)
    masking = FilterMasking(fq, select=least_diverse, start_epoch=1, when="eval_only")
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[fq, masking], max_epochs=2)
    trainer.fit(module, datamodule=data)

    diversity = fq.filter_scores()
    assert diversity.scorer == "fq/diversity" and diversity.scores["model.relu3"].shape == (8,)
    torch.testing.assert_close(diversity.scores["model.relu3"], fq.diversity["model.relu3"].float())
    assert fq.filter_scores("fq").scores["model.relu3"].shape == (8,)
    # The flags a consumer gets now are the 3 least diverse filters of the last scan (ties: lower index).
    expected = sorted(torch.argsort(fq.diversity["model.relu3"].double(), stable=True)[:3].tolist())
    assert resolve_scores(fq, least_diverse).flags() == {"model.relu3": expected}
    # Epoch 1 masked 3 filters chosen from epoch 0's scan.
    assert masking.history[0]["num_masked"] == 0 and masking.history[1]["num_masked"] == 3


def test_a_source_that_cannot_answer_masks_nothing_and_never_loses_the_run(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,)))  # (x, y): no foreground masks
    tip = TIPMonitor("model.relu3", probe_size=16, top_filters=0, aipc_fractions=(0.5,))
    # `fg_mean` needs foreground masks, which these batches do not have: known only once the probe exists.
    masking = FilterMasking(tip, select=Selection("fg_mean", amount=2), start_epoch=1)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[tip, masking], max_epochs=2)
    with pytest.warns(UserWarning, match="FilterMasking masks nothing at epoch 1.*no 'fg_mean' scores"):
        trainer.fit(ImageClassifier(SimpleCNN(width=(8, 16, 16))), DataLoader(data, batch_size=16),
                    DataLoader(data, batch_size=16))
    assert trainer.current_epoch == 2 and masking.history[1]["num_masked"] == 0


def test_a_saved_file_without_a_scorer_and_details_with_a_filter_key(tmp_path):
    import json

    from lightning_interp.scores import ANOMALY_REPORT_FORMAT, SCORES_FORMAT

    layers = {"a": {"scores": [0.1, 0.9], "flagged": [{"filter": 1, "clusters": 3}]}}
    for fmt, scorer in ((SCORES_FORMAT, "given"), (ANOMALY_REPORT_FORMAT, "anomaly")):
        path = tmp_path / f"{scorer}.json"
        path.write_text(json.dumps({"format": fmt, "layers": layers}))  # hand-written: no "scorer" key
        loaded = FilterScores.load(path)
        assert loaded.scorer == scorer and loaded.flags() == {"a": [1]}
    # Details whose keys were built at run time (e.g. read from JSON) keep "filter" out of the extra columns.
    details = json.loads('{"a": [{"filter": 1, "clusters": 3}]}')
    columns, rows = FilterScores({"a": torch.tensor([0.1, 0.9])}, {"a": [1]}, "x", details=details).rows()
    assert columns.count("filter") == 1 and rows[0][:2] == ["a", 1]


def test_a_selection_is_a_frozen_value():
    import dataclasses

    sel = Selection("sou", amount=2, lowest=True)
    assert sel == Selection("sou", amount=2, lowest=True) and hash(sel) == hash(Selection("sou", 2, True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.amount = 3
