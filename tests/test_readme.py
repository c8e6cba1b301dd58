"""The README's Python example runs as written and does what it says."""

import os
import re

import conftest


def test_readme_example_runs():
    text = (conftest.ROOT / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(conftest.ROOT)
    try:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["recon"].shape == (2, 16, 32, 32, 3)
    assert [p.shape for p in scope["planes"]] == [(2, 8, 8, 8)] * 3


def test_readme_commands_match_ci():
    readme = (conftest.ROOT / "README.md").read_text()
    ci = (conftest.ROOT / ".ci" / "run").read_text()
    test_command = 'pip install -e ".[test]" && python -m pytest -q -n 2 tests'
    assert test_command in readme and test_command in ci
