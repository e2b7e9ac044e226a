"""The README's library example runs as written (and says what it prints)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_library_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = README.read_text()
    section = text.split("## Library example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README has no python block under 'Library example'"
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 4"
    assert out[1] == "[7, 42, 1000000000000000]"
