"""The documentation site: it builds with ``--strict`` (MkDocs Material + mkdocstrings), and every Python
block of its pages runs (or, where marked, is compiled and import-checked; see ``tests/doc_blocks.py``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from doc_blocks import (
    DOCS,
    MAX_EPOCHS,
    ROOT,
    TRAINER_CAPS,
    capped_trainer,
    markdown_pages,
    python_blocks,
    run_blocks,
)

PAGES = [p for p in markdown_pages() if python_blocks(p)]


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)


def test_the_site_builds_strict(tmp_path):
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    # mkdocstrings rendered the docstrings: a class's own docstring text is on its page.
    masking = (tmp_path / "site" / "callbacks" / "filter_masking" / "index.html").read_text()
    assert "Mask filters (channel outputs" in masking
    scores = (tmp_path / "site" / "api" / "scores" / "index.html").read_text()
    assert "FilterScores" in scores and "Selection" in scores
    # docs/hooks/sphinx_roles.py turned the docstrings' Sphinx roles into code: none is left verbatim.
    pages = [p.read_text() for p in (tmp_path / "site").rglob("*.html")]
    assert not [m for page in pages for m in re.findall(r":(?:class|func|meth|attr|data):`", page)]


def test_a_broken_link_fails_the_build(tmp_path):
    """The site's own validation settings turn a link to a missing page or anchor into a failed build."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n## Real\n\n[fine](#real)\n")
    small = {"site_name": "t", "docs_dir": "docs", "validation": config["validation"],
             "markdown_extensions": config["markdown_extensions"], "nav": [{"Home": "index.md"}]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(small))
    assert _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site").returncode == 0
    for broken in ("[gone](missing.md)", "[gone](#no-such-heading)"):
        (docs / "index.md").write_text(f"# Home\n\n{broken}\n")
        result = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
        assert result.returncode != 0, f"{broken} built: {result.stderr}"


def test_every_page_is_in_the_nav():
    """A page outside the nav is unreachable on the site (the build fails too: omitted_files = warn)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def paths(nav):
        for item in nav:
            if isinstance(item, str):
                yield item
            else:
                for value in item.values():
                    yield from ([value] if isinstance(value, str) else paths(value))

    listed = set(paths(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in markdown_pages()}
    assert pages - listed == set(), "add these pages to the nav in mkdocs.yml"
    assert listed - pages == set(), "the nav lists pages that do not exist"


def test_marked_blocks_are_compiled_and_import_checked(tmp_path, monkeypatch):
    """The marker that exempts a block from running still compiles it and runs its imports."""
    page = tmp_path / "page.md"
    marker = "<!-- docs-test: import-only: needs CIFAR-10 on disk -->"
    page.write_text(f"# P\n\n```python\nx = 1\n```\n\n{marker}\n```python\nimport json\nraise SystemExit\n```\n")
    blocks = python_blocks(page)
    assert [(b.mode, b.reason) for b in blocks] == [("run", ""), ("import-only", "needs CIFAR-10 on disk")]
    namespace = run_blocks(blocks, tmp_path, monkeypatch)  # the import-only block's `raise` never runs
    assert namespace["x"] == 1 and "json" in namespace
    for body, error in (("from lightning_interp import NoSuchName", ImportError), ("def f(:", SyntaxError)):
        page.write_text(f"{marker}\n```python\n{body}\n```\n")
        with pytest.raises(error):
            run_blocks(python_blocks(page), tmp_path, monkeypatch)
    page.write_text("<!-- docs-test: import-only: -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="must say why"):
        python_blocks(page)


def test_the_capped_trainer_keeps_examples_short(tmp_path):
    trainer = capped_trainer(tmp_path)(max_epochs=30, limit_train_batches=1.0)
    assert trainer.max_epochs == MAX_EPOCHS and trainer.limit_train_batches == TRAINER_CAPS["limit_train_batches"]
    assert trainer.default_root_dir == str(tmp_path)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_python_blocks_run(page, tmp_path, monkeypatch):
    run_blocks(python_blocks(page), tmp_path, monkeypatch)
