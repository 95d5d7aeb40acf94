"""`undo data import`: every preset from a small local file shaped like the real dataset, splits, mapping, bad input."""

from __future__ import annotations

import csv
import json

import pytest

from undo_cli.data.importer import DataImportConfig, convert_rows, parse_split, split_counts
from undo_cli.errors import RecordError, UndoError
from undo_cli.records import read_records
from tests.conftest import write_jsonl

WIDE = {"COLUMNS": "400"}  # rich wraps stderr at the terminal width; keep messages on one line

# Rows with the real column layouts (values shortened from the real datasets).
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]
SVAMP = [
    {"ID": "chal-1", "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack",
     "Question": "How much do you have to pay to buy each pack?", "Equation": "( 76.0 - 25.0 )", "Answer": 51.0,
     "Type": "Subtraction"},
    {"ID": "chal-2", "Body": "Dan had $ 3 left with him after he bought a candy bar. If he had $ 4 at the start.",
     "Question": "How much did the candy bar cost?", "Equation": "( 4.0 - 3.0 )", "Answer": 1.0, "Type": "Subtraction"},
]
MATH = [
    {"problem": "What is $\\left(\\frac{7}{8}\\right)^3 \\cdot \\left(\\frac{7}{8}\\right)^{-3}$?", "level": "Level 1",
     "type": "Algebra", "solution": "By definition, $a^{-b} = \\frac{1}{a^b}$. So the product is $\\boxed{1}$."},
    {"problem": "Simplify $\\sqrt{8}$.", "level": "Level 2", "type": "Prealgebra",
     "solution": "$\\sqrt{8} = \\sqrt{4 \\cdot 2} = \\boxed{2\\sqrt{2}}$."},
    {"problem": "If $x^2 = \\frac{9}{16}$ and $x > 0$, find $x$.", "level": "Level 2", "type": "Algebra",
     "solution": "Taking square roots, $x = \\boxed{\\frac{3}{4}}$."},
]
COMMONSENSE_QA = [
    {"id": "075e483d21c29a511267ef62bedc0461", "question": "The sanctions against the school were a punishing blow, "
     "and they seemed to what the efforts the school had made to change?", "question_concept": "punishing",
     "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["ignore", "enforce", "authoritarian", "yell at", "avoid"]},
     "answerKey": "A"},
    {"id": "61fe6e879ff18686d7552425a36344c8", "question": "Sammy wanted to go to where the people were. "
     "Where might he go?", "question_concept": "people",
     "choices": {"label": ["A", "B", "C", "D", "E"],
                 "text": ["race track", "populated areas", "the desert", "apartment", "roadblock"]},
     "answerKey": "B"},
]
STRATEGYQA = [
    {"qid": "4fd64bb6ce5b78ab20b6", "term": "Mixed martial arts", "description": "full contact combat sport",
     "question": "Is Mixed martial arts totally original from Roman Colosseum games?", "answer": False,
     "facts": ["Mixed Martial arts in the UFC takes place in an enclosed structure called The Octagon."],
     "decomposition": ["Which sport is Mixed martial arts?"]},
    {"qid": "9f6e0ec6e0c4a5d9b2c1", "term": "Hamster", "description": "subfamily of rodents",
     "question": "Are more people today related to Genghis Khan than Julius Caesar?", "answer": True,
     "facts": [], "decomposition": []},
]
ARC = [
    {"id": "Mercury_SC_415702", "question": "George wants to warm his hands quickly by rubbing them. "
     "Which skin surface will produce the most heat?",
     "choices": {"text": ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "MCAS_2000_4_6", "question": "Which technology was developed most recently?",
     "choices": {"text": ["cellular telephone", "television", "refrigerator", "airplane"],
                 "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
]


def _import(undo, *args):
    return undo("data", "import", *map(str, args), env=WIDE)


def _all(out_dir, name="all"):
    return read_records(out_dir / f"{name}.jsonl", "problem")


def test_gsm8k(undo, tmp_path):
    proc = _import(undo, write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K), "--preset", "gsm8k", "-o", tmp_path / "d",
                   "--split", "all=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    rows = _all(tmp_path / "d")
    assert [(r["id"], r["answer"], r["task"]) for r in rows] == [("gsm8k-0", "72", "math"), ("gsm8k-1", "10", "math")]
    assert rows[0]["question"] == GSM8K[0]["question"]
    assert "<<" not in rows[0]["meta"]["solution"] and rows[0]["meta"]["solution"].endswith("#### 72")
    assert json.loads((tmp_path / "d" / "import.json").read_text())["problems"] == 2


def test_svamp_from_a_json_list(undo, tmp_path):
    src = tmp_path / "svamp.json"
    src.write_text(json.dumps(SVAMP))
    proc = _import(undo, src, "--preset", "svamp", "-o", tmp_path / "d", "--split", "all=1")
    assert proc.returncode == 0, proc.stderr
    rows = _all(tmp_path / "d")
    assert [r["id"] for r in rows] == ["chal-1", "chal-2"]
    assert rows[0]["question"] == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each "
                                   "pack. How much do you have to pay to buy each pack?")
    assert [r["answer"] for r in rows] == ["51", "1"]
    assert rows[0]["meta"] == {"equation": "( 76.0 - 25.0 )", "type": "Subtraction"}


@pytest.mark.slow
def test_math_from_parquet_and_math500_layout(undo, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(MATH), src)
    proc = _import(undo, src, "--preset", "math", "-o", tmp_path / "d", "--split", "all=1")
    assert proc.returncode == 0, proc.stderr
    rows = _all(tmp_path / "d")
    assert [r["answer"] for r in rows] == ["1", "2\\sqrt{2}", "\\frac{3}{4}"]
    assert [r["id"] for r in rows] == ["math-0", "math-1", "math-2"]
    assert rows[1]["meta"]["level"] == "Level 2" and rows[1]["meta"]["type"] == "Prealgebra"
    # MATH-500 carries its own `answer` and `unique_id` columns
    m500 = [{**MATH[2], "answer": "\\frac34", "subject": "Algebra", "unique_id": "test/algebra/1.json"}]
    _, (row,) = convert_rows(DataImportConfig(source=str(write_jsonl(tmp_path / "m500.jsonl", m500)), preset="math"))
    assert (row["id"], row["answer"], row["meta"]["subject"]) == ("test/algebra/1.json", "\\frac34", "Algebra")


def test_commonsense_qa_and_arc_choices(undo, tmp_path):
    proc = _import(undo, write_jsonl(tmp_path / "cqa.jsonl", COMMONSENSE_QA), "--preset", "commonsense_qa",
                   "-o", tmp_path / "c", "--split", "all=1")
    assert proc.returncode == 0, proc.stderr
    rows = _all(tmp_path / "c")
    assert rows[1]["id"] == "61fe6e879ff18686d7552425a36344c8"
    assert rows[1]["task"] == "choice" and rows[1]["answer"] == "B"
    assert rows[1]["choices"] == ["race track", "populated areas", "the desert", "apartment", "roadblock"]
    assert rows[1]["meta"] == {"answer_text": "populated areas", "concept": "people"}

    proc = _import(undo, write_jsonl(tmp_path / "arc.jsonl", ARC), "--preset", "arc", "-o", tmp_path / "a", "--split", "all=1")
    assert proc.returncode == 0, proc.stderr
    rows = _all(tmp_path / "a")
    assert [(r["id"], r["answer"]) for r in rows] == [("Mercury_SC_415702", "A"), ("MCAS_2000_4_6", "A")]  # '1' -> A
    assert rows[1]["meta"]["answer_text"] == "cellular telephone"


def test_strategyqa_booleans_become_yes_no(undo, tmp_path):
    proc = _import(undo, write_jsonl(tmp_path / "sqa.jsonl", STRATEGYQA), "--preset", "strategyqa", "-o", tmp_path / "d",
                   "--split", "all=1")
    assert proc.returncode == 0, proc.stderr
    rows = _all(tmp_path / "d")
    assert [(r["id"], r["answer"], r["task"]) for r in rows] == [
        ("4fd64bb6ce5b78ab20b6", "no", "exact"), ("9f6e0ec6e0c4a5d9b2c1", "yes", "exact")]
    assert rows[0]["meta"]["term"] == "Mixed martial arts" and "facts" not in rows[1]["meta"]


def test_field_mapping_flags_on_csv(undo, tmp_path):
    src = tmp_path / "quiz.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uid", "prompt", "gold", "opts", "difficulty"])
        w.writerow(["q-7", "Which is a fruit?", "apple", "stone|apple|chair", "easy"])
        w.writerow(["q-8", "Which is a colour?", "C", '["dog", "car", "red"]', "easy"])
    proc = _import(undo, src, "--question-field", "prompt", "--answer-field", "gold", "--choices-field", "opts",
                   "--id-field", "uid", "-o", tmp_path / "d", "--split", "all=1")
    assert proc.returncode == 0, proc.stderr
    rows = _all(tmp_path / "d")
    assert [(r["id"], r["task"], r["answer"], r["choices"]) for r in rows] == [
        ("q-7", "choice", "B", ["stone", "apple", "chair"]), ("q-8", "choice", "C", ["dog", "car", "red"])]
    assert rows[0]["meta"] == {"difficulty": "easy"}


