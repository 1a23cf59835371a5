import importlib.util
import os

import pytest

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


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
