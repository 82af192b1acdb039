"""The user's guide and the docs: every link resolves, to a file and to a heading in it, and the
README stays a guide (at most 250 lines) whose commands exist."""
import re

import pytest

from tests.helpers import REPO_ROOT

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def slug(heading):
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_link_resolves(document):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or document.name == "operations.md"
    for link in links:
        if re.match(r"https?://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        assert path.exists(), f"{document.name}: {link}: no such file"
        if anchor:
            assert anchor in anchors(path), f"{document.name}: {link}: no such heading in {path.name}"


def test_the_readme_is_a_guide_of_at_most_250_lines():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in set(re.findall(r"python -m (lm1b_hvd\.\w+)", readme)):
        assert (REPO_ROOT / (command.replace(".", "/") + ".py")).exists(), command
    assert ".venv/bin/python -m pytest -v tests" in readme
    assert "  .venv/bin/python -m pytest -v tests\n" in (REPO_ROOT / ".ci" / "run").read_text()
