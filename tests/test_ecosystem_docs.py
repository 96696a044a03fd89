"""The flow_matching and torchcfm pages' examples run as they are (their asserts are the checks).

Each page trains or builds a small model locally (no downloads), measures a Bellman schedule,
straightens for it and samples the result with the other library's own solver on the exported
time grid. torchcfm is installed without its dependencies (``pip install pot`` and
``pip install --no-deps torchcfm==1.0.7``, as ``.ci/run`` does); without it its page is skipped.
"""

import importlib
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ecosystem"
# page -> (package its example imports, how to install it)
NEEDS = {
    "flow_matching.md": ("flow_matching", "pip install flow_matching"),
    "torchcfm.md": ("torchcfm", "pip install pot && pip install --no-deps 'torchcfm==1.0.7'"),
}
# each takes 1.5 to 4 s (imports included) on one thread: "slow" by the project's marker
SNIPPETS = [
    pytest.param(page, i, code, id=f"{page}-{i}", marks=pytest.mark.slow)
    for page in NEEDS
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S))
]


@pytest.fixture(autouse=True)
def one_thread():
    """Small MLPs and convolutions: one thread is several times faster than two that contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_each_page_has_python_snippets():
    pages = [snippet.values[0] for snippet in SNIPPETS]
    assert pages.count("flow_matching.md") == 1 and pages.count("torchcfm.md") == 2


@pytest.mark.parametrize(("page", "index", "code"), SNIPPETS)
def test_docs_snippet_runs(page, index, code):
    package, install = NEEDS[page]
    try:
        importlib.import_module(package)
    except ImportError as error:
        pytest.skip(f"{package} does not import ({error}); install it with: {install}")
    assert "..." not in code.replace("# ...", "")  # nothing left for the reader to fill in
    exec(compile(code, f"{page} snippet {index}", "exec"), {"__name__": "__doc_snippet__"})
