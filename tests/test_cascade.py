"""The teacher cascade and row lineage: tiers in order, a row no tier verifies, budgets across tiers, a cache per
teacher, resume after a kill, `undo lineage`, and run.toml's [[teachers]] errors.

    python -m pytest -q tests/test_cascade.py

The cheap teacher is `tiny_teacher` (random weights: nothing it writes verifies), the strong one
`trained_teacher` (solves TAUGHT_PROBLEMS greedily); problems with a wrong gold answer verify under neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TAUGHT_PROBLEMS, read_jsonl, write_jsonl


@pytest.fixture
def problems(tmp_path) -> Path:
    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:4]]
    rows += [{**rows[0], "id": "bad0", "answer": "999"}]  # no teacher verifies a wrong gold answer
    return write_jsonl(tmp_path / "problems.jsonl", rows)


def _cascade(undo, cheap, strong, problems, out, *extra):
    return undo("generate", "--teacher", cheap, "--cascade", f"{strong},name=strong,price_output=2",
                "--input", problems, "--output", out, "--prompt", "student", "--max-tokens", "48",
                "--verify", "strict", *extra)


@pytest.mark.slow
def test_a_row_goes_to_the_strong_teacher_only_when_the_cheap_one_fails_and_a_row_neither_verifies_is_marked(
        undo, tiny_teacher, trained_teacher, problems, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = _cascade(undo, tiny_teacher, trained_teacher, problems, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = read_jsonl(out)
    assert sorted(r["problem_id"] for r in kept) == [p["id"] for p in TAUGHT_PROBLEMS[:4]]
    for r in kept:
        lin = r["lineage"]
        assert [a["teacher"] for a in lin["cascade"]] == [str(tiny_teacher), "strong"]
        assert lin["cascade"][0]["verdict"] != "verified" and lin["cascade"][1]["verdict"] == "verified"
        assert lin["cascade_verified"] is True and lin["teacher"]["id"] == "strong"
        assert lin["teacher"]["model"] == str(trained_teacher) and len(lin["teacher"]["hash"]) == 16
        assert lin["cascade"][1]["cost"] > 0 and lin["cascade"][1]["cached"] is False
        assert lin["template"]["name"] == "student" and lin["sampling"]["max_tokens"] == 48
        assert lin["iteration"] is None and lin["parent"] is None and lin["failure_cluster"] is None
        assert lin["cached"] is False
    rejected = read_jsonl(tmp_path / "r.rejected.jsonl")
    assert [r["problem_id"] for r in rejected] == ["bad0"]
    assert rejected[0]["lineage"]["cascade_verified"] is False
    assert [a["teacher"] for a in rejected[0]["lineage"]["cascade"]] == [str(tiny_teacher), "strong"]
    usage = json.loads((tmp_path / "r.usage.json").read_text())
    by = usage["by_backend"]
    assert set(by) == {str(tiny_teacher), "strong"}
    assert by[str(tiny_teacher)]["paid"]["requests"] == 5 and by["strong"]["paid"]["requests"] == 5
    assert by["strong"]["cost"] > 0 and by[str(tiny_teacher)].get("cost") is None
    assert "rows no teacher verified" in proc.stderr

    # The same run again: every answer from the cache, per teacher (the key holds each model's identity).
    again = _cascade(undo, tiny_teacher, trained_teacher, problems, tmp_path / "again.jsonl")
    assert again.returncode == 0, again.stderr[-3000:]
    led = json.loads((tmp_path / "again.usage.json").read_text())
    assert led["paid"]["requests"] == 0 and led["cached"]["requests"] == 10
    assert [r["rationale"] for r in read_jsonl(tmp_path / "again.jsonl")] == [r["rationale"] for r in kept]
    assert all(r["lineage"]["cached"] for r in read_jsonl(tmp_path / "again.jsonl"))


@pytest.mark.slow
def test_the_output_budget_holds_across_tiers_and_a_tier_budget_stops_only_that_tier(
        undo, tiny_teacher, trained_teacher, problems, tmp_path):
    full = _cascade(undo, tiny_teacher, trained_teacher, problems, tmp_path / "full.jsonl", "--no-cache",
                    "--batch-size", "1")
    assert full.returncode == 0, full.stderr[-3000:]
    spent = json.loads((tmp_path / "full.usage.json").read_text())["paid"]["tokens"]
    budget = spent // 2
    half = _cascade(undo, tiny_teacher, trained_teacher, problems, tmp_path / "half.jsonl", "--no-cache",
                    "--batch-size", "1", "--max-teacher-tokens", str(budget))
    assert half.returncode == 0 and "teacher budget reached" in half.stderr
    assert json.loads((tmp_path / "half.usage.json").read_text())["paid"]["tokens"] <= budget
    assert 0 < len(read_jsonl(tmp_path / "half.jsonl")) < 4

    # The strong tier's own budget: the cheap tier still answers every row, the strong one none.
    tier = undo("generate", "--teacher", tiny_teacher, "--cascade", f"{trained_teacher},name=strong,max_teacher_tokens=10",
                "--input", problems, "--output", tmp_path / "tier.jsonl", "--prompt", "student", "--max-tokens", "48",
                "--verify", "strict", "--no-cache")
    assert tier.returncode == 0, tier.stderr[-3000:]
    by = json.loads((tmp_path / "tier.usage.json").read_text())["by_backend"]
    assert by[str(tiny_teacher)]["paid"]["requests"] == 5 and "strong" not in by
    assert read_jsonl(tmp_path / "tier.jsonl") == [] and "teacher budget reached" in tier.stderr


@pytest.mark.slow
def test_a_route_sends_a_task_to_its_own_tiers_and_the_cascade_identifies_the_run(
        undo, tiny_teacher, trained_teacher, tmp_path):
    rows = [{k: p[k] for k in ("id", "question", "answer")} for p in TAUGHT_PROBLEMS[:2]]
    rows = [{**rows[0], "task": "math"}, {**rows[1], "task": "exact", "answer": rows[1]["answer"]}]
    problems = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "r.jsonl"
    proc = _cascade(undo, tiny_teacher, trained_teacher, problems, out, "--route", "task:exact=strong",
                    "--keep", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_id = {r["problem_id"]: r for r in read_jsonl(out)}
    assert [a["teacher"] for a in by_id[rows[1]["id"]]["lineage"]["cascade"]] == ["strong"]
    assert [a["teacher"] for a in by_id[rows[0]["id"]]["lineage"]["cascade"]] == [str(tiny_teacher), "strong"]
    # Another strong teacher is another run; other prices are not.
    other = undo("generate", "--teacher", tiny_teacher, "--cascade", f"{tiny_teacher},name=strong",
                 "--input", problems, "--output", out, "--prompt", "student", "--max-tokens", "48",
                 "--verify", "strict", "--route", "task:exact=strong", "--keep", "all")
    assert other.returncode == 2 and "cascade" in other.stderr
    cheaper = undo("generate", "--teacher", tiny_teacher, "--cascade", f"{trained_teacher},name=strong,price_output=9",
                   "--input", problems, "--output", out, "--prompt", "student", "--max-tokens", "48",
                   "--verify", "strict", "--route", "task:exact=strong", "--keep", "all")
    assert cheaper.returncode == 0, cheaper.stderr[-2000:]


def test_cascade_and_route_errors_name_the_setting_and_the_fix(undo_inproc, tiny_teacher, tmp_path):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "question": "q", "answer": "1"}])
    base = ("generate", "--teacher", tiny_teacher, "--input", problems, "--output", tmp_path / "o.jsonl")
    bad = undo_inproc(*base, "--cascade", f"{tiny_teacher},prise_output=2")
    assert bad.returncode == 2 and "unknown key 'prise_output'" in bad.stderr and "price_output" in bad.stderr
    bad = undo_inproc(*base, "--cascade", f"{tiny_teacher}/nope")
    assert bad.returncode == 2 and "--cascade" in bad.stderr
    bad = undo_inproc(*base, "--cascade", f"{tiny_teacher},name=x", "--route", "task:math=y")
    assert bad.returncode == 2 and "no tier named 'y'" in bad.stderr
    bad = undo_inproc(*base, "--cascade", f"{tiny_teacher},name=x,max_teacher_tokens=-1")
    assert bad.returncode == 2 and "must be 0 or more" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- undo iterate: [[teachers]] and [teacher_routes] in run.toml ------------------------------------

def _toml(tmp_path, body: str) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:3]])
    path = tmp_path / "run.toml"
    path.write_text(f'student = "org/student"\ntrain_file = "{train}"\nval_file = "{train}"\ntest_file = "{train}"\n'
                    f'runs_dir = "{tmp_path / "runs"}"\nname = "r"\n' + body, encoding="utf-8")
    return path


def test_run_toml_teachers_give_each_tier_its_bound_in_the_dry_run_and_the_stages_their_cascade(
        undo_inproc, tiny_teacher, trained_teacher, tmp_path):
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.plan import Unopened
    from undo_cli.loop.rounds import Loop
    from undo_cli.loop.settings import resolve

    toml = _toml(tmp_path, f'[[teachers]]\nmodel = "{tiny_teacher}"\nname = "cheap"\n\n'
                           f'[[teachers]]\nmodel = "{trained_teacher}"\nname = "strong"\nprice_output = 2.0\n'
                           f'max_teacher_tokens = 500\n\n[teacher_routes]\n"task:exact" = ["strong"]\n\n'
                           '[generate]\nmax_tokens = 16\n')
    proc = undo_inproc("iterate", "--config", toml, "--dry-run", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)["teacher_estimate"]
    assert [t["teacher"] for t in est["tiers"]] == ["cheap", "strong"]
    assert est["tiers"][1]["cost"] > 0 and est["tiers"][0]["cost"] is None
    assert est["tiers"][1]["budget"]["max_teacher_tokens"] == 500
    assert "tier strong, upper bound" in " ".join(proc.stderr.split())

    config = resolve(IterateConfig, str(toml), {}, [])
    assert config.teacher == str(tiny_teacher)  # the first of the teachers
    cfg = Loop(config, Unopened(config.run_dir)).generate_config()
    assert [t.name for t in cfg.tiers()] == ["cheap", "strong"] and cfg.routes() == {"task:exact": ["strong"]}
    assert cfg.tiers()[1].price_output == 2.0 and cfg.tiers()[1].max_teacher_tokens == 500
    # Prices and budgets do not identify the run; the models do.
    other = resolve(IterateConfig, str(toml), {"max_iterations": 3}, [])
    other.teachers[1] = {**other.teachers[1], "price_output": 9.0, "max_teacher_tokens": 5}
    assert other.identity()["teachers"] == config.identity()["teachers"]
    other.teachers[1] = {**other.teachers[1], "model": str(tiny_teacher)}
    assert other.identity()["teachers"] != config.identity()["teachers"]


@pytest.mark.parametrize("body, words", [
    ('[[teachers]]\nmodel = "M"\nprise = 1\n', ["run.toml: teachers[1]: unknown key 'prise'", "price_input"]),
    ('[[teachers]]\nname = "x"\n', ["run.toml: teachers[1]: model: missing", 'model = "FOLDER or NAME"']),
    ('[[teachers]]\nmodel = "M"\nmax_teacher_tokens = "lots"\n',
     ["teachers[1]: max_teacher_tokens = 'lots': expected an integer"]),
    ('[teachers]\nmodel = "M"\n', ["run.toml: teachers must be a list of tables", "double square brackets"]),
    ('[[teachers]]\nmodel = "M"\n[teachers.routes]\n"task:math" = ["M"]\n', ["routes is a key of this teacher",
                                                                              "a teacher_routes table"]),
    ('[[teachers]]\nmodel = "M"\n[teacher_routes]\n"task:math" = 3\n', ["teacher_routes.task:math = 3",
                                                                         "list of teacher names"]),
    ('[[teachers]]\nmodel = "M"\n[teacher_routes]\n"task:math" = ["Z"]\n', ["no tier named 'Z'", "M"]),
    ('teacher = "N"\n[[teachers]]\nmodel = "M"\n', ["but the first of the teachers tables has model = 'M'"]),
])
def test_run_toml_cascade_errors_name_the_file_the_key_and_the_fix(undo_inproc, tmp_path, body, words):
    proc = undo_inproc("iterate", "--config", _toml(tmp_path, body), "--dry-run")
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err


# --- lineage across a run's iterations, resume ----------------------------------------------------------

@pytest.mark.slow
def test_undo_lineage_prints_a_rows_history_across_iterations(undo, undo_inproc, tiny_teacher, trained_teacher,
                                                              tmp_path):
    from tests.test_refine import TAUGHT_FORMAT_TEMPLATE, error

    run = tmp_path / "runs" / "r"
    problems = write_jsonl(tmp_path / "p.jsonl",
                           [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:3]])
    gen = _cascade(undo, tiny_teacher, trained_teacher, problems, run / "iter_00" / "rationales.jsonl",
                   "--iteration", "0")
    assert gen.returncode == 0, gen.stderr[-2000:]
    template = tmp_path / "taught.jinja"
    template.write_text(TAUGHT_FORMAT_TEMPLATE)
    errors = write_jsonl(run / "iter_00" / "errors.jsonl",
                         [{**error(p["id"], p["question"], answer=p["answer"]), "cluster": "c1"}
                          for p in TAUGHT_PROBLEMS[:1]])
    ref = undo("refine", "--teacher", trained_teacher, "--errors", errors, "--targets",
               run / "iter_00" / "rationales.jsonl", "--output", run / "iter_01" / "refined.jsonl", "--select",
               "errors", "--prompt", template, "--max-tokens", "48", "--iteration", "1", "--k", "0")
    assert ref.returncode == 0, ref.stderr[-2000:]
    mix = undo("mix", "--base", run / "iter_00" / "rationales.jsonl", "--refined", run / "iter_01" / "refined.jsonl",
               "--output", run / "iter_01" / "train_data.jsonl")
    assert mix.returncode == 0, mix.stderr[-2000:]

    proc = undo_inproc("lineage", run, "p00#0", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout)["history"]
    assert [(s["iteration"], s["event"]) for s in steps] == [
        (0, "generated and verified"), (1, "refined and verified"), (1, "trained on")]
    first, refined = steps[0]["lineage"], steps[1]["lineage"]
    assert [a["teacher"] for a in first["cascade"]] == [str(tiny_teacher), "strong"] and first["iteration"] == 0
    assert refined["parent"] == {"id": "p00#0", "iteration": 0, "rationale_hash": steps[0]["rationale_hash"]}
    assert refined["informed_by"] == ["p00"] and refined["failure_cluster"] == "c1" and refined["iteration"] == 1
    assert refined["teacher"]["model"] == str(trained_teacher) and refined["template"]["name"] == "taught"
    assert steps[2]["lineage"] == refined  # mix carries the row as refine wrote it

    table = undo_inproc("lineage", run, "p00")
    assert table.returncode == 0 and "refined and verified" in table.stderr and "cluster c1" in table.stderr
    missing = undo_inproc("lineage", run, "nope#0")
    assert missing.returncode == 2 and "no row 'nope#0'" in missing.stderr and "head -n 1" in missing.stderr



def test_the_html_reports_refinement_cards_show_the_lineage_command(tmp_path, undo_here):
    from tests.run_folders import write_run

    run = tmp_path / "runs with space" / "r"
    write_run(run, val=10, test=5, iterations=2, refinements=3)
    code, err = undo_here("report", run, "--html", tmp_path / "page.html")
    assert code == 0, err
    page = (tmp_path / "page.html").read_text()
    assert f"undo lineage '{run}'" in page  # the run folder shell-quoted; each card adds its row id
    assert "D.run.lineage} ${shellWord(id)}" in page


@pytest.mark.slow
def test_a_killed_cascade_resumes_without_losing_or_duplicating_rows(tiny_teacher, trained_teacher, tmp_path):
    from tests.conftest import kill_after_first_line

    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:6]]
    problems = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "r.jsonl"
    args = ["generate", "--teacher", str(tiny_teacher), "--cascade", f"{trained_teacher},name=strong",
            "--input", str(problems), "--output", str(out), "--prompt", "student", "--max-tokens", "48",
            "--verify", "strict", "--batch-size", "1"]
    kill_after_first_line(args, out)
    written = read_jsonl(out)
    assert 1 <= len(written) < 6
    from tests.conftest import run_undo

    again = run_undo(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    final = read_jsonl(out)
    assert sorted(r["id"] for r in final) == sorted(f"{p['id']}#0" for p in rows)  # none lost, none twice
    assert all(r in final for r in written)
    assert all([a["teacher"] for a in r["lineage"]["cascade"]] == [str(tiny_teacher), "strong"] for r in final)
    ledger = json.loads((tmp_path / "r.usage.json").read_text())
    # A row in flight at the kill may be paid twice at most once; the rest once each, per tier.
    assert 6 <= ledger["by_backend"]["strong"]["paid"]["requests"] + ledger["by_backend"]["strong"]["cached"]["requests"]
    assert ledger["by_backend"]["strong"]["paid"]["requests"] <= 7


@pytest.mark.slow
def test_undo_iterate_runs_a_cascade_from_run_toml_and_resumes_with_other_prices_only(
        undo, undo_inproc, tiny_model, tiny_teacher, trained_teacher, tmp_path):
    from tests.test_iterate import STAGE_FLAGS

    problems = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows)
             for s, rows in (("train", problems[:6]), ("val", problems[6:]), ("test", problems[8:]))}
    toml = tmp_path / "run.toml"
    body = (f'student = "{tiny_model}"\ntrain_file = "{files["train"]}"\nval_file = "{files["val"]}"\n'
            f'test_file = "{files["test"]}"\nruns_dir = "{tmp_path / "runs"}"\nname = "c"\nmax_iterations = 1\n'
            f'[[teachers]]\nmodel = "{tiny_teacher}"\nname = "cheap"\n\n'
            f'[[teachers]]\nmodel = "{trained_teacher}"\nname = "strong"\nprice_output = PRICE\n'
            'max_teacher_tokens = 100000\n')
    toml.write_text(body.replace("PRICE", "2.0"))
    flags = [f for f in STAGE_FLAGS if f not in ("--refine.batch-size", "1")]
    proc = undo("iterate", "--config", toml, *flags, "--generate.verify", "strict", "--refine.verify", "strict")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "c"
    rows = read_jsonl(run / "iter_00" / "rationales.jsonl")
    assert rows and all([a["teacher"] for a in r["lineage"]["cascade"]] == ["cheap", "strong"] for r in rows)
    manifest = json.loads((run / "manifest.json").read_text())
    usage = manifest["stages"]["iter_00/generate"]["summary"]["teacher_usage"]["by_backend"]
    assert set(usage) == {"cheap", "strong"} and usage["strong"]["cost"] > 0
    assert manifest["stages"]["iter_00/generate"]["summary"]["cascade"]["unverified"] == 0
    shown = undo_inproc("lineage", run, rows[0]["id"], "--format", "json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["history"][0]["lineage"]["teacher"]["id"] == "strong"

    toml.write_text(body.replace("PRICE", "5.0"))  # other prices: the same run, resumed (nothing reruns)
    again = undo("iterate", "--config", toml, *flags, "--generate.verify", "strict", "--refine.verify", "strict",
                 "--resume")
    assert again.returncode == 0, again.stderr[-4000:]
    toml.write_text(body.replace("PRICE", "2.0").replace(f'model = "{trained_teacher}"', f'model = "{tiny_model}"'))
    other = undo("iterate", "--config", toml, *flags, "--generate.verify", "strict", "--refine.verify", "strict",
                 "--resume")
    assert other.returncode == 2 and "teachers" in other.stderr


@pytest.mark.slow
def test_a_tiers_own_budget_holds_across_slurm_shards_and_a_larger_one_finishes(tiny_teacher, trained_teacher,
                                                                                 tmp_path):
    """Under --launcher slurm each shard keeps its own ledger: the launcher gives every shard a share of each tier's
    own budget (stages/slurm.py `allowances`), not the whole of it, so the shards together stay within it. A shard
    that share stopped records it (how the launcher tells a budget stop from a failure); a larger budget finishes
    the rest, and the shards merge (a tier's budget is no part of a shard's identity). The shards run here as
    the Slurm tasks run them (`run_shard`), without a cluster."""
    import dataclasses

    from undo_cli.stages import generate, shards
    from undo_cli.stages.slurm import allowances, budget_settings, run_shard

    rows = [{k: p[k] for k in ("id", "question", "answer", "task")} for p in TAUGHT_PROBLEMS[:8]]
    problems = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "r.jsonl"
    parts = [tmp_path / "shards" / f"r.{k}-of-2.jsonl" for k in range(2)]

    def run(budget: int) -> list[dict]:
        config = generate.GenerateConfig(
            teacher=str(tiny_teacher), input=str(problems), output=str(out), prompt="student", max_tokens=48,
            verify="strict", cache=False, cascade=[f"{trained_teacher},name=strong,price_output=2,max_teacher_tokens={budget}"])
        complete = [bool((shards.read_sidecar(p) or {}).get("complete")) if p.exists() else False for p in parts]
        given = allowances(config, parts, complete)
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        for k, part in enumerate(parts):
            if not complete[k]:
                run_shard("generate", {**settings, "output": str(part), "shard": f"{k}/2",
                                       **budget_settings(config, given[k])})
        return given

    def strong_paid() -> list[int]:
        return [json.loads(p.with_name(p.name.replace(".jsonl", ".usage.json")).read_text())["by_backend"]["strong"]
                ["paid"]["tokens"] for p in parts]

    budget = 300  # about two of the eight rows' upper bounds (prompt + 48 completion tokens): not all of them
    given = run(budget)
    assert [g["tiers"]["strong"]["max_teacher_tokens"] for g in given] == [150, 150]
    assert 0 < sum(strong_paid()) <= budget
    metas = [shards.read_sidecar(p) for p in parts]
    assert any(m.get("stopped") == "budget" for m in metas)
    for meta, share in zip(metas, given):
        if meta.get("stopped") == "budget":  # the share it ran under, as the launcher compares it
            assert json.loads(json.dumps(share)) == meta["budget"]

    run(100_000)
    assert all((shards.read_sidecar(p) or {}).get("complete") for p in parts)
    merged = shards.merge(shards.MergeConfig(output=str(out), shards=[str(p) for p in parts]))
    done = read_jsonl(out) + read_jsonl(tmp_path / "r.rejected.jsonl")
    assert sorted(r["problem_id"] for r in done) == sorted(r["id"] for r in rows)  # none lost, none twice
    strong = merged["teacher_usage"]["by_backend"]["strong"]
    assert strong["paid"]["tokens"] == sum(strong_paid())
    assert strong["cost"] == pytest.approx(2 * strong["paid"]["completion_tokens"] / 1e6)  # the tier's own cost, summed


# --- the stop rule (issue 30 part 2), on the paired test that chooses the best iteration ------------------

def _config(rule: str, patience: int = 1, per_ktok: float = 0.0):
    from undo_cli.loop.config import IterateConfig

    config = IterateConfig.__new__(IterateConfig)  # the rule reads a few numbers; no files needed
    config.max_iterations, config.patience, config.min_delta = 5, patience, 0.0
    config.choose_alpha, config.choose_min_gain = 0.05, 0.02
    config.stop_rule, config.stop_min_gain_per_ktok = rule, per_ktok
    return config


def test_the_paired_stop_rule_stops_on_no_evidence_where_patience_goes_on():
    from tests.test_iterate import _history
    from undo_cli.loop.rounds import decide

    h = _history(0.30, 0.31)  # +1 of 100: a raw gain, no evidence
    assert decide(h, _config("patience"))[1] is None  # the old rule sees a gain and goes on
    best, reason = decide(h, _config("paired"), {1: 5000})
    assert best == 0 and "paired test found no evidence of a gain for 1 round (last p = 1.000)" in reason
    assert decide(_history(0.30, 0.31, 0.32), _config("paired", patience=3), {})[1] is None
    assert decide(_history(0.30, 0.45), _config("paired"), {1: 5000}) == (1, None)  # +15 of 100: evidence


def test_the_value_stop_rule_stops_when_a_round_buys_too_little_per_teacher_token():
    from tests.test_iterate import _history
    from undo_cli.loop.rounds import decide
    from undo_cli.loop.stop import describe, rounds

    h = _history(0.30, 0.45)  # +15 points, significant
    assert decide(h, _config("value", per_ktok=0.2), {1: 100_000})[1].startswith(
        "round 1 gained +15.0 points for 100,000 paid teacher tokens (0.15 per 1,000")
    assert decide(h, _config("value", per_ktok=0.2), {1: 50_000})[1] is None  # 0.3 per 1,000: worth it
    assert decide(h, _config("value", per_ktok=0.2), {})[1] is None  # a round the cache answered costs nothing
    [row] = rounds(h, [{"iteration": 1, "against": 0, "p": 0.0001, "kept": True}], {1: 3000})
    assert row["tokens_per_point"] == 200 and row["gain_per_ktok"] == 5.0 and row["evidence"]
    assert describe(row) == ("round 1 vs 0: +15.0 points for 3,000 paid teacher tokens (5 per 1,000; 200 tokens "
                             "a point), p = 0.000")


def test_an_unknown_stop_rule_names_the_ones_there_are(undo_inproc, tmp_path):
    proc = undo_inproc("iterate", "--config", _toml(tmp_path, 'teacher = "org/t"\n'), "--stop-rule", "never",
                       "--dry-run")
    assert proc.returncode == 2 and "--stop-rule never: unknown stop rule" in proc.stderr
    assert "paired" in proc.stderr and "value" in proc.stderr
