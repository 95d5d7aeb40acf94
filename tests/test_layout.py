"""The package's imports point down and tie no knots (docs/DEVELOPING.md, "Dependencies point down").

    python -m pytest -q tests/test_layout.py

Read from the source by bench/import_graph.py (nothing is imported). Nothing is allowed to stay: there is
no allow-list. A room that must import one above it means the layers in DEVELOPING.md are wrong, or the
shared piece belongs lower down; move it there.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("import_graph", REPO / "bench" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


@pytest.fixture(scope="module")
def found() -> dict:
    """The picture of this checkout, drawn once for the three checks (about a second: every module parsed)."""
    return import_graph.picture(REPO)


def test_every_room_has_a_layer(found):
    assert found["layers"], "docs/DEVELOPING.md lost its ```layers block"
    assert found["unplaced"] == [], "add these rooms to DEVELOPING.md's ```layers block, where their imports put them"
    named = [name for row in found["layers"] for name in row]
    assert sorted(set(named)) == sorted(named), "a room is named twice in the layers"
    assert set(named) <= set(found["room_names"]), "the layers name a room that no longer exists"


def test_no_room_imports_one_above_it_or_beside_it(found):
    back_up = found["back_up"]
    assert back_up == [], "\n".join(f"{a['from']} -> {a['to']}: " + "; ".join(a["imports"]) for a in back_up)


def test_no_modules_import_each_other(found):
    assert found["module_circles"] == [], "\n".join("; ".join(c["imports"]) for c in found["module_circles"])
    assert found["room_circles"] == []


def _package(root, files: dict[str, str], layers: str) -> None:
    (root / "docs").mkdir()
    (root / "docs" / "DEVELOPING.md").write_text(f"- **Dependencies point down**:\n\n  ```layers\n{layers}\n  ```\n")
    for name, text in files.items():
        path = root / "undo_cli" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_picture_sees_a_knot_in_a_function_and_an_arrow_back_up(tmp_path):
    """The checks above can fail: a deferred import round a ring is a circle, a relative import is an arrow."""
    _package(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from undo_cli.high import g\n",
        "high/__init__.py": "",
        "high/a.py": "from . import b\n",
        "high/b.py": "def h():\n    from .a import x\n",
        "high/c.py": "from ..low import f\n",
        "peer.py": "import undo_cli.low\n",
    }, "  low, peer\n  high")
    found = import_graph.picture(tmp_path)
    assert found["rooms"] == 3 and found["unplaced"] == []
    assert [m["modules"] for m in found["module_circles"]] == [["undo_cli.high.a", "undo_cli.high.b"]]
    assert [(a["from"], a["to"]) for a in found["back_up"]] == [("low", "high"), ("peer", "low")]
    assert found["room_circles"] == [["high", "low"]]
