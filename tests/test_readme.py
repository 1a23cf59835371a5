"""The README: short, its example is the one the docs run, its imports resolve, its links reach pages."""

import re

import pytest
from doc_blocks import ROOT, python_blocks, top_level_imports

README = ROOT / "README.md"
BLOCKS = python_blocks(README)


def readme_imports() -> list[str]:
    """The ``lightning_interp`` imports of the README's python blocks."""
    return [s for b in BLOCKS for s in top_level_imports(b) if "lightning_interp" in s]


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_the_readme_shows_a_complete_example():
    assert len(BLOCKS) == 1 and BLOCKS[0].mode == "run"
    assert "trainer.fit(" in BLOCKS[0].code and len(readme_imports()) >= 1


@pytest.mark.parametrize("statement", readme_imports())
def test_readme_import_resolves(statement):
    exec(statement, {})


def test_readme_example_is_the_own_module_page_example():
    """The README's example runs in tests/test_docs.py, as the first block of docs/guide/own_module.md."""
    page = python_blocks(ROOT / "docs" / "guide" / "own_module.md")
    assert page and page[0].mode == "run" and page[0].code == BLOCKS[0].code


def test_readme_links_reach_files():
    text = README.read_text()
    targets = re.findall(r"\]\(((?:docs/)[^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert missing == []
