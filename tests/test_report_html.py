"""`undo report --html`: the page in a real headless chromium, checked against the files on disk.

The page is opened from disk in Debian's chromium (tests/browser.py drives it
over the DevTools protocol) and must: load with no console error, no dialog
and no request but its own file; show, for every pair of evaluations, the
transition counts that the prediction files give when read here, independently
of undo's code; list exactly those problems under each filter, page after
page; list every refined record of every iteration; show model text that
holds `<script>` as text (and run none of it); and draw something (a
screenshot that is not blank). The run is synthetic (tests/run_folders.py:
the layout and record shapes of `undo iterate`); the same checks on a run
that the real loop produced are in test_iterate.py.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.browser import Chromium, available
from tests.run_folders import HOSTILE, write_run

needs_chromium = pytest.mark.skipif(available() is not None, reason=available() or "")
# What --verify steps writes on a refused refinement, and a field no version of undo writes yet.
STEPS = {"reject_reason": "false_step", "step_error": "4 * 5 = 21", "steps_checked": 3}


# --- what the files say, read here without undo's code -------------------------------------------------

def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def expected_pairs(run: Path) -> dict[str, dict[str, str]]:
    """'val 1->2' / 'test 0->3' -> {id: transition}, from predictions.jsonl and manifest.json alone."""
    def transitions(a: Path, b: Path) -> dict[str, str]:
        before = {p["id"]: p["correct"] for p in _read(a)}
        after = {p["id"]: p["correct"] for p in _read(b)}
        assert set(before) == set(after)
        names = {(False, True): "fixed", (True, False): "regressed", (False, False): "still_wrong",
                 (True, True): "still_right"}
        return {i: names[(before[i], after[i])] for i in before}

    ks = sorted(int(d.name[5:]) for d in run.glob("iter_*") if (d / "val" / "predictions.metrics.json").exists())
    out = {f"val {a}->{b}": transitions(run / f"iter_{a:02d}/val/predictions.jsonl",
                                        run / f"iter_{b:02d}/val/predictions.jsonl") for a, b in zip(ks, ks[1:])}
    best = json.loads((run / "manifest.json").read_text())["best_iteration"]
    if best:
        out[f"test 0->{best}"] = transitions(run / "iter_00/test/predictions.jsonl",
                                            run / f"iter_{best:02d}/test/predictions.jsonl")
    return out


def _counts(transitions: dict[str, str]) -> dict[str, int]:
    names = ("fixed", "regressed", "still_wrong", "still_right")
    return {n: sum(t == n for t in transitions.values()) for n in names}


# --- what the page shows, read in the browser ----------------------------------------------------------

PAGES = """(async (list, pager) => {
  const ids = [];
  for (let guard = 0; guard < 1000; guard++) {
    await window.undoReport.idle();
    ids.push(...[...document.querySelectorAll(list + ' > article')].map((a) => a.dataset.id));
    const next = document.querySelector(pager + ' button:last-child');
    if (!next || next.disabled) break;
    next.click();
  }
  return ids;
})"""


def _select(browser: Chromium, select: str, value: str) -> None:
    browser.evaluate(f"(() => {{ const s = document.getElementById({json.dumps(select)}); s.value = {json.dumps(value)};"
                     " s.dispatchEvent(new Event('change')); return window.undoReport.idle(); })()")


def page_pairs(browser: Chromium) -> dict[str, dict]:
    """Every pair the page offers: its counts (the buttons) and the ids it lists under each filter."""
    labels = browser.evaluate("[...document.querySelectorAll('#t-pair option')].map((o) => o.textContent)")
    out = {}
    for i, label in enumerate(labels):
        _select(browser, "t-pair", str(i))
        counts = browser.evaluate("Object.fromEntries([...document.querySelectorAll('#t-counts button')]"
                                  ".map((b) => [b.dataset.transition, Number(b.querySelector('b').textContent)]))")
        listed = {}
        for name in ("fixed", "regressed", "still_wrong", "still_right"):
            browser.evaluate(f"document.querySelector('#t-counts button[data-transition={name}]').click()")
            listed[name] = browser.evaluate(f"{PAGES}('#t-list', '#t-pager')")
        split = "test" if label.startswith("test") else "val"
        a, b = (0, int(label.split("→")[1].split()[0])) if split == "test" else \
            [int(x.split()[0]) for x in label.split("iteration ")[1].split("→")]
        out[f"{split} {a}->{b}"] = {"counts": counts, "listed": listed}
    return out


def page_refinements(browser: Chromium) -> dict[int, list[str]]:
    """Every refined record the page lists, per iteration, paging through."""
    options = browser.evaluate("[...document.querySelectorAll('#r-iter option')].map((o) => o.textContent)")
    out = {}
    for i, label in enumerate(options):
        _select(browser, "r-iter", str(i))
        out[int(label.split()[1])] = browser.evaluate(f"{PAGES}('#r-list', '#r-pager')")
    return out


def not_blank(png: bytes) -> float:
    """The pixel variance of a screenshot (a blank page is ~0)."""
    from PIL import Image, ImageStat

    image = Image.open(io.BytesIO(png)).convert("L")
    return ImageStat.Stat(image).var[0]


CARDS = """[...document.querySelectorAll('#r-list > article')].map((a) => {
  const pre = a.querySelector('pre.diff');
  const part = (skip) => [...pre.childNodes].filter((n) => n.nodeName !== skip).map((n) => n.textContent).join('');
  return {id: a.dataset.id, outcome: a.dataset.outcome, old: part('INS'), new: part('DEL'),
          informed: [...a.querySelectorAll('ul.failures > li')].map((li) => [li.dataset.id,
                                                                             li.querySelector('pre').textContent])};
})"""


def check_refinement_cards(browser: Chromium, run: Path) -> None:
    """The refinements on screen: the word diff gives back both texts, and each failure shown to the teacher
    is the student's own wrong output at the iteration before, as the files have it."""
    _select(browser, "r-size", "all")
    k = int(browser.evaluate("document.querySelector('#r-iter option:checked').textContent").split()[1])
    records = {r["id"]: r for r in _read(run / f"iter_{k:02d}/refined.jsonl")}
    outputs = {p["id"]: p["output"] for p in _read(run / f"iter_{k - 1:02d}/val/predictions.jsonl")}
    cards = browser.evaluate(CARDS)
    assert [c["id"] for c in cards] == list(records)
    for card in cards:
        r = records[card["id"]]
        ref = r["refinement"]
        if ref["verified"]:
            assert card["outcome"] == "verified" and (card["old"], card["new"]) == (ref["previous_rationale"],
                                                                                    r["rationale"])
        else:
            assert card["outcome"] == "kept_previous" and card["old"] == r["rationale"]
            assert card["new"] == ref.get("rejected_rationale", r["rationale"])
        assert card["informed"] == [[i, outputs[i]] for i in ref["informed_by"]]


