"""The offline tour: tiny models, the shipped arithmetic problems, the whole UNDO loop, in minutes on a CPU.

    undo demo                                  # everything, into ./undo-demo (about two minutes on 2 cores)
    undo demo --workdir /tmp/demo --setup-only # only data + models; then run the loop yourself:
    undo iterate --config examples/run.toml    # (with the default --workdir)
    undo demo --max-iterations 1 --teacher-epochs 4   # a shorter demo (the test suite's)

No network, no GPU, no hub: the models are tiny Llamas on this CPU. The
demo's premise is a weakness to find: the student fails one KIND of problem,
the teacher's first rationales do not teach it, and its refinements do; so a
loop that finds the failing kind in the student's validation errors and
spends its refinements there should beat a random spend of the same budget
(bench/undo_effect.py measures exactly that). The demo builds the premise into
two toy models, says so, and measures what the loop makes of it:

1. **Data.** The 600 shipped word problems (examples/arithmetic.jsonl: a story
   of one or two events, numbers up to 20) are split by `undo data import`
   into DIR/data/{train,val,test}.jsonl (SPLIT). Each has a worked solution
   (`meta.solution`: one line per event, every product written out) and a
   brief one (`meta.brief`): the same, except that a packs event ("He buys 3
   packs with 4 apples in each pack.") skips its product: `After buying 3
   packs of 4, he has 5 + 12 = 17 apples.` (true, but 3 * 4 = 12 is not shown).
   About one problem in six has a packs event (`meta.skill`).
2. **Student.** The shipped student base (examples/student-base, made by
   examples/pretrain_student.py): a 1M-parameter Llama pretrained on every
   fact `a + b = c`, `a - b = c`, `a * b = c` of small numbers and on worked
   stories of one or two events of every kind but packs, then on the packs
   line's pattern in other words ("The crates hold 3 * 4 = 12 apples, so he
   has 5 + 12 = 17 apples."). It knows the products and the worked
   multiply-then-add line; it never saw a packs story. Copied to
   DIR/models/student.
3. **Teacher.** The same base trained *with `undo train` itself*
   (stages/train.py) on the training problems behind the prompts the loop
   sends it (examples/run.toml: prompts/demo-generate.jinja and
   prompts/demo-refine.jinja, short enough for the tiny models' 128-token
   rows): the generate prompt answered with the brief solution, and the refine
   prompt (filled as `undo refine` fills it, with a wrong answer to a problem
   of the same kind) answered with the worked solution. On a problem without a
   packs event the two are the same text: a refinement there changes nothing.
   Its outputs are real sampled generations, verified by the loop like any
   teacher's (`--verify steps`, the default: a false step rejects one,
   whatever its final answer).
4. **The loop.** `undo iterate` with examples/run.toml (teacher through
   generate/refine, student through train/evaluate, all on the `hf` backend),
   then the plot of `undo report`: DIR/runs/demo/report.png.

So one-shot distillation trains the student on brief rationales, which never
show how a packs event is computed; each UNDO round re-teaches the training
problems most like its validation failures with worked ones, within a budget
of targets per round (examples/run.toml [refine] budget). It helps only
where it lands on packs problems.

This simulates UNDO's premise on toy models; it is not evidence that UNDO
helps real models. bench/undo_effect.py measures the loop against one-shot,
a random spend of the same refinement budget and more one-shot samples.

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

STUDENT_BASE = "student-base"  # examples/student-base: the pretrained student (examples/pretrain_student.py)
# The teacher starts from the student base (it knows the facts and the one-operation style) and
# learns the training problems behind the generate and refine prompts.
TEACHER_TRAINING = {"epochs": 30.0, "lr": 1e-3, "batch_size": 8, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
                    "logging_steps": 20, "save_steps": 50, "max_length": 1024}
# 120 training, 300 validation, 180 test problems. The training set is what the teacher writes for and the
# student learns from; validation is where the loop finds its errors and where the paired choice rule
# (loop/choose.py) decides whether a refined student is better. With 90 validation items that rule could not
# see a real gain of a few points (bench/undo_effect.py at 0f51238: the refined students led on validation on
# 8 of 10 seeds, kept on one), so validation and test were enlarged, not the rule loosened (README).
SPLIT = "train=0.2,val=0.5,test=0.3"
# Every packs training problem, and one other problem in REFINE_EVERY, is also shown behind the refine
# prompt: the teacher has to learn the refine prompt's answer (the worked solution) for the kind it
# differs on, and that on every other kind it is the same text; the student base it starts from already
# writes the other kinds' lines.
REFINE_EVERY = 3
SKILL = "packs"  # examples/make_examples.py's SKILL: the kind the student base never saw

DISCLAIMER = ("The demo's models are tiny (1M parameters, on a CPU) and built to show UNDO's premise: "
              "its numbers say nothing about real models.")


@dataclass
class DemoConfig:
    """Everything `undo demo` needs."""

    workdir: str = field(default="undo-demo", metadata={"help": "Folder for data/, models/ and runs/ (created)."})
    resume: bool = field(default=False, metadata={
        "help": "Continue a demo that was interrupted (teacher training or the loop), recomputing nothing finished."})
    seed: int = field(default=0, metadata={"help": "Seed for the split, the teacher's training data and order, and the loop."})
    setup_only: bool = field(default=False, metadata={
        "help": "Stop after writing data/ and models/teacher + models/student; run the loop yourself."})
    teacher_epochs: float = field(default=TEACHER_TRAINING["epochs"], metadata={
        "help": "Epochs of the teacher's training (fewer: a faster, less exact teacher)."})
    max_iterations: int | None = field(default=None, metadata={
        "help": "Refinement rounds of the loop [default: examples/run.toml's]."})

    def __post_init__(self) -> None:
        if self.teacher_epochs <= 0:
            raise UndoError(f"--teacher-epochs {self.teacher_epochs}: must be positive")
        if self.max_iterations is not None and self.max_iterations < 0:
            raise UndoError(f"--max-iterations {self.max_iterations}: must be 0 or more")


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
    """A made-up wrong student attempt: a solution whose last result and final answer are off by a little."""
    right = int(answer)
    wrong = str(max(0, right + rng.choice([-3, -2, -1, 1, 2, 3])))
    body = solution.rsplit("####", 1)[0].rstrip()
    head, _, last = body.rpartition(f"= {right}")  # the last line's result, as a student gets it wrong
    return f"{head}= {wrong}{last}\n#### {wrong}" if head else f"{body}\n#### {wrong}"


def refined_solution(problem: dict[str, Any]) -> str:
    """What the teacher learns to answer the refine prompt with: the worked solution (every product written out)."""
    return problem["meta"]["solution"]


def _teacher_prompts() -> dict[str, str]:
    """The prompt templates examples/run.toml gives the teacher ([generate] and [refine] prompt): the demo teacher
    learns the very prompts the loop will send it."""
    import tomllib

    settings = tomllib.loads(_run_toml().read_text(encoding="utf-8"))
    return {stage: (settings.get(stage) or {}).get("prompt", stage) for stage in ("generate", "refine")}


def teacher_examples(train: list[dict[str, Any]], seed: int, k: int = 0) -> list[dict[str, Any]]:
    """Rationale records with their own prompts: generate prompt -> brief solution, refine prompt -> re-teaching.

    Every training problem gets the first; every packs one and one other in REFINE_EVERY the second. The refine
    prompt is filled as `undo refine` fills it in the loop: the teacher's earlier (brief) solution, a wrong attempt
    at another problem of the same kind (a val failure picked this problem because it looks like it: here one of
    the same skill and as many steps), and `k` more similar failures.
    """
    from undo_cli.prompts import load_template, problem_variables, render_messages

    prompts = _teacher_prompts()
    generate, refine = load_template(prompts["generate"]), load_template(prompts["refine"])
    rng = random.Random(seed)
    by_kind: dict[Any, list[dict[str, Any]]] = {}  # problems of as many steps: the ones a failure looks like
    kind = lambda p: (p["meta"].get("skill"), p["meta"].get("steps"))  # noqa: E731
    for p in train:
        by_kind.setdefault(kind(p), []).append(p)
    records = []
    for i, p in enumerate(train):
        base = {"problem_id": p["id"], "question": p["question"], "answer": p["answer"], "task": "math"}
        brief = p["meta"].get("brief") or p["meta"]["solution"]
        records.append({**base, "id": f"{p['id']}/generate", "rationale": brief,
                        "prompt_messages": render_messages(generate, **problem_variables(p), examples=[])})
        if p["meta"].get("skill") != SKILL and i % REFINE_EVERY:
            continue
        kin = [q for q in by_kind[kind(p)] if q["id"] != p["id"]] or [p]
        failed, others = rng.choice(kin), [rng.choice(kin) for _ in range(k)]
        attempt = _wrong(failed["meta"].get("brief") or failed["meta"]["solution"], failed["answer"], rng)
        messages = render_messages(
            refine, **problem_variables(p), previous_rationales=[brief], student_output=attempt,
            student_question=failed["question"], student_predicted=attempt.rsplit("#### ", 1)[1],
            error_type="wrong_answer",
            similar_failures=[{"id": o["id"], "question": o["question"], "answer": o["answer"],
                               "output": _wrong(o["meta"].get("brief") or o["meta"]["solution"], o["answer"], rng),
                               "predicted": None, "error_type": "wrong_answer"} for o in others])
        records.append({**base, "id": f"{p['id']}/refine", "rationale": refined_solution(p),
                        "prompt_messages": messages})
    return records


def _student_base() -> Path:
    from undo_cli.prompts import bundled_dir

    path = bundled_dir("examples") / STUDENT_BASE
    if not (path / "config.json").is_file():
        raise UndoError(f"{path}: the shipped student base is missing",
                        hint="reinstall undo-cli, or rebuild it: python examples/pretrain_student.py")
    return path


def build_models(workdir: Path, files: dict[str, Path], config: "DemoConfig") -> dict[str, Path]:
    """The student (a copy of the shipped base) and the teacher trained from it with `undo train`."""
    import shutil

    from undo_cli.console import console
    from undo_cli.records import read_records, write_records
    from undo_cli.stages import train as train_stage
    from undo_cli.training.config import TrainConfig

    models, build = workdir / "models", workdir / "build"
    teacher, student = models / "teacher", models / "student"
    if (teacher / train_stage.SUMMARY_FILE).is_file() and (student / "config.json").is_file():
        console.print(f"reusing the models in {models}")
        return {"teacher": teacher, "student": student}

    train = read_records(files["train"], "problem")
    missing = [p["id"] for p in train if not (p.get("meta") or {}).get("solution")]
    if missing:
        raise UndoError(f"{files['train']}: {len(missing)} problems have no meta.solution (e.g. {missing[0]})",
                        hint=f"delete {workdir / 'data'} so the demo writes the shipped problems again")
    if not (student / "config.json").is_file():
        partial = models / "student.partial"  # a copy is never half there under the final name
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(_student_base(), partial)
        partial.rename(student)
    data = build / "teacher_data.jsonl"
    examples = teacher_examples(train, config.seed)
    write_records(data, examples)
    console.rule("[bold]training the tiny teacher (undo train)[/bold]")
    console.print(f"from the student base: {len(train)} brief solutions behind the generate prompt, "
                  f"{len(examples) - len(train)} worked re-teachings behind the refine prompt")
    train_stage.run(TrainConfig(student=str(student), data=str(data), output=str(teacher), seed=config.seed,
                                resume=True, **{**TEACHER_TRAINING, "epochs": config.teacher_epochs}))
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
                        hint=f"add --resume to continue it from its last checkpoint: {resume_command(config)}")
    if not config.setup_only and (workdir / "runs" / "demo" / "manifest.json").is_file():
        raise UndoError(f"{workdir / 'runs' / 'demo'}: this demo's loop has already run (or was interrupted)",
                        hint=f"--resume continues it (a finished one just reports again): {resume_command(config)}; "
                             f"or delete {workdir} to start over")


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
    try:
        models = build_models(workdir, files, config)
    except KeyboardInterrupt:  # Ctrl-C in the teacher's training: it saved a checkpoint to continue from
        from rich.markup import escape

        console.print(f"[yellow]{escape(str(workdir))}: interrupted; what finished is kept. Continue with:[/yellow] "
                      f"{escape(resume_command(config))}", highlight=False, soft_wrap=True)
        raise
    setup_s = time.perf_counter() - started
    result: dict[str, Any] = {"workdir": str(workdir), "data": {k: str(v) for k, v in files.items()},
                              "models": {k: str(v) for k, v in models.items()}, "setup_s": round(setup_s, 1)}
    if config.setup_only:
        console.print(f"set up in {setup_s:.0f} s: data in {workdir / 'data'}, models in {workdir / 'models'}. "
                      "Next, the loop:")
        here = Path("examples/run.toml")  # the short form runs only from where both relative paths hold
        if workdir.resolve() == Path("undo-demo").resolve() and here.is_file() and here.resolve() == _run_toml().resolve():
            console.print("  undo iterate --config examples/run.toml", soft_wrap=True)
        console.print("  " + shlex.join(["undo", "iterate", *_iterate_args(workdir, files, models, config.seed)]),
                      soft_wrap=True, markup=False, highlight=False)
        return result

    from undo_cli.loop import iterate, report, run_state
    from undo_cli.loop.config import IterateConfig
    from undo_cli.loop.layout import RunLayout
    from undo_cli.loop.settings import resolve

    flags = {"teacher": str(models["teacher"]), "student": str(models["student"]), "train_file": str(files["train"]),
             "val_file": str(files["val"]), "test_file": str(files["test"]), "runs_dir": str(workdir / "runs"),
             "name": "demo", "seed": config.seed}
    if config.max_iterations is not None:
        flags["max_iterations"] = config.max_iterations
    loop_config = resolve(IterateConfig, str(_run_toml()), flags, [])
    resume = (loop_config.run_dir / "manifest.json").is_file()  # only reachable with --resume (checked above)
    # The commands iterate prints (resume, more rounds) are `undo iterate` with the demo's own arguments.
    command = _iterate_args(workdir, files, models, config.seed) + ["--name", "demo"]
    if config.max_iterations is not None:
        command += ["--max-iterations", str(config.max_iterations)]
    summary = iterate.run(loop_config, resume=resume, command=command, resume_with=resume_command(config))
    # iterate has just printed the table and the verdict: `undo report` adds what changed and the plot.
    console.rule("[bold]undo report[/bold] (the plot; the table above is its table)")
    state = run_state.collect(loop_config.run_dir)
    report.print_transitions(state)
    plotted = report.plot(state, RunLayout(loop_config.run_dir).report_plot)
    if plotted is not None:
        console.print(f"plot written to {plotted}", highlight=False, markup=False)
    wall = time.perf_counter() - started
    console.print(f"demo finished in {wall:.0f} s (setup {setup_s:.0f} s). {DISCLAIMER}")
    _print_next_steps(workdir, loop_config.run_dir, files, models, config.seed)
    return {**result, "summary": summary, "plot": str(plotted) if plotted else None, "wall_s": round(wall, 1)}


def resume_command(config: DemoConfig) -> str:
    """`undo demo ... --resume` with this demo's own flags: what continues it (README, "On a fresh machine")."""
    from undo_cli.fields import to_flags

    return "undo demo " + shlex.join([*to_flags(config, skip=("resume", "setup_only")), "--resume"])


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
    ]
    console.rule("[bold]next[/bold]")
    for what, command in lines:  # each command runs as printed (tests/test_demo.py pastes them)
        console.print(f"[dim]# {what}[/dim]\n  {command}", soft_wrap=True, highlight=False)
    console.print("[dim]# real models (hub teacher and student, a GPU): README.md, 'Real models', and "
                  "examples/run-qwen.toml[/dim]", soft_wrap=True, highlight=False)


def _run_toml() -> Path:
    """examples/run.toml: the demo runs with the very settings a user reads there."""
    from undo_cli.prompts import bundled_dir

    return bundled_dir("examples") / "run.toml"
