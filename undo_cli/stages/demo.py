"""The offline tour: tiny models, the shipped arithmetic problems, the whole UNDO loop, in minutes on a CPU.

    undo demo                                  # everything, into ./undo-demo (about a minute on 2 idle cores)
    undo demo --workdir /tmp/demo --setup-only # only data + models; then run the loop yourself:
    undo iterate --config examples/run.toml    # (with the default --workdir)

No network, no GPU, no hub: every model is built here, from nothing.

1. **Data.** The 300 shipped word problems (examples/arithmetic.jsonl, each with
   a worked solution in `meta.solution`) are split by `undo data import` into
   DIR/data/{train,val,test}.jsonl.
2. **Tokenizer.** One small byte-level BPE trained on the problems, solutions
   and prompt templates, shared by teacher and student (numbers 0-99 become
   single tokens, which tiny models need to learn sums at all).
3. **Teacher.** A tiny Llama trained *with `undo train` itself* (stages/train.py)
   on exactly the prompts it will be given: the generate prompt
   (prompts/generate.jinja) followed by the worked solution, and the refine
   prompt (prompts/refine.jinja, filled with a previous solution, a made-up
   wrong student attempt and a similar failure) followed by a solution that
   first names the trap of that kind of problem. So it writes real rationales
   that the scorer verifies, and it answers the refine prompt with a
   re-teaching rationale, which is verified too. It only has to know the
   training problems: those are all a teacher writes about in UNDO.
4. **Student.** A smaller Llama with the same tokenizer, untrained.
5. **The loop.** `undo iterate` with examples/run.toml (teacher through
   generate/refine, student through train/evaluate, all on the `hf` backend),
   then `undo report`: the table and DIR/runs/demo/report.png.

The demo's models are tiny and its accuracy says nothing about real models: it
shows the machinery (verification, error collection, similarity selection,
refinement, mixing, convergence, resume, the run folder) on numbers that are
real but small. Everything it prints is measured, nothing is scripted.

Re-running `undo demo` reuses the data and finished models already in DIR;
an interrupted teacher training or loop continues with `--resume`, and a folder
built with another seed is refused (DIR/demo.json records it).
"""

from __future__ import annotations

import random
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError

# Sizes: the whole demo takes about a minute on 2 idle CPU cores (bench/demo.py), well inside 5 minutes.
VOCAB = 1024
TEACHER = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 512}
STUDENT = {"hidden_size": 96, "num_layers": 2, "num_heads": 3, "intermediate_size": 256}
# Small batches and a moderate lr: more optimizer steps for the same tokens. With batch 16 and
# lr 8e-3 the teacher never learnt to copy names and numbers from the question (19% of its
# training problems verified after 45 epochs); with batch 8 and 3e-3 it verifies all of them.
TEACHER_TRAINING = {"epochs": 40.0, "lr": 3e-3, "batch_size": 8, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
                    "logging_steps": 40, "save_steps": 100, "max_length": 768}
REFINE_EVERY = 3  # one training problem in 3 also gets a refine-prompt example (they are long: ~500 tokens)
# A small train split: the tiny teacher must learn every training problem by heart in about a
# minute (it learns 90 in 40 epochs; with 150, val and test shrink and the student did no better: 2.7% test).
SPLIT = "train=0.3,val=0.35,test=0.35"

# The trap each kind of problem sets (keyed by meta.template of examples/arithmetic.jsonl):
# what the teacher's refined rationales say first.
TRAPS = {
    "buy_then_give": "Buying adds to what you have and giving away takes from it, in that order.",
    "bags_then_eat": "Bags with the same number in each: multiply first, then take away what is given.",
    "two_friends_then_find": "Put both amounts together first, then add what is found.",
    "boxes_plus_gift": "Boxes with the same number in each: multiply first, then add the gift.",
    "packs_then_give": "Multiply to count the packs, add what there was, then subtract what is given.",
    "shop_day": "Selling takes away and getting new ones adds; go in the order of the day.",
    "more_and_fewer": "More than means add to that amount; fewer than means subtract from it.",
    "twice_then_spend": "Twice as many means multiply by 2, and that is added to what there was.",
}
GENERIC_TRAP = "Work one step at a time and check each result before the next."
DISCLAIMER = ("The demo's models are tiny (0.6M and 0.3M parameters, trained for a minute on a CPU): "
              "their accuracy says nothing about real models. It shows the machinery, with real numbers.")