def test_splits_are_seeded_and_ids_stable(tmp_path, capsys):
    from undo_cli.data.importer import run

    src = write_jsonl(tmp_path / "nums.jsonl", [{"question": f"What is {i} + 1?", "answer": i + 1} for i in range(50)])

    def split(out, **kw):
        run(DataImportConfig(source=str(src), output_dir=str(tmp_path / out), **kw))
        return {name: [r["id"] for r in read_records(tmp_path / out / f"{name}.jsonl", "problem", allow_empty=True)]
                for name in ("train", "val", "test")}

    a, b, c = split("a", seed=1), split("b", seed=1), split("c", seed=2)
    assert a == b
    for name in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert a != c
    assert [len(a[k]) for k in ("train", "val", "test")] == [40, 5, 5]
    assert sorted(sum(a.values(), [])) == sorted(sum(c.values(), [])) == sorted(f"nums-{i}" for i in range(50))
    assert a["val"] == sorted(a["val"], key=lambda rid: int(rid.split("-")[1]))  # source order inside a split
    # --limit takes the first rows, with the same ids
    limited = split("l", seed=1, limit=10)
    assert sorted(sum(limited.values(), []), key=lambda r: int(r.split("-")[1])) == [f"nums-{i}" for i in range(10)]


def test_an_import_with_other_settings_is_refused_and_overwrite_replaces_it(tmp_path, undo_inproc):
    """Issue 32: re-importing another split into a folder a run was made on exited 0 without a word."""
    from undo_cli.records import sha256_file

    src = write_jsonl(tmp_path / "nums.jsonl", [{"question": f"What is {i} + 1?", "answer": i + 1} for i in range(50)])
    out = tmp_path / "data"
    assert undo_inproc("data", "import", src, "-o", out, "--split", "train=0.8,val=0.1,test=0.1", env=WIDE).returncode == 0
    before = {name: (out / f"{name}.jsonl").read_bytes() for name in ("train", "val", "test")}
    recorded = json.loads((out / "import.json").read_text())
    assert {k: v["sha256"] for k, v in recorded["splits"].items()} == {k: sha256_file(out / f"{k}.jsonl")
                                                                       for k in before}
    assert recorded["settings"]["split"] == "train=0.8,val=0.1,test=0.1" and recorded["settings"]["seed"] == 0

    again = undo_inproc("data", "import", src, "-o", out, "--split", "train=0.8,val=0.1,test=0.1", env=WIDE)
    assert again.returncode == 0 and {n: (out / f"{n}.jsonl").read_bytes() for n in before} == before  # same bytes
    other = undo_inproc("data", "import", src, "-o", out, "--split", "train=0.5,val=0.25,test=0.25", "--seed", "1",
                        env=WIDE)
    assert other.returncode == 2, other.stderr
    assert ("holds an import with other settings: split was 'train=0.8,val=0.1,test=0.1', now "
            "'train=0.5,val=0.25,test=0.25'; seed was 0, now 1") in other.stderr and "--overwrite" in other.stderr
    assert {n: (out / f"{n}.jsonl").read_bytes() for n in before} == before  # nothing touched
    write_jsonl(src, [{"question": f"What is {i} + 2?", "answer": i + 2} for i in range(50)])  # the source changed
    changed = undo_inproc("data", "import", src, "-o", out, "--split", "train=0.8,val=0.1,test=0.1", env=WIDE)
    assert changed.returncode == 2 and "the rows read differ" in changed.stderr

    replaced = undo_inproc("data", "import", src, "-o", out, "--split", "all=1", "--overwrite", env=WIDE)
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["all.jsonl", "import.json"]  # the old split files are gone

    mine = tmp_path / "mine"
    write_jsonl(mine / "train.jsonl", [{"id": "a", "question": "q", "answer": "1"}])
    refused = undo_inproc("data", "import", src, "-o", mine, env=WIDE)
    assert refused.returncode == 2 and "exists and no `undo data import` wrote it" in refused.stderr
    assert read_records(mine / "train.jsonl", "problem") == [{"id": "a", "question": "q", "answer": "1"}]


