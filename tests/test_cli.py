"""lightning_interp.cli: the commands (fit, scan, prune) and their error messages."""

import glob
import json

import pytest
import torch
from conftest import make_trainer, run_recipe

from lightning_interp.cli import main
from lightning_interp.data import DigitsDataModule
from lightning_interp.importance import importance_scores
from lightning_interp.models import ImageClassifier
from lightning_interp.pruning import load_pruned
from lightning_interp.scores import FilterScores


def test_unknown_command_and_bad_options_name_the_valid_choices(capsys):
    assert main(["train"]) == 2
    assert "fit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scan", "x.ckpt", "--layers", "[model.relu3]", "--datamodule", "digits", "--monitors", "[gradcam]"])
    assert "anomaly" in capsys.readouterr().err  # the valid monitor names


def test_scan_runs_monitors_on_a_checkpoint_without_training(tmp_path):
    run_recipe("demo", tmp_path)
    ckpt = sorted(glob.glob(str(tmp_path / "**" / "checkpoints" / "*.ckpt"), recursive=True))[-1]
    before = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    out = tmp_path / "scan"
    main(["scan", ckpt, "--layers", "[model.relu2, model.relu3]", "--datamodule", "digits",
          "--datamodule.image_size", "32", "--monitors", "[anomaly, learning_images, tip]",
          "--probe_size", "16", "--min_cluster_size", "2", "--max_eval_batches", "1", "--out", str(out),
          "--progress", "false"])
    report = json.loads((out / "anomaly_report.json").read_text())
    assert report["layers"]["model.relu2"]["num_filters"] == 64 and report["layers"]["model.relu3"]["num_filters"] == 64
    html = (out / "interp_report" / "index.html").read_text()
    assert "interp/nns/model.relu3/learning_images" in html and "interp/tip/model.relu3/aipc" in html
    module = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    # Validated before the scan: the report's accuracy is the checkpoint's on the whole validation split.
    digits = DigitsDataModule(image_size=32)
    digits.setup("validate")
    with torch.no_grad():
        right = [(module.eval()(x).argmax(1) == y) for x, y, *_ in digits.val_dataloader()]
    assert report["history"][0]["val_acc"] == pytest.approx(torch.cat(right).double().mean().item(), abs=1e-5)
    for k, v in module.state_dict().items():  # the scan never trains
        torch.testing.assert_close(v, before[k])


def test_cli_prune_from_checkpoint(tmp_path, digits):
    module = ImageClassifier(arch="simple_cnn", arch_kwargs={"width": [8, 16, 16]})
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1)
    trainer.fit(module, datamodule=digits)
    ckpt = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(ckpt)
    report = FilterScores({}, {"model.relu2": [3, 4]}, "given").save(tmp_path / "report.json")
    out = str(tmp_path / "pruned.pt")
    main(["prune", ckpt, "--report", report, "--out", out, "--datamodule", "digits"])
    trained = module
    module, summary = load_pruned(out, ImageClassifier(arch="simple_cnn", arch_kwargs={"width": [8, 16, 16]}))
    assert summary["channels"]["conv2"] == [16, 14] and "val_acc_after" in summary
    assert module.model.conv2.out_channels == 14  # the LightningModule itself: its network rebuilt at `model`
    saved = torch.load(out, weights_only=True)  # no pickle: plain data and tensors
    assert saved["model_attr"] == "model" and len(saved["plan"]["layers"]["conv2"]["kept"]) == 14
    main(["prune", ckpt, "--report", report, "--out", out, "--datamodule", "digits", "--round_to", "8"])
    summary = torch.load(out, weights_only=True)["summary"]
    assert summary["channels"]["conv2"] == [16, 8] and len(summary["rounded"]["conv2"]) == 6
    with pytest.raises(SystemExit):
        main(["prune", ckpt, "--report", report, "--out", out])  # no way to trace the model
    # Torch-Pruning's importance instead of a file: the 4 filters of conv2 with the lowest group L2 norm.
    main(["prune", ckpt, "--criterion", "l2", "--layers", "[model.relu2]", "--amount", "4", "--out", out,
          "--input-shape", "2,1,16,16"])
    rebuilt, summary = load_pruned(out, ImageClassifier(arch="simple_cnn", arch_kwargs={"width": [8, 16, 16]}))
    l2 = importance_scores(trained.model, ["relu2"], torch.randn(2, 1, 16, 16), "l2").scores["relu2"]
    assert summary["pruned"] == {"conv2": sorted(torch.argsort(l2)[:4].tolist())}
    assert rebuilt.model.conv2.out_channels == 12
    with pytest.raises(SystemExit, match="either --report FILE or --criterion"):
        main(["prune", ckpt, "--out", out, "--input-shape", "2,1,16,16"])
    with pytest.raises(SystemExit, match="needs --layers"):
        main(["prune", ckpt, "--criterion", "lamp", "--out", out, "--input-shape", "2,1,16,16"])