@dataclass
class DemoConfig:
    """Everything `undo demo` needs."""

    workdir: str = field(default="undo-demo", metadata={"help": "Folder for data/, models/ and runs/ (created)."})
    resume: bool = field(default=False, metadata={
        "help": "Continue a demo that was interrupted (teacher training or the loop), recomputing nothing finished."})
    seed: int = field(default=0, metadata={"help": "Seed for the split, the tokenizer's corpus, the models and the loop."})
    setup_only: bool = field(default=False, metadata={
        "help": "Stop after writing data/ and models/teacher + models/student; run the loop yourself."})


STATE_FILE = "demo.json"  # DIR/demo.json: which seed built this folder (a folder is never mixed across seeds)


def _problems() -> Path:
    from undo_cli.prompts import bundled_dir

    path = bundled_dir("examples") / "arithmetic.jsonl"
    if not path.is_file():
        raise UndoError(f"{path}: the shipped sample problems are missing", hint="reinstall undo-cli")
    return path


def write_data(workdir: Path, seed: int) -> dict[str, Path]:
    """DIR/data/{train,val,test}.jsonl from the shipped problems (`undo data import`, seeded)."""
    from undo_cli.data.importer import DataImportConfig
    from undo_cli.data.importer import run as import_run

    out = workdir / "data"
    files = {split: out / f"{split}.jsonl" for split in ("train", "val", "test")}
    if not all(f.is_file() for f in files.values()):
        import_run(DataImportConfig(source=str(_problems()), output_dir=str(out), split=SPLIT, seed=seed))
    return files


def _wrong(solution: str, answer: str, rng: random.Random) -> str:
    """A made-up wrong student attempt: the worked solution with a wrong final answer."""
    wrong = str(max(0, int(answer) + rng.choice([-3, -2, -1, 1, 2, 3])))
    body = solution.rsplit("####", 1)[0].rstrip()
    return f"{body.rsplit(chr(10), 1)[0]}\n#### {wrong}" if rng.random() < 0.5 else f"{body}\n#### {wrong}"


def refined_solution(problem: dict[str, Any]) -> str:
    """What the teacher learns to answer the refine prompt with: the trap first, then the worked solution."""
    trap = TRAPS.get((problem.get("meta") or {}).get("template"), GENERIC_TRAP)
    return f"Watch out: {trap}\n{problem['meta']['solution']}"