def check_every_iteration(browser: Chromium, run: Path) -> None:
    """The first problem listed, opened on every iteration: each output as the files have it."""
    _select(browser, "t-pair", "0")
    browser.evaluate("document.querySelector('#t-counts button[data-transition=all]').click()")
    browser.evaluate("window.undoReport.idle()")
    shown = browser.evaluate("""(async () => {
      const card = document.querySelector('#t-list > article');
      const details = card.querySelector('details');
      if (!details) return null;
      details.open = true;
      for (let i = 0; i < 200 && !details.querySelector('table'); i++) await new Promise((r) => setTimeout(r, 10));
      return [card.dataset.id, [...details.querySelectorAll('tr')].map((tr) => tr.querySelector('pre').textContent)];
    })()""")
    ks = sorted(int(d.name[5:]) for d in run.glob("iter_*") if (d / "val/predictions.jsonl").exists())
    if shown is None:  # two iterations: both are on the card already
        assert len(ks) <= 2
        return
    pid, texts = shown
    assert texts == [next(p["output"] for p in _read(run / f"iter_{k:02d}/val/predictions.jsonl") if p["id"] == pid)
                     for k in ks]


def check_page(page: Path, run: Path, browser: Chromium) -> dict:
    """Open the page and assert everything a person relies on; returns what the page showed."""
    browser.open(page.resolve().as_uri())
    browser.evaluate("window.undoReport.idle()")
    pairs = page_pairs(browser)
    expected = expected_pairs(run)
    assert set(pairs) == set(expected)
    for key, truth in expected.items():
        counts = _counts(truth)
        assert {k: pairs[key]["counts"][k] for k in counts} == counts, key
        assert pairs[key]["counts"]["all"] == len(truth)
        for name, ids in pairs[key]["listed"].items():  # each filter lists exactly its problems, once each
            assert sorted(ids) == sorted(i for i, t in truth.items() if t == name), (key, name)
    refined = page_refinements(browser)
    for k in sorted(int(d.name[5:]) for d in run.glob("iter_*") if (d / "refined.jsonl").exists()):
        assert refined[k] == [r["id"] for r in _read(run / f"iter_{k:02d}/refined.jsonl")]
    check_refinement_cards(browser, run)
    check_every_iteration(browser, run)
    shot = browser.screenshot()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and not_blank(shot) > 200
    assert browser.console_errors() == []
    assert browser.requests() == [page.resolve().as_uri()]  # nothing but the file itself, not even a data: image
    assert browser.dialogs() == []
    return {"pairs": pairs, "refined": refined, "screenshot": shot}


