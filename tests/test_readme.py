"""The README's code: every `lightning_interp` import it shows resolves (exports match what it imports)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_imports() -> list[str]:
    """The ``from lightning_interp... import ...`` statements of the README's python blocks, joined across ``\\``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    statements = []
    for block in blocks:
        code = block.replace("\\\n", " ")
        statements += [line.strip() for line in code.splitlines()
                       if re.match(r"\s*(from lightning_interp[\w.]* import|import lightning_interp)", line)]
    return statements


def test_the_readme_shows_imports():
    assert len(readme_imports()) >= 10


@pytest.mark.parametrize("statement", readme_imports())
def test_readme_import_resolves(statement):
    exec(statement, {})