def test_split_arithmetic():
    assert parse_split("train=0.8,val=0.1,test=0.1") == [("train", 0.8), ("val", 0.1), ("test", 0.1)]
    assert split_counts(7, parse_split("train=0.8,val=0.1,test=0.1")) == [5, 1, 1]  # largest remainder
    assert split_counts(50, parse_split("a=0.5,b=0.5")) == [25, 25]
    for bad in ("train=0.8,val=0.1", "train:0.8,val=0.2", "train=0.5,train=0.5", "train=x", "../x=1"):
        with pytest.raises(UndoError):
            parse_split(bad)


@pytest.mark.parametrize("name, content, flags, expected", [
    ("bad.jsonl", '{"question": "q", "answer": "1"}\n{"question": "q2", "answer": \n', [],
     "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"question": "q", "answer": "1"}\n{"question": "q2"}\n', [],
     "bad.jsonl:2: field 'answer': missing (the row has: question)"),
    ("bad.jsonl", '{"question": "q", "answer": "72"}\n', ["--preset", "gsm8k"],
     "bad.jsonl:1: field 'answer': a GSM8K answer ends with '#### <number>'"),
    ("bad.jsonl", '{"q": "x", "answer": "1"}\n', ["--question-field", "query"],
     "bad.jsonl:1: field 'query': missing"),
    ("bad.jsonl", '{"id": "a", "question": "q", "answer": "1"}\n{"id": "a", "question": "r", "answer": "2"}\n', [],
     "bad.jsonl:2: field 'id': duplicate id 'a' (first seen at line 1)"),
    ("bad.jsonl", '{"question": "q", "answer": "Z", "choices": ["x", "y"]}\n', [],
     "bad.jsonl:1: field 'answer': 'Z' is neither an option label (A, B) nor an option's text"),
    ("bad.csv", "question,answer\nq1,1\nq2,2,extra\n", [], "bad.csv:3: has a different number of columns"),
    ("bad.json", '[{"question": "q", "answer": "1"}, 3]', [], "bad.json: item 1: expected a JSON object"),
    ("bad.json", '{"data": [{"question": "q", "answer": "1"}, {"question": "r"}]}', [],
     "bad.json item 1: field 'answer': missing"),
    ("empty.jsonl", "", [], "empty.jsonl: no rows to import"),
    ("ok.jsonl", '{"question": "q", "answer": "1"}\n', ["--preset", "gsm9k"], "--preset gsm9k: unknown preset"),
    ("ok.jsonl", '{"question": "q", "answer": "1"}\n', ["--split", "train=0.9"], "fractions add up to 0.9, not 1"),
    ("ok.txt", "question,answer\n", [], "unsupported file type '.txt'"),
])
def test_bad_input_fails_and_writes_nothing(tmp_path, name, content, flags, expected):
    # In process (the CLI's exit code 2 for these is checked below, on a few of them).
    from undo_cli.data.importer import run

    src = tmp_path / name
    src.write_text(content)
    out = tmp_path / "out"
    options = {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    with pytest.raises(UndoError) as err:
        run(DataImportConfig(source=str(src), output_dir=str(out), **options))
    assert expected in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("content, flags, expected", [
    ('{"question": "q", "answer": "1"}\n{"question": "q2"}\n', [], "bad.jsonl:2: field 'answer': missing"),
    ('{"question": "q", "answer": "1"}\n', ["--preset", "gsm9k"], "use one of: gsm8k, svamp, math, commonsense_qa"),
])
def test_bad_input_exits_2_from_the_cli(undo, tmp_path, content, flags, expected):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    proc = _import(undo, src, "-o", tmp_path / "out", *flags)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_missing_file_and_unreachable_hub(undo, tmp_path):
    proc = _import(undo, tmp_path / "nope.jsonl", "-o", tmp_path / "out")
    assert proc.returncode == 2 and "nope.jsonl: no such file" in proc.stderr
    # No network here (HF_HUB_OFFLINE=1): the real `datasets.load_dataset` path fails with a clear message.
    proc = _import(undo, "--preset", "gsm8k", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert "cannot load 'openai/gsm8k' (config main), split 'train' from the Hugging Face Hub" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_problem_files_pass_through_from_stdin(undo, tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "examples" / "choice.jsonl"
    proc = undo("data", "import", "-", "-o", tmp_path / "d", "--split", "all=1", input=shipped.read_text())
    assert proc.returncode == 0, proc.stderr
    rows = _all(tmp_path / "d")
    original = read_records(shipped, "problem")
    assert [(r["id"], r["answer"], r["choices"], r["meta"]) for r in rows] == \
        [(r["id"], r["answer"], r["choices"], r["meta"]) for r in original]


def test_errors_in_process_name_the_field(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": True}])
    with pytest.raises(RecordError) as err:
        convert_rows(DataImportConfig(source=str(src)))
    assert err.value.line == 1 and err.value.field == "answer"
    with pytest.raises(UndoError, match="nothing to import"):
        DataImportConfig()


def test_shipped_examples_regenerate_byte_for_byte(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    proc = subprocess.run([sys.executable, str(examples / "make_examples.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    for name, count, task in (("arithmetic.jsonl", 600, "math"), ("choice.jsonl", 100, "choice")):
        assert (tmp_path / name).read_bytes() == (examples / name).read_bytes(), f"{name} differs: rerun make_examples.py"
        rows = read_records(examples / name, "problem")
        assert len(rows) == count and {r["task"] for r in rows} == {task}
        assert all(r["meta"]["solution"].endswith(f"#### {r['answer']}") for r in rows)