# --- the tests ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """A 4-iteration run whose model text holds HTML and script, and whose refinements carry extra fields."""
    from undo_cli.loop import report

    base = tmp_path_factory.mktemp("html")
    for seed in range(20):  # the first seeded run whose paired test keeps a later iteration: the page needs a test pair
        run = base / f"seed-{seed}" / "runs" / "hostile"
        made = write_run(run, val=60, test=40, iterations=4, refinements=25, hostile=True, extra=STEPS, seed=seed)
        if made["best"] != 0:
            break
    page = run.parent / "page.html"
    report.run(str(run), html=str(page))
    return {"run": run, "page": page, **made}


@pytest.mark.slow
@needs_chromium
def test_page_matches_the_files_runs_no_model_text_and_fetches_nothing(hostile):
    with Chromium(height=1000) as browser:
        shown = check_page(hostile["page"], hostile["run"], browser)
        assert hostile["best"] != 0  # so that the page has a test pair: one-shot vs best
        assert {int(k.split("->")[1]) for k in shown["pairs"] if k.startswith("test")} == {hostile["best"]}
        # Model text that holds markup is shown as text, in the problems and in the refinements...
        _select(browser, "t-pair", "0")
        _select(browser, "t-size", "all")
        browser.evaluate("document.querySelector('#t-counts button[data-transition=all]').click()")
        browser.evaluate("window.undoReport.idle()")
        text = browser.evaluate("document.getElementById('t-list').textContent")
        assert all(h.strip() in text for h in HOSTILE[:4])
        assert "val-00001<b>" in text
        # ... and became no element: the page's own scripts only (index, script, chunks), no img, no dialog.
        counts = browser.evaluate("[document.querySelectorAll('script').length, document.querySelectorAll("
                                  "'script[type=\"application/octet-stream\"]').length, document.querySelectorAll("
                                  "'#t-list img, #r-list img, #t-list script, #r-list script, #t-list b b').length]")
        assert counts[0] == counts[1] + 2 and counts[2] == 0
        _select(browser, "r-size", "all")
        refinements = browser.evaluate("document.getElementById('r-list').textContent")
        assert HOSTILE[0] in refinements and "<img" not in browser.evaluate(
            "document.getElementById('r-list').innerHTML").replace("&lt;img", "")
        # Why an attempt was refused heads its card; a field the page does not know is shown as it is.
        assert "refused: false_step (4 * 5 = 21)" in refinements and "steps_checked3" in refinements
        _select(browser, "r-reason", "f")
        outcomes = browser.evaluate("[...document.querySelectorAll('#r-list > article')].map((a) => a.dataset.outcome)")
        assert outcomes and set(outcomes) == {"kept_previous"}
        assert browser.console_errors() == [] and browser.dialogs() == []


