"""The Python blocks of the Markdown documentation (``docs/**/*.md``, ``README.md``), run as tests.

Every fenced ``python`` block of a page runs, in order, in one namespace per page (a later block may use
what an earlier one defined), in a temporary working directory. ``lightning.pytorch.Trainer`` is
replaced while they run by a subclass that trains at most 2 epochs of 3 batches on the CPU, validates 2
batches and writes under the temporary directory: a block shows the settings a user would run, and the
test checks that exactly that code runs, not how well it trains. For the same reason the fit-end
evaluation sweeps that default to the whole validation set run on 2 batches (``TIPMonitor``'s AIPC at 3
fractions, ``FeatureQuantityMonitor``'s diversity masking) unless a block passes its own value
(:data:`CALLBACK_CAPS`).

A block that cannot run in a test (it needs CIFAR-10 on disk, a GPU or minutes of training) carries a
marker on the line above its fence, with the reason::

    <!-- docs-test: import-only: needs CIFAR-10 on disk -->
    ```python
    ...
    ```

It is then compiled (a syntax error fails) and its top-level imports are executed (a name that is not
exported fails). The marker is an HTML comment, so it does not show on the site.
"""

from __future__ import annotations

import ast
import importlib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\b[^\n]*$")
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<mode>[\w-]+)\s*:\s*(?P<reason>.*?)\s*-->")
MODES = ("import-only",)

#: What the replaced Trainer forces, whatever the block passes.
TRAINER_CAPS = dict(
    limit_train_batches=3,
    limit_val_batches=2,
    limit_test_batches=2,
    num_sanity_val_steps=0,
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=1,
    accelerator="cpu",
    devices=1,
)
MAX_EPOCHS = 2
#: Keyword defaults of callbacks replaced while the blocks run: ``{(module, class): {argument: value}}``.
CALLBACK_CAPS = {
    ("lightning_interp.callbacks.tip", "TIPMonitor"): {"aipc_max_batches": 2, "aipc_fractions": (0.0, 0.1, 0.5)},
    ("lightning_interp.callbacks.fq", "FeatureQuantityMonitor"): {"eval_max_batches": 2},
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    mode: str  # "run" or one of MODES
    reason: str = ""

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def markdown_pages() -> list[Path]:
    """Every Markdown page of the site, sorted."""
    return sorted(DOCS.rglob("*.md"))


def python_blocks(path: Path) -> list[Block]:
    """The fenced ``python`` blocks of one Markdown file, with the marker above each (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent = i, m.group("indent")
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: a ```python fence that is never closed.")
        i += 1
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.search(above)
        mode, reason = "run", ""
        if marker:
            mode, reason = marker.group("mode"), marker.group("reason")
            if mode not in MODES:
                raise ValueError(f"{path}:{start + 1}: expected a docs-test mode in {list(MODES)} but got {mode!r}.")
            if not reason:
                raise ValueError(f"{path}:{start + 1}: a docs-test marker must say why the block does not run.")
        code = textwrap.dedent("\n".join(line[len(indent):] if line.startswith(indent) else line for line in body))
        blocks.append(Block(path, start + 1, code + "\n", mode, reason))
    return blocks


def top_level_imports(block: Block) -> list[str]:
    """The block's top-level ``import``/``from ... import`` statements, as source."""
    tree = ast.parse(block.code, filename=block.where)
    return [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def capped_trainer(root: Path):
    """A ``Trainer`` subclass that keeps a documentation example to seconds (see the module docstring)."""
    from lightning.pytorch import Trainer

    class DocsTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            max_epochs = kwargs.get("max_epochs")
            kwargs["max_epochs"] = MAX_EPOCHS if max_epochs in (None, -1) else min(max_epochs, MAX_EPOCHS)
            kwargs.update(TRAINER_CAPS)
            kwargs.setdefault("default_root_dir", str(root))
            super().__init__(*args, **kwargs)

    return DocsTrainer


def run_blocks(blocks: list[Block], tmp_path: Path, monkeypatch) -> dict:
    """Run (or import-check) ``blocks`` in order in one namespace; returns the namespace."""
    import lightning
    import lightning.pytorch

    trainer = capped_trainer(tmp_path)
    for (module, name), caps in CALLBACK_CAPS.items():
        defaults = getattr(importlib.import_module(module), name).__init__.__kwdefaults__
        for argument, value in caps.items():
            assert argument in defaults, f"{name} has no keyword argument {argument!r}"
            monkeypatch.setitem(defaults, argument, value)
    monkeypatch.setattr(lightning.pytorch, "Trainer", trainer)
    monkeypatch.setattr(lightning, "Trainer", trainer)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    try:
        for block in blocks:
            compiled = compile(block.code, block.where, "exec")
            if block.mode == "run":
                exec(compiled, namespace)
            else:
                exec(compile("\n".join(top_level_imports(block)), block.where, "exec"), namespace)
    finally:
        import wandb

        if wandb.run is not None:  # a block's WandbLogger: finish its run, or the next test's logger reuses it
            wandb.finish()
    return namespace
