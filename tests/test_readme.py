"""The README is short and runs as written; it and the docs pages link only to what exists, speak to users
(no tracker vocabulary), and their config table and package tree match the code."""
import re
from collections import Counter

import yaml

from diffusion_lab.config import CONF_DIR
from tests.helpers import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 250  # read in five minutes: what it is, set-up, first run, commands, config groups, links
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
TRACKER_WORDS = re.compile(r"\b(issues?|targets?|sessions?)\b", flags=re.I)
ALLOWED_WORDS = re.compile(r"\bGitHub issues?\b|\b(network's|prediction|regression) targets?\b", flags=re.I)
NOT_KEY_LISTS = {"experiment", "debug", "hydra/launcher"}  # rows whose third column describes, not lists keys


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def prose(text):
    """The rendered text: no fenced code blocks, inline code or HTML comments (none of them holds links)."""
    return re.sub(r"`[^`\n]*`|<!--.*?-->", "", FENCE.sub("", text), flags=re.S)


def slug(title):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path):
    seen, result = Counter(), set()
    for title in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", path.read_text()), flags=re.M):
        base = slug(title)
        result.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return result


def broken_links(page):
    """Every relative link of `page` whose file is missing, or whose #anchor names no heading there."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto: are not checked offline
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(f"{page.relative_to(REPO)}: {target}")
    return broken


def section(text, heading):
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text):
    """The cells of each body row of the first markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def listed(cell):
    """The `names` of a table cell, leaving out those in parentheses (values and remarks, not keys)."""
    return re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cell))


def group_files(group):
    return sorted((CONF_DIR / group).glob("*.yaml"))


def group_keys(group):
    """The keys a group's options set (`name` is the option itself; guidance lands in `sampler`)."""
    keys = {key for path in group_files(group) for key in yaml.safe_load(path.read_text())}
    return {f"sampler.{k}" if group == "guidance" else k for k in keys - {"name", "defaults", "hydra"}}


def layout_tree():
    """The .py paths that docs/layout.md's package tree names (two spaces of indent per folder level)."""
    block = re.search(r"```\n(diffusion_lab/\n.*?)```", (REPO / "docs" / "layout.md").read_text(), flags=re.S)
    folders, paths = {}, set()
    for line in block.group(1).splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        parent = folders.get(depth - 1, "") if depth else ""
        for name in line.split():
            if name.endswith("/"):
                folders[depth] = f"{parent}{name}"
            elif name.endswith(".py"):
                paths.add(f"{parent}{name}")
            else:
                break  # the description starts
    return paths


def test_library_example_runs():
    example = python_blocks(README.read_text().split("## Library", 1)[1])[0]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (4, 1, 8, 8)
    assert namespace["loss"].item() > 0


def test_ci_runs_the_readme_commands():
    readme, ci = README.read_text(), (REPO / ".ci" / "run").read_text()
    install = re.search(r"## Install.*?```\n(.*?)\n```", readme, flags=re.S).group(1)
    test = re.search(r"## Test.*?```\n(.*?)\n```", readme, flags=re.S).group(1)
    assert install.split("&& ")[-1] in ci.splitlines() and test in ci.splitlines()


def test_readme_reads_in_five_minutes():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move details to a docs/ page"


def test_every_relative_link_points_to_a_file_and_heading_that_exist():
    assert len(PAGES) > 1, "the docs pages are missing"
    broken = [link for page in PAGES for link in broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_pages_speak_of_the_project_not_of_its_tracker():
    found = [f"{page.relative_to(REPO)}:{n}: {line.strip()}" for page in PAGES
             for n, line in enumerate(page.read_text().splitlines(), 1)
             if TRACKER_WORDS.search(ALLOWED_WORDS.sub("", line))]
    assert not found, "words about issues, targets or sessions:\n" + "\n".join(found)


def test_config_table_lists_every_group_option_and_key_once():
    rows = {row[0].strip("`"): row for row in table_rows(section(README.read_text(), "Config groups"))}
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"} | {"hydra/launcher"}
    assert set(rows) == groups and len(rows) == len(table_rows(section(README.read_text(), "Config groups")))
    defaults = {k: v for command in ("autoencoder", "config")  # train's defaults win; autoencoder's own group
                for d in yaml.safe_load((CONF_DIR / f"{command}.yaml").read_text())["defaults"]
                if isinstance(d, dict) for k, v in d.items()}
    for group in groups - {"hydra/launcher"}:
        options = listed(rows[group][1])
        assert sorted(options) == sorted(p.stem for p in group_files(group)), group
        assert defaults[group] is None or options[0] == defaults[group], f"{group}: the default comes first"
    for group in groups - NOT_KEY_LISTS:
        keys = listed(rows[group][2])
        assert [k for k, n in Counter(keys).items() if n > 1] == [], f"{group}: a key listed twice"
        assert set(keys) == group_keys(group), f"{group}: the table and conf/{group}/ differ"


def test_layout_names_every_module_and_no_other():
    modules = {str(p.relative_to(REPO)) for p in (REPO / "diffusion_lab").rglob("*.py") if p.name != "__init__.py"}
    named = layout_tree()
    assert not modules - named, f"modules missing from docs/layout.md: {sorted(modules - named)}"
    assert not named - modules, f"docs/layout.md names modules that do not exist: {sorted(named - modules)}"