LINEAGES = """(async (ids) => {
  const out = {};
  for (const id of ids) {
    await window.undoReport.showLineage(id);
    out[id] = JSON.parse(document.querySelector('#l-view pre.lineage-json').textContent);
  }
  return out;
})"""


@pytest.mark.slow
@needs_chromium
def test_each_refinement_links_to_its_rows_lineage_as_undo_lineage_prints_it(hostile, undo_inproc):
    """Each refinement card links to its row's history, held in the page (offline): the lineage view shows what
    `undo lineage RUN ROW --format json` prints, for every refined row, and the link is an address that opens
    the page on that row."""
    run, page = hostile["run"], hostile["page"]
    refined = list(dict.fromkeys(i for k in sorted(hostile["refined_ids"]) for i in hostile["refined_ids"][k]))
    printed = {}
    for row in refined:
        proc = undo_inproc("lineage", str(run), row, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        printed[row] = json.loads(proc.stdout)
    assert any(len({s["iteration"] for s in p["history"]}) > 2 for p in printed.values())  # rows refined twice
    with Chromium(height=1000) as browser:
        browser.open(page.resolve().as_uri())
        browser.evaluate("window.undoReport.idle()")
        assert browser.evaluate("window.undoReport.data.lineage.ids") == refined
        # The first card's link: a click shows its row's history, and the address names the row.
        first = browser.evaluate("(() => { const a = document.querySelector('#r-list > article a.lineage'); "
                                 "a.click(); return [a.closest('article').dataset.id, a.getAttribute('href')]; })()")
        browser.evaluate("window.undoReport.idle()")
        row, href = first
        shown = browser.evaluate("[location.hash, document.querySelector('#l-view article').dataset.id, "
                                 "document.querySelector('#l-view pre.lineage-json').textContent, "
                                 "document.getElementById('l-view').textContent]")
        assert shown[0] == href and shown[1] == row and json.loads(shown[2]) == printed[row]
        assert "strong: verified" in shown[3] or "strong: false_step" in shown[3]  # the cascade's attempts, as text
        # Every refined row's history is in the page, exactly as the command prints it.
        assert browser.evaluate(f"{LINEAGES}({json.dumps(refined)})") == printed
        assert browser.evaluate("document.querySelectorAll('#l-view img, #l-view script, #l-view b').length") == 0
        assert browser.console_errors() == [] and browser.dialogs() == []
        assert browser.requests() == [page.resolve().as_uri()]
    # The address alone, opened from disk, shows that row's history (a link to send, that works offline).
    deep = max(refined, key=lambda r: len(printed[r]["history"]))
    with Chromium(height=1000) as browser:
        url = page.resolve().as_uri() + "#" + urlencode({"lineage": deep})
        browser.open(url)
        browser.evaluate("window.undoReport.idle()")
        text = browser.evaluate("document.querySelector('#l-view pre.lineage-json').textContent")
        assert json.loads(text) == printed[deep]
        assert browser.console_errors() == [] and browser.dialogs() == []


def test_page_source_cannot_be_broken_out_of(hostile):
    """Every `<` of the data is escaped: the only </script> in the file close the page's own script elements."""
    source = hostile["page"].read_text(encoding="utf-8")
    opened = source.count("<script")
    assert source.count("</script>") == opened and source.lower().count("</script") == opened
    assert "<!--" not in source and "alert(1)" not in source.split("<script type='application/json'")[0]
    assert "Content-Security-Policy" in source and "default-src 'none'" in source and "http" not in source.split(
        "<body>")[0].replace("http-equiv", "")


def test_word_diff_keeps_both_texts_whole():
    from undo_cli.loop.report_data import word_diff

    rng = random.Random(0)
    words = ["4", "*", "5", "=", "20", "coins", "\n", "  ", "then", "<b>", "&", "\u2028", "#### 23"]
    for _ in range(200):
        old = "".join(rng.choice(words) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(0, 30)))
        new = "".join(rng.choice(words) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(0, 30)))
        ops = word_diff(old, new)
        assert "".join(t for op, t in ops if op <= 0) == old and "".join(t for op, t in ops if op >= 0) == new
    assert word_diff("4 * 5 = 20 coins", "4 * 5 = 21 coins") == [[0, "4 * 5 = "], [-1, "20"], [1, "21"],
                                                                [0, " coins"]]