def teacher_examples(train: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Rationale records with their own prompts: generate prompt -> solution, refine prompt -> re-teaching."""
    from undo_cli.prompts import load_template, problem_variables, render_messages

    generate, refine = load_template("generate"), load_template("refine")
    rng = random.Random(seed)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for p in train:
        by_kind.setdefault((p.get("meta") or {}).get("template", ""), []).append(p)
    records = []
    for i, p in enumerate(train):
        base = {"problem_id": p["id"], "question": p["question"], "answer": p["answer"], "task": "math"}
        records.append({**base, "id": f"{p['id']}/generate", "rationale": p["meta"]["solution"],
                        "prompt_messages": render_messages(generate, **problem_variables(p), examples=[])})
        if i % REFINE_EVERY:
            continue
        # In UNDO the failure comes from val and the target is a similar train question:
        # show a failure on another problem of the same kind, and one more similar failure.
        kin = [q for q in by_kind[(p.get("meta") or {}).get("template", "")] if q["id"] != p["id"]] or [p]
        failed, other = rng.choice(kin), rng.choice(kin)
        messages = render_messages(
            refine, **problem_variables(p), previous_rationales=[p["meta"]["solution"]],
            student_output=_wrong(failed["meta"]["solution"], failed["answer"], rng),
            student_question=failed["question"], student_predicted=None, error_type="wrong_answer",
            similar_failures=[{"id": other["id"], "question": other["question"], "answer": other["answer"],
                               "output": _wrong(other["meta"]["solution"], other["answer"], rng),
                               "predicted": None, "error_type": "wrong_answer"}])
        records.append({**base, "id": f"{p['id']}/refine", "rationale": refined_solution(p),
                        "prompt_messages": messages})
    return records


def build_models(workdir: Path, files: dict[str, Path], seed: int) -> dict[str, Path]:
    """The shared tokenizer, the untrained student base, and the teacher trained with `undo train`."""
    from undo_cli.console import console
    from undo_cli.records import read_records, write_records
    from undo_cli.stages import train as train_stage
    from undo_cli.training.config import TrainConfig
    from undo_cli.tiny import build_tiny_model, train_tokenizer

    models, build = workdir / "models", workdir / "build"
    teacher, student, init = models / "teacher", models / "student", build / "teacher-init"
    if (teacher / train_stage.SUMMARY_FILE).is_file() and (student / "config.json").is_file():
        console.print(f"reusing the models in {models}")
        return {"teacher": teacher, "student": student}

    train = read_records(files["train"], "problem")
    missing = [p["id"] for p in train if not (p.get("meta") or {}).get("solution")]
    if missing:
        raise UndoError(f"{files['train']}: {len(missing)} problems have no meta.solution (e.g. {missing[0]})",
                        hint=f"delete {workdir / 'data'} so the demo writes the shipped problems again")
    examples = teacher_examples(train, seed)
    corpus = [p["question"] + "\n" + p["meta"]["solution"] for p in train]
    corpus += [m["content"] for r in examples[:4] for m in r["prompt_messages"]] + list(TRAPS.values())
    corpus += [" ".join(str(i) for i in range(100))] * 20  # every number below 100 becomes one token
    tokenizer = train_tokenizer(corpus, vocab_size=VOCAB)

    with console.status("building the tiny student and teacher..."):
        build_tiny_model(student, tokenizer=tokenizer, seed=seed, **STUDENT)
        build_tiny_model(init, tokenizer=tokenizer, seed=seed + 1, **TEACHER)
    data = build / "teacher_data.jsonl"
    write_records(data, examples)
    console.rule("[bold]training the tiny teacher (undo train)[/bold]")
    console.print(f"{len(train)} worked solutions behind the generate prompt, {len(examples) - len(train)} of them "
                  "also behind the refine prompt")
    train_stage.run(TrainConfig(student=str(init), data=str(data), output=str(teacher), seed=seed,
                                            resume=True, **TEACHER_TRAINING))
    return {"teacher": teacher, "student": student}


def _check_workdir(workdir: Path, config: DemoConfig) -> None:
    """Refuse what would mix two demos or silently redo work; say what to type instead."""
    import json

    if workdir.exists() and not workdir.is_dir():
        raise UndoError(f"--workdir {workdir}: is a file", hint="name a folder (it is created)")
    state = workdir / STATE_FILE
    if not state.is_file():
        if workdir.is_dir() and any(workdir.iterdir()):
            raise UndoError(f"--workdir {workdir}: not empty and not a demo folder (no {STATE_FILE})",
                            hint="name a new or empty folder: undo demo --workdir undo-demo-2")
        return
    try:
        seed = json.loads(state.read_text(encoding="utf-8")).get("seed")
    except (OSError, ValueError) as exc:
        raise UndoError(f"{state}: unreadable ({exc})", hint=f"delete {workdir} and run undo demo again") from None
    if seed != config.seed:
        raise UndoError(f"{workdir} holds a demo built with --seed {seed}, not {config.seed}",
                        hint=f"use --seed {seed}, or another --workdir for seed {config.seed}")
    if config.resume:
        return
    teacher = workdir / "models" / "teacher"
    interrupted = (workdir / "build").is_dir() and not (teacher / "train_summary.json").is_file()
    if interrupted:
        raise UndoError(f"{workdir}: the teacher's training was interrupted",
                        hint=f"add --resume to continue it from its last checkpoint: undo demo --workdir {workdir} "
                             "--resume")
    if not config.setup_only and (workdir / "runs" / "demo" / "manifest.json").is_file():
        raise UndoError(f"{workdir / 'runs' / 'demo'}: this demo's loop has already run (or was interrupted)",
                        hint=f"--resume continues it (a finished one just reports again): undo demo --workdir "
                             f"{workdir} --resume; or delete {workdir} to start over")


def run(config: DemoConfig) -> dict[str, Any]:
    """Set up (data, tokenizer, models) and, unless setup_only, run the loop and the report."""
    from undo_cli import __version__
    from undo_cli.console import console
    from undo_cli.records import write_json

    started = time.perf_counter()
    workdir = Path(config.workdir)
    _check_workdir(workdir, config)
    console.print(f"[bold]undo demo[/bold] in {workdir}/ — {DISCLAIMER}")
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / STATE_FILE).is_file():
        write_json(workdir / STATE_FILE, {"seed": config.seed, "undo_version": __version__})
    files = write_data(workdir, config.seed)
    models = build_models(workdir, files, config.seed)
    setup_s = time.perf_counter() - started
    result: dict[str, Any] = {"workdir": str(workdir), "data": {k: str(v) for k, v in files.items()},
                              "models": {k: str(v) for k, v in models.items()}, "setup_s": round(setup_s, 1)}
    if config.setup_only:
        console.print(f"set up in {setup_s:.0f} s: data in {workdir / 'data'}, models in {workdir / 'models'}. "
                      "Next, the loop:")
        if workdir.resolve() == Path("undo-demo").resolve():
            console.print("  undo iterate --config examples/run.toml", soft_wrap=True)
        console.print(f"  undo iterate --config {_run_toml()} --teacher {models['teacher']} "
                      f"--student {models['student']} --train-file {files['train']} --val-file {files['val']} "
                      f"--test-file {files['test']} --runs-dir {workdir / 'runs'}", soft_wrap=True)
        return result

    from undo_cli.loop import iterate, report
    from undo_cli.loop.settings import resolve

    flags = {"teacher": str(models["teacher"]), "student": str(models["student"]), "train_file": str(files["train"]),
             "val_file": str(files["val"]), "test_file": str(files["test"]), "runs_dir": str(workdir / "runs"),
             "name": "demo", "seed": config.seed}
    loop_config = resolve(iterate.IterateConfig, str(_run_toml()), flags, [])
    resume = (loop_config.run_dir / "manifest.json").is_file()  # only reachable with --resume (checked above)
    summary = iterate.run(loop_config, resume=resume)
    console.rule("[bold]undo report[/bold]")
    shown = report.run(str(loop_config.run_dir))
    wall = time.perf_counter() - started
    console.print(f"demo finished in {wall:.0f} s (setup {setup_s:.0f} s). {DISCLAIMER}")
    _print_next_steps(workdir, loop_config.run_dir, files, models, config.seed)
    return {**result, "summary": summary, "plot": shown.get("plot"), "wall_s": round(wall, 1)}


def _iterate_args(workdir: Path, files: dict[str, Path], models: dict[str, Path], seed: int) -> list[str]:
    """`undo iterate`'s flags for the demo's loop, as the demo runs it (without --name)."""
    return ["--config", str(_run_toml()), "--teacher", str(models["teacher"]), "--student", str(models["student"]),
            "--train-file", str(files["train"]), "--val-file", str(files["val"]), "--test-file", str(files["test"]),
            "--runs-dir", str(workdir / "runs"), "--seed", str(seed)]


def _print_next_steps(workdir: Path, run_dir: Path, files: dict[str, Path], models: dict[str, Path],
                      seed: int = 0) -> None:
    """What to open and run next: the artifacts are the point, every one is a readable file."""
    from undo_cli.console import console
    from undo_cli.loop.layout import RunLayout
    from undo_cli.prompts import bundled_dir

    layout = RunLayout(run_dir)
    lines = [
        ("the table and plot again", f"undo report {run_dir}"),
        ("the teacher's verified rationales", f"head -n 3 {layout.rationales()}"),
        ("the student's validation errors", f"head -n 3 {layout.errors(0)}"),
        ("the teacher's refinements, with provenance", f"head -n 3 {layout.refined(1)}"),
        ("what every stage did, with timings", f"less {layout.manifest}"),
        ("the same loop as a bash script of stage commands, with the same settings",
         f"bash {shlex.quote(str(bundled_dir('examples') / 'undo_loop.sh'))} "
         + shlex.join(_iterate_args(workdir, files, models, seed) + ["--name", "bash-loop"])),
        ("real models (hub teacher and student, a GPU)", "see README.md, 'Real models' and examples/run-qwen.toml"),
    ]
    console.rule("[bold]next[/bold]")
    for what, command in lines:
        console.print(f"[dim]# {what}[/dim]\n  {command}", soft_wrap=True, highlight=False)


def _run_toml() -> Path:
    """examples/run.toml: the demo runs with the very settings a user reads there."""
    from undo_cli.prompts import bundled_dir

    return bundled_dir("examples") / "run.toml"
