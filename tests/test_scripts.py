"""Every script under ``benchmarks/`` and ``experiments/`` runs end to end at ``--tiny`` size.

The scripts are found by glob, so a new one is covered the day it lands (and fails here until it takes
``--tiny``). Each runs in this process (``runpy``, as ``python <script> --tiny`` would, without paying
the torch import again) from an empty working directory, on generated data: nothing here reads
``../shared/data/cifar10``. A refactor that breaks a script's imports, a renamed function or a changed
return type fails here instead of on the day someone re-runs the measurement. The committed results
next to the scripts must come out of the run unchanged, and nothing may be left in the working directory:
tiny outputs go to a temporary folder that the script removes.
"""

from __future__ import annotations

import hashlib
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("benchmarks", "experiments")
SCRIPTS = sorted(p for folder in FOLDERS for p in (ROOT / folder).glob("*.py") if not p.name.startswith("_"))


def _tree_digest() -> dict[str, str]:
    """sha1 of every file under the scripts' folders (the committed results included)."""
    return {str(p.relative_to(ROOT)): hashlib.sha1(p.read_bytes()).hexdigest()
            for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


#: Every script, named: a new one is added here (test_every_script_is_listed fails until it is).
LISTED = (
    "benchmarks/anomaly.py",
    "benchmarks/chunks.py",
    "benchmarks/dynamics_overhead.py",
    "benchmarks/memory.py",
    "benchmarks/nns.py",
    "benchmarks/overhead.py",
    "benchmarks/prune_latency.py",
    "benchmarks/sketch.py",
    "benchmarks/user_module.py",
    "experiments/anomaly_overfitting.py",
    "experiments/cheap_scan_signal.py",
    "experiments/decoy_guidance.py",
    "experiments/live_masking.py",
    "experiments/memorisation_filters.py",
    "experiments/memorisation_pruning.py",
    "experiments/overfitting_signals.py",
    "experiments/sample_dynamics.py",
    "experiments/sketch_agreement.py",
    "experiments/sketch_directions.py",
    "experiments/thesis_tables.py",
    "experiments/tip_sketch_agreement.py",
)


def test_every_script_is_listed():
    assert sorted(str(p.relative_to(ROOT)) for p in SCRIPTS) == sorted(LISTED)


@pytest.mark.parametrize("script", [ROOT / name for name in LISTED], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_runs_tiny(script: Path, tmp_path, monkeypatch, capsys):
    assert '"--tiny"' in script.read_text(), (
        f"{script.relative_to(ROOT)} takes no --tiny flag: give it one that runs its real code paths in seconds on "
        "generated data, writing only to a temporary folder (see benchmarks/overhead.py)")
    before = _tree_digest()
    threads = torch.get_num_threads()
    modules = set(sys.modules)
    monkeypatch.chdir(tmp_path)  # relative default paths (runs/...) land here, not in the checkout
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:  # argparse errors and sys.exit("...") land here
        assert exit_.code in (None, 0), f"{script.name} --tiny exited with {exit_.code!r}:\n{capsys.readouterr().err[-3000:]}"
    finally:
        torch.set_num_threads(threads)
        # Sibling modules a script imported (experiments/overfitting_signals.py) keep module state
        # (SPLITS): the next script imports them afresh.
        for name in set(sys.modules) - modules:
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(script.parent)):
                del sys.modules[name]
    assert capsys.readouterr().out.strip(), f"{script.name} --tiny printed nothing"
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not left, f"{script.name} --tiny left files in the working directory (use a temporary folder): {left}"
    after = _tree_digest()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{script.name} --tiny wrote into the checkout: {changed}"