def test_report_html_command_and_a_running_run(tmp_path, undo_here):
    """The CLI writes the page; a run whose last evaluation is still being written is shown as far as it goes."""
    run = tmp_path / "runs" / "live"
    write_run(run, val=30, test=10, iterations=3, refinements=5)
    (run / "iter_02" / "val" / "predictions.metrics.json").unlink()  # evaluate 2 is still running...
    preds = run / "iter_02" / "val" / "predictions.jsonl"
    preds.write_text("".join(preds.read_text().splitlines(keepends=True)[:12]) + '{"id": "val-000')  # ...mid-line
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(status="running", best_iteration=0, iterations_done=2, stop_reason=None)
    (run / "manifest.json").write_text(json.dumps(manifest))
    code, err = undo_here("report", run, "--html", tmp_path / "out" / "page.html")
    assert code == 0, err
    assert f"html report written to {tmp_path / 'out' / 'page.html'}" in err
    assert "best so far" in err and "decided through iteration 1" in err
    from undo_cli.loop.run_state import collect
    from undo_cli.loop.report_data import page_data

    index, _ = page_data(run, collect(run))
    val = index["splits"][0]
    assert [p["b"] for p in val["pairs"]] == [1, 2] and "counts" in val["pairs"][0]
    assert "not finished" in val["pairs"][1]["note"] and "counts" not in val["pairs"][1]
    assert sum(s[2] != "-" for s in val["status"]) == 12  # the complete lines of the running evaluation
    code, err = undo_here("report", run, "--html", tmp_path)
    assert code == 2 and "is a folder" in err
    before = (run / "manifest.json").read_text()
    code, err = undo_here("report", run, "--html", run / "manifest.json")
    assert code == 2 and "is not a report of this run" in err and (run / "manifest.json").read_text() == before


def test_the_run_shows_each_clusters_errors_fixes_and_refinements_per_iteration(tmp_path):
    """With clusters.json the page has one row per cluster and one cell per iteration, counted from the files."""
    import re

    from undo_cli.loop.run_state import collect, write_summary
    from undo_cli.loop.report_html import build

    def page_of(run):
        state = collect(run)
        return build(run, state, write_summary(run, state))[0]

    root = tmp_path / "runs" / "clustered"
    made = write_run(root, val=30, test=10, iterations=3, refinements=5, clusters=2)
    assign = made["assign"]
    page = page_of(root)
    assert "Failure clusters" in page
    row = re.search(r"<tr><th>c00</th><td>words of c00</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert len(cells) == 3  # iterations 0, 1, 2
    for k, cell in enumerate(cells):
        preds = [p for p in _read(root / f"iter_{k:02d}" / "val" / "predictions.jsonl") if assign[p["id"]] == "c00"]
        wrong = sum(not p["correct"] for p in preds)
        assert cell.startswith(f"<b>{wrong}/{len(preds)}</b>")
        if k:
            before = {p["id"]: p["correct"] for p in _read(root / f"iter_{k - 1:02d}" / "val" / "predictions.jsonl")}
            fixed = sum(p["correct"] and not before[p["id"]] for p in preds)
            regressed = sum(before[p["id"]] and not p["correct"] for p in preds)
            assert f"fixed {fixed}, regressed {regressed}" in cell
            refined = {r["problem_id"]: r["refinement"]["verified"]
                       for r in _read(root / f"iter_{k:02d}" / "refined.jsonl") if assign[r["problem_id"]] == "c00"}
            if refined:
                assert f"refined {len(refined)} ({sum(refined.values())} verified)" in cell
    # without clusters.json: no table
    plain = tmp_path / "runs" / "plain"
    write_run(plain, val=10, test=5, iterations=2, refinements=2)
    assert "Failure clusters" not in page_of(plain)
