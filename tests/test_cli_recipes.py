"""The command line and the YAML recipes, end to end at a tiny size; the HTML report in Chromium."""

import glob
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import yaml
from PIL import Image

from lightning_interp.cli import main
from lightning_interp.scores import FilterScores

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
YAMLS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(RECIPES, "*.yaml")))


def write_fake_imagefolder(root, classes=("airplane", "cat", "dog"), n=(8, 4), size=32):
    """CIFAR-10's exported on-disk layout: <root>/<split>/<class>/<i>.png, 32×32 RGB."""
    rng = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), n):
        for c in classes:
            folder = os.path.join(root, split, c)
            os.makedirs(folder)
            for i in range(count):
                pixels = (torch.rand(size, size, 3, generator=rng) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def shrink(config: dict, tmp_path, data_root: str | None = None) -> dict:
    """The recipe at a size CI can run: two short epochs, small probes, logs under tmp_path."""
    t = config["trainer"]
    t.update(max_epochs=2, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
             default_root_dir=str(tmp_path), enable_model_summary=False, log_every_n_steps=1)
    t["logger"]["init_args"]["save_dir"] = str(tmp_path)
    data = config["data"]["init_args"]
    if config["data"]["class_path"].endswith("ShapesDataModule"):
        data.update(num_train=64, num_val=32, num_test=32)
    if config["data"]["class_path"].endswith("ImageFolderDataModule"):
        data.update(root=data_root, batch_size=4)
        config["model"]["init_args"]["arch_kwargs"]["num_classes"] = 3
    big = config["model"]["init_args"].get("arch") == "resnet18_cifar"
    if big:
        t["max_epochs"] = 1
    for cb in t["callbacks"]:
        args = cb.setdefault("init_args", {})
        name = cb["class_path"].rsplit(".", 1)[-1]
        if big and name in ("AnomalyFilterMonitor", "TIPMonitor"):
            # A forward pass of resnet18_cifar is ~0.25 s per image on one busy CPU core and 512
            # exact backward passes per scan are minutes: one epoch, tiny probes, sketch mode in CI.
            args.update(mode="sketch", num_projections=2)
        if "probe_size" in args:
            args["probe_size"] = (16 if name == "AnomalyFilterMonitor" else 8) // (2 if big else 1)
        if name == "AnomalyFilterMonitor":
            args.update(k_max=4, min_cluster_size=2)
        if name == "TIPMonitor":
            args.update(every_n_epochs=1, aipc_fractions=[0.0, 0.5], aipc_max_batches=1, top_filters=2)
        if name == "LearningImageLogger":
            args.update(num_images=2, max_filters=2 if big else 8, every_n_epochs=1)
        if name == "FeatureQuantityMonitor":
            args.update(top_neurons=2, eval_max_batches=1, diversity_neurons=8)
    return config


def run_recipe(name, tmp_path, data_root=None):
    with open(os.path.join(RECIPES, f"{name}.yaml")) as fh:
        config = shrink(yaml.safe_load(fh), tmp_path, data_root)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    import wandb

    wandb.finish()  # a process runs one recipe; here the next WandbLogger must not reuse this run
    return config


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
    assert report["history"][0]["val_acc"] is not None  # validated before the scan
    html = (out / "interp_report" / "index.html").read_text()
    assert "interp/nns/model.relu3/learning_images" in html and "interp/tip/model.relu3/aipc" in html
    from lightning_interp.models import ImageClassifier

    module = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    for k, v in module.state_dict().items():  # the scan never trains
        torch.testing.assert_close(v, before[k])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_its_figures_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("LIGHTNING_INTERP_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (LIGHTNING_INTERP_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    run_recipe("demo", tmp_path)
    page = tmp_path / "interp_report" / "index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    total = len(glob.glob(str(tmp_path / "interp_report" / "figures" / "*.png")))
    assert total >= 4  # training curves, anomaly timeline, learning images of four layers
    assert f'data-figures-loaded="{total}"' in dom and f'data-figures-total="{total}"' in dom
    for key in ("training/loss", "interp/anomaly/timeline", "interp/nns/model.relu3/learning_images"):
        assert f'alt="{key}"' in dom
    # Layout from the DOM (html_report's load script): no figure covers another, every figure is drawn
    # with a real size, and the timeline (legend below its plot area) is wider than tall.
    assert 'data-figures-overlapping="0"' in dom
    rendered = re.findall(r'alt="([^"]+)"[^>]*data-rendered="(\d+x\d+)"', dom)
    assert len(rendered) == total, "the load script did not record every figure's rendered size"
    sizes = {key: tuple(map(int, size.split("x"))) for key, size in rendered}
    assert all(w > 0 and h > 0 for w, h in sizes.values()), sizes
    width, height = sizes["interp/anomaly/timeline"]
    assert width > height, f"the timeline is drawn {width}x{height}"
    if "interp/anomaly/outlier_samples" in sizes:  # a labelled grid, not a one-thumbnail column
        width, height = sizes["interp/anomaly/outlier_samples"]
        assert width >= height, f"the outlier samples are drawn {width}x{height}"
    shot = tmp_path / "page.png"
    subprocess.run([browser, *flags, "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = torch.from_numpy(__import__("numpy").asarray(Image.open(shot).convert("L")))
    assert pixels.float().std() > 10  # a rendered page with pictures, not a blank one


def test_aipc_sweep_shows_progress(tmp_path, capfd):
    import lightning.pytorch as pl

    from lightning_interp.callbacks import TIPMonitor
    from lightning_interp.data import ShapesDataModule
    from lightning_interp.models import ImageClassifier

    data = ShapesDataModule(num_train=64, num_val=32, num_test=32)
    module = ImageClassifier(arch="simple_cnn", arch_kwargs={"in_channels": 3, "num_classes": 4, "width": [8, 8, 8]})
    tip = TIPMonitor(["model.relu2", "model.relu3"], probe_size=8, aipc_fractions=(0.0, 0.5), aipc_max_batches=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[tip])
    trainer.fit(module, datamodule=data)
    err = capfd.readouterr().err
    assert "AIPC model.relu2" in err and "AIPC model.relu3" in err and "TIP scan" in err
