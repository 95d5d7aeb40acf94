"""The package's import picture: rooms, arrows, arrows that run back up, circles, sizes.

    python bench/import_graph.py                    # table on stderr, bench/results/import_graph.json
    python bench/import_graph.py --out PATH.json

Read from the source with `ast` (nothing is imported), so it measures any checkout:

* a **room** is a subpackage of `undo_cli` (`stages/`, `loop/`, ...); each top-level module
  (`guidance.py`, `scoring.py`, ...) is its own room. The package's `__init__.py` and `__main__.py`
  (the entry point, which imports the CLI) are left out;
* an **arrow** is "some module in room A imports some module in room B" (A != B), counted once per
  pair; every `import` counts, at module level or inside a function, since a function-level import
  still ties the two (it only defers the cost);
* an arrow **back up** imports a room in a higher layer than its own, or a peer on its own layer, by the layer order written in
  docs/DEVELOPING.md's "Dependencies point down" block (the ```layers fence: one layer a line, bottom
  first; rooms on one line are peers). A room the block does not name is reported as unplaced;
* a **circle** is a strongly connected component (Tarjan) of the module graph with more than one
  module: modules that import each other, directly or round a ring;
* lines per module (physical lines) and the ten longest functions (`def` to its last line).

tests/test_layout.py checks the same two rules (no arrow back up, no circle) on every run of the
suite; this script is the measurement, with the figures a before/after comparison needs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "undo_cli"
RESULTS = REPO / "bench" / "results"
LEFT_OUT = {PACKAGE, f"{PACKAGE}.__main__"}


def commit(repo: Path = REPO) -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package's `__init__.py` is the package's name)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def room(module: str) -> str:
    """`undo_cli.stages.generate` -> `stages`; `undo_cli.scoring` -> `scoring`."""
    return module.split(".")[1]


def statements(node: ast.AST):
    """Every statement under `node`, at any depth (an import is a statement; expressions hold none)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield child
            yield from statements(child)


def imports(module: str, path: Path, tree: ast.Module, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for each import of a package module in `path` (parsed: `tree`)."""
    top = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    found = []
    for node in statements(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:  # `import undo_cli.x.y` names a module; trim to one we know
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith(PACKAGE):
                found.append((name, node.lineno, id(node) in top))
    return found


def layers(root: Path) -> list[list[str]]:
    """The layer order from docs/DEVELOPING.md's ```layers block: bottom layer first."""
    text = (root / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)\n\s*```", text, re.S)
    if not block:
        return []
    rows = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append([name.strip().strip("/").removesuffix(".py") for name in line.split(",") if name.strip()])
    return rows


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def functions(module: str, tree: ast.Module) -> list[dict]:
    """Every function and method with its length in lines (`def` to its last line), by qualified name."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append({"function": f"{module}:{name}", "lines": child.end_lineno - child.lineno + 1})
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.stmt):  # a def under if/with/try; expressions hold none worth a name
                visit(child, prefix)

    visit(tree, "")
    return found


def picture(root: Path = REPO) -> dict:
    """Everything the table and the JSON show, for the checkout at `root`."""
    known = modules(root)
    texts = {m: path.read_text(encoding="utf-8") for m, path in known.items() if m not in LEFT_OUT}
    trees = {m: ast.parse(text, filename=str(known[m])) for m, text in texts.items()}
    graph: dict[str, set[str]] = {m: set() for m in trees}
    where: dict[tuple[str, str], tuple[int, bool]] = {}
    for module, tree in trees.items():
        for target, line, top in imports(module, known[module], tree, known):
            if target in LEFT_OUT:
                continue
            graph[module].add(target)
            where.setdefault((module, target), (line, top))
    order = layers(root)
    level = {name: i for i, row in enumerate(order) for name in row}
    rooms = sorted({room(m) for m in graph})
    arrows: dict[tuple[str, str], list[str]] = {}
    for (source, target), (line, _) in sorted(where.items()):
        if room(source) != room(target):
            arrows.setdefault((room(source), room(target)), []).append(
                f"{known[source].relative_to(root)}:{line} -> {target}")
    # an arrow to a peer (same layer) does not point down either
    back_up = [{"from": a, "to": b, "from_layer": level[a], "to_layer": level[b], "imports": lines}
               for (a, b), lines in sorted(arrows.items())
               if a in level and b in level and level[b] >= level[a]]
    room_graph: dict[str, set[str]] = {r: set() for r in rooms}
    for a, b in arrows:
        room_graph[a].add(b)
    sizes = {m: len(text.splitlines()) for m, text in texts.items()}
    longest = sorted((f for m in graph for f in functions(m, trees[m])), key=lambda f: (-f["lines"], f["function"]))
    module_circles = circles(graph)
    return {
        "rooms": len(rooms), "room_names": rooms, "arrows": len(arrows),
        "arrow_list": [f"{a} -> {b}" for a, b in sorted(arrows)],
        "layers": order, "unplaced": [r for r in rooms if r not in level],
        "back_up": back_up, "room_circles": circles(room_graph),
        "module_circles": [{"modules": c, "imports": [
            f"{a} -> {b} (line {where[(a, b)][0]}{'' if where[(a, b)][1] else ', in a function'})"
            for a in c for b in sorted(graph[a]) if b in c]} for c in module_circles],
        "modules": len(graph), "lines_total": sum(sizes.values()),
        "biggest_modules": [{"module": m, "lines": n} for m, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:10]],
        "longest_functions": longest[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "import_graph.json"))
    args = parser.parse_args()
    result = {"bench": "import_graph", "commit": commit(), "python": sys.version.split()[0], **picture()}
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=120)
    table = Table(title=f"import picture at {result['commit'][:12]}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, value in [("rooms", result["rooms"]), ("arrows between rooms", result["arrows"]),
                         ("arrows back up", len(result["back_up"])), ("unplaced rooms", len(result["unplaced"])),
                         ("room circles", len(result["room_circles"])),
                         ("module circles", len(result["module_circles"])),
                         ("modules in circles", sum(len(c["modules"]) for c in result["module_circles"])),
                         ("modules", result["modules"]), ("lines", result["lines_total"])]:
        table.add_row(label, str(value))
    console.print(table)
    for arrow in result["back_up"]:
        console.print(f"back up: {arrow['from']} (layer {arrow['from_layer']}) -> {arrow['to']} (layer {arrow['to_layer']})")
        for line in arrow["imports"]:
            console.print(f"    {line}")
    for circle in result["module_circles"]:
        console.print("circle: " + " <-> ".join(m.removeprefix(PACKAGE + ".") for m in circle["modules"]))
    if result["unplaced"]:
        console.print("unplaced (not in DEVELOPING.md's layers): " + ", ".join(result["unplaced"]))
    sizes = Table(title="biggest modules / longest functions")
    sizes.add_column("module")
    sizes.add_column("lines", justify="right")
    sizes.add_column("function")
    sizes.add_column("lines", justify="right")
    for big, fn in zip(result["biggest_modules"], result["longest_functions"]):
        sizes.add_row(big["module"], str(big["lines"]), fn["function"], str(fn["lines"]))
    console.print(sizes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
