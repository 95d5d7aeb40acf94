"""The repository stands alone: what the code and docs cite exists for a user who cloned it."""

from __future__ import annotations

import re

from tests.conftest import REPO

CITED = re.compile(r"\bdocs/[\w.-]+\.md\b")
SOURCES = ["undo_cli", "tests", "docs", "examples", "bench"]


def _texts():
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".sh", ".toml", ".jinja") and path.is_file():
                yield path, path.read_text(encoding="utf-8")
    yield REPO / "README.md", (REPO / "README.md").read_text(encoding="utf-8")


def test_no_citation_of_a_file_users_do_not_have():
    private = "SPEC" + ".md"  # spelt apart so that this file does not cite it either
    assert [str(p) for p, text in _texts() if private in text] == []


def test_every_cited_doc_exists():
    missing = {(str(p.relative_to(REPO)), m) for p, text in _texts() for m in CITED.findall(text)
               if not (REPO / m).is_file()}
    assert missing == set()


def test_ci_runs_the_readme_test_command():
    """.ci/run is what the README's "Run the tests" block says, line for line."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("**Run the tests**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").split("# --- README: Run the tests (fresh machine) ---\n", 1)[1]
    assert ci == block
