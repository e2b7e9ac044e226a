"""The examples in the table package's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "monolith_py.table.cuckoo",
    "monolith_py.table.embedding",
    "monolith_py.table.config",
    "monolith_py.table.admission",
    "monolith_py.table.expiry",
    "monolith_py.table.init",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
