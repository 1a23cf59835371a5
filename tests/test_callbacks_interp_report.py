"""lightning_interp.callbacks.interp_report: the section "Which filters hold what it memorised?" (issue 22)."""

import os
import re

import lightning.pytorch as pl
import torch
from conftest import make_trainer

from lightning_interp.callbacks import FilterMasking, InterpReport, MemorisationScorer, SampleDynamicsMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.memorisation import filter_contributions, memorisation_scores
from lightning_interp.models import ImageClassifier, SimpleCNN


def test_the_memorisation_filters_appear_beside_the_suspects_they_hold(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    pl.seed_everything(0)
    dm = DigitsDataModule(image_size=16, batch_size=64, label_noise=0.3)
    module = ImageClassifier(SimpleCNN(in_channels=1, width=(8, 16, 16)), lr=0.01)
    layers = ["model.relu2", "model.relu3"]
    monitor = SampleDynamicsMonitor(track_size=256, num_images=0)
    scorer = MemorisationScorer(monitor, module, layers, max_suspects=32)
    # Found as the source of a callback (no masks in force within these epochs); `InterpReport(scores=[scorer])` also works.
    masking = FilterMasking(scorer, start_epoch=100)
    report = InterpReport(str(tmp_path / "report"))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(tmp_path, max_epochs=8, limit_train_batches=None, limit_val_batches=2, logger=logger,
                           callbacks=[monitor, masking, report])
    trainer.fit(module, datamodule=dm)
    logger.experiment.finish()
    page = open(report.path, encoding="utf-8").read()
    assert "Which filters hold what it memorised?" in page
    # The oracle: the memorisation scores of the monitor's flagged samples, computed here, and each top
    # filter's largest per-sample contributions.
    x, y, suspects = monitor.flagged_samples(32, fitted=True)  # the scorer's suspects: flagged and fitted
    expected = memorisation_scores(module, layers, x, y, suspects)
    contrib = filter_contributions(module, layers, x[suspects], y[suspects])
    positions = monitor.flagged_positions(32, fitted=True)[0][: int(suspects.sum())]
    table = page.split("Top memorisation filters")[1].split("</table>")[0]
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    for layer in layers:
        top = torch.argsort(-expected.scores[layer].double(), stable=True)[:3].tolist()
        rows = [c for c in cells if c[0] == layer]
        assert [int(c[1]) for c in rows] == top
        for c, k in zip(rows, top):
            held = torch.argsort(-contrib[layer][:, k].double(), stable=True)[: min(4, len(positions))].tolist()
            assert c[3] == str([int(monitor.latest.indices[positions[p]]) for p in held])
        assert f"{layer}: filters {top}" in page
        src = re.search(rf'<img src="(figures/[^"]+)" alt="interp/samples/memorisation_filters/{layer}"', page)
        assert src and os.path.getsize(os.path.join(os.path.dirname(report.path), src.group(1))) > 0
    # The figures went to W&B too (media files are named after the key's last part).
    media = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "wandb") for f in fs]
    for layer in layers:
        assert any("memorisation_filters" in m and os.path.basename(m).startswith(layer + "_") for m in media), media
