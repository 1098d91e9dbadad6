"""The README's library example runs as written, and CI runs the README's test command."""
import re

from tests.helpers import REPO


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_library_example_runs():
    example = python_blocks((REPO / "README.md").read_text().split("## Library", 1)[1])[0]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (4, 1, 8, 8)
    assert namespace["loss"].item() > 0


def test_ci_runs_the_readme_commands():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    install = re.search(r"## Install.*?```\n(.*?)\n```", readme, flags=re.S).group(1)
    test = re.search(r"## Test.*?```\n(.*?)\n```", readme, flags=re.S).group(1)
    assert install.split("&& ")[-1] in ci.splitlines() and test in ci.splitlines()
