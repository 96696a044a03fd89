"""The README's Python snippets run as they are."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, capsys):
    code = SNIPPETS[index]
    assert "..." not in code.replace("# ...", "")  # nothing left for the reader to fill in
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})
