"""lightning_interp.html_report: the page a recipe writes renders its figures in headless Chromium."""

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch
from conftest import run_recipe
from PIL import Image


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_required() -> bool:
    """In CI (``CI`` set true, as .ci/run and the CI services do) or when asked, a missing browser is a failure."""
    return any(os.environ.get(key, "").lower() not in ("", "0", "false", "no")
               for key in ("CI", "LIGHTNING_INTERP_REQUIRE_CHROMIUM"))


def _browser() -> str:
    """Chromium's path; without it the test fails in CI (a failed install must not pass as a skip), else skips."""
    browser = _chromium()
    if browser is None:
        if _chromium_required():
            pytest.fail("chromium is required in CI (CI or LIGHTNING_INTERP_REQUIRE_CHROMIUM is set) but not "
                        "installed: install Debian's `chromium` package")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return browser


@pytest.mark.parametrize("env, outcome", [({"CI": "true"}, "fail"), ({"LIGHTNING_INTERP_REQUIRE_CHROMIUM": "1"}, "fail"),
                                          ({"CI": "false"}, "skip"), ({}, "skip")])
def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch, env, outcome):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LIGHTNING_INTERP_REQUIRE_CHROMIUM", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception):
        _browser()


def test_html_report_renders_its_figures_in_headless_chromium(tmp_path):
    browser = _browser()
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
