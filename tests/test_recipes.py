"""The recipes in recipes/, end to end at a tiny size: the YAML ones through ``lightning-interp fit``, the
Python ones through their ``main``."""

import glob
import importlib.util
import json
import os

import pytest
from conftest import RECIPES, run_recipe, write_fake_imagefolder

from lightning_interp.scores import FilterScores

YAMLS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(RECIPES, "*.yaml")))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(RECIPES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_recipe_runs_tiny(tmp_path, capsys):
    load("demo").main(["--epochs", "1", "--out", str(tmp_path), "--limit-train-batches", "3"])
    out = capsys.readouterr().out
    assert "W&B offline run" in out and "Anomaly filters in model.relu3 per epoch" in out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shapes_tip_fq_recipe_runs_tiny(tmp_path):
    result = load("shapes_tip_fq").main(
        ["--epochs", "1", "--num-train", "64", "--image-size", "16", "--probe-size", "8", "--out", str(tmp_path)]
    )
    assert os.path.isdir(result["run_dir"])
    assert any(k.startswith("interp/tip/") for k in result["metrics"])
    assert any(k.startswith("interp/fq/") for k in result["metrics"])


@pytest.mark.parametrize("name", YAMLS)
def test_recipe_runs_and_writes_its_reports(name, tmp_path):
    assert {"demo", "shapes_tip_fq", "decoy_guidance", "cifar10_resnet18"} <= set(YAMLS)
    root = write_fake_imagefolder(tmp_path / "cifar") if name == "cifar10_resnet18" else None
    config = run_recipe(name, tmp_path, root)
    callbacks = [cb["class_path"].rsplit(".", 1)[-1] for cb in config["trainer"]["callbacks"]]
    page = tmp_path / "interp_report" / "index.html"
    assert page.exists(), "every recipe writes the HTML report"
    html = page.read_text()
    for figure in glob.glob(str(tmp_path / "interp_report" / "figures" / "*.png")):
        assert f"figures/{os.path.basename(figure)}" in html
    assert (tmp_path / "config.yaml").exists()  # LightningCLI saved the resolved config
    if "AnomalyFilterMonitor" in callbacks:
        report = json.loads((tmp_path / "anomaly_report.json").read_text())
        assert [h["epoch"] for h in report["history"]] == list(range(config["trainer"]["max_epochs"]))
        assert "interp/anomaly/timeline" in html
        assert "Overfitting alarm (rule " in html
        FilterScores.load(tmp_path / "anomaly_report.json")
    if "LearningImageLogger" in callbacks:
        assert "learning_images" in html
    if "TIPMonitor" in callbacks:
        assert "interp/tip/" in html and "_aipc" in html
    assert glob.glob(str(tmp_path / "**" / "checkpoints" / "*.ckpt"), recursive=True)


def test_missing_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ImageFolder split.*CIFAR10"):
        run_recipe("cifar10_resnet18", tmp_path, str(tmp_path / "no_such_dir"))
