"""Griffe extension for the API reference: the docstrings' Sphinx roles read as code on the site.

The docstrings cross-reference in Sphinx style (``:class:`~lightning_interp.masking.FilterMask```),
which Markdown would show verbatim. This rewrites each role to a code span of the name as Sphinx
would display it (the last component after ``~``), before mkdocstrings parses the docstring.
"""

from __future__ import annotations

import re

from griffe import Extension, Object

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`]+)`")


def _shown(match: re.Match) -> str:
    tilde, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def rewrite_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by a Markdown code span."""
    return _ROLE.sub(_shown, text)


class SphinxRoles(Extension):
    def on_object(self, *, obj: Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite_roles(obj.docstring.value)
