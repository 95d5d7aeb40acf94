"""Step 1 of the UNDO loop: the teacher writes worked solutions, and only verified ones are kept.

    undo generate --teacher Qwen/Qwen2.5-7B-Instruct --input train.jsonl --output rationales.jsonl
    undo generate --teacher my-model --backend openai --base-url http://127.0.0.1:8000/v1 \\
        --input train.jsonl --output rationales.jsonl --n 4 --temperature 0.7 --concurrency 32
    undo generate --teacher out/teacher --backend vllm --input train.jsonl --output - | head

For every problem the teacher gets the prompt template (prompts/generate.jinja
by default: system + user, optional few-shot examples) and writes `--n`
rationales. Each one is scored with the one scorer (`undo_cli.scoring`) against
the gold answer. With `--keep correct` (the default, rejection sampling as in
the UNDO paper) only verified rationales go to the output; the others go to
`<output stem>.rejected.jsonl` next to it, where a person can read what the
teacher got wrong. Problems with no verified rationale are reported (count and
a few ids) and simply have no line in the output: they are left out of training.

One output line per kept sample, shaped as a `rationale` (docs/artifacts.md):

    {"id": "gsm8k-17#0", "problem_id": "gsm8k-17", "question": ..., "answer": "42", "task": "math",
     "rationale": "... #### 42", "predicted": "42", "correct": true, "teacher": "Qwen/...",
     "backend": "hf", "sample": 0, "usage": {"prompt_tokens": 91, "completion_tokens": 130},
     "template": "generate", "finish_reason": "stop", "iteration": 0, "verify": "strict", "reject_reason": null}

`reject_reason` says why a sample does not verify: `no_answer`, `wrong_answer`
or, with `--verify steps` (strict, and every arithmetic statement in the text
true: undo_cli/steps.py), `false_step`, with `step_error` quoting the first false
statement as written. The summary counts the samples that did not verify by
reason (`rejected_by_reason`).

plus, with `--logprobs K`, for offline white-box distillation: `teacher_logprobs`
(one [token id, log-prob, [[id, log-prob], ...]] per generated token) and
`teacher_offsets` (each generated token's [start, end] UTF-8 byte span in
`rationale`, from the teacher's tokenizer: what a student with another tokenizer
aligns on, docs/objectives.md; null when that tokenizer does not load here).

Sharding: `--shard K/N` generates for shard K of N only (a stable hash of the
problem id); `undo merge rationales.jsonl shards/*.jsonl` joins the shards into
the file one run writes (stages/shards.py).

Resume: re-run the same command and finished problems are skipped (a problem
is finished when any of its samples is in the output or in the rejected
sidecar). `<output stem>.run.json` records what produced the output (teacher,
backend, template, sampling, input digest); a re-run with other settings is
refused with the keys that differ, and `--overwrite` starts over. A
whitespace-only rationale is never kept, even with `--keep all` (train could
not learn from it): it goes to the rejected sidecar. All the batching, resume and progress logic is `stages/generation_loop.py`,
shared with `undo evaluate` and `undo refine`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.console import console, warn
from undo_cli.economy.cascade import CascadeOptions
from undo_cli.economy.options import TeacherEconomyOptions
from undo_cli.errors import RecordError, SettingError, UndoError, ref
from undo_cli.backends import SERVED
from undo_cli.stages.options import RUNTIME, TEACHER_VERIFY, GenerationOptions, check_limit, check_output_is_new, verify_field
from undo_cli.stages.spec import StageSpec, keep_keys

KEEP = {"correct": "only verified rationales go to the output", "all": "every sample does"}


@dataclass
class GenerateConfig(GenerationOptions, TeacherEconomyOptions, CascadeOptions):
    """Everything `undo generate` needs (each field is one CLI flag; the backend and sampling ones are inherited)."""

    teacher: str = field(metadata={"help": "The teacher: a model folder, a hub name, a .gguf file, or the model name on the server."})
    input: str = field(metadata={"input": True, "short": "-i", "help": "Problems JSONL (id, question, answer[, task, choices]); '-' reads stdin."})
    output: str = field(default="-", metadata={**RUNTIME, "short": "-o", "help": "Rationales JSONL; resumable unless '-' (stdout)."})
    n: int = field(default=1, metadata={"help": "Rationales sampled per problem (rejection sampling when > 1)."})
    keep: str = field(default="correct", metadata={"choices": KEEP, "help": "correct: keep only verified rationales; all: keep every sample."})
    prompt: str = field(default="generate", metadata={"help": "Prompt template: a name in prompts/ or a .jinja file."})
    fewshot: str | None = field(default=None, metadata={"input": True, "help": "JSONL of {question, rationale} few-shot examples for the template."})
    logprobs: int | None = field(default=None, metadata={"help": "Record the teacher's top-K log-probs per token (1-20)."})
    iteration: int | None = field(default=None, metadata={"help": "UNDO iteration number recorded on each line (set by `undo iterate`)."})
    overwrite: bool = field(default=False, metadata={**RUNTIME,
        "help": "Start over: replace an existing --output (and its sidecars) instead of resuming it."})
    verify: str = verify_field(TEACHER_VERIFY, "strict: a rationale verifies only with an explicit final answer "
                               "(#### x, \\boxed{x}, 'The answer is x'); flexible: the last number may count too; "
                               "steps (the default): strict, and every arithmetic statement in it is true (6 * 4 = 24).")
    limit: int | None = field(default=None, metadata={"help": "Only the first N problems of --input (a quick try)."})

    def __post_init__(self) -> None:
        if self.n < 1:
            raise SettingError("n", self.n, "must be at least 1")
        self.check_generation_options(n=self.n)  # with keep and verify's choices
        check_limit(self.limit)
        if self.backend not in SERVED:  # on a server the name is the server's, not a folder
            from undo_cli.model_refs import check_model_ref

            check_model_ref(self.teacher, ref("teacher"))
        self.check_economy_options()
        self.check_cascade_options()
        if self.logprobs is not None and not 1 <= self.logprobs <= 20:
            raise SettingError("logprobs", self.logprobs, "must be between 1 and 20",
                               hint="OpenAI-compatible servers return at most 20 alternatives per token")
        check_output_is_new(self.output, {"input": self.input}, hint="write rationales to a new file")

    def backend_config(self):
        return super().backend_config(self.teacher)

    def sampling(self):
        return super().sampling(n=self.n, logprobs=self.logprobs)


def read_fewshot(path: str) -> list[dict[str, str]]:
    """Few-shot examples: one {"question": ..., "rationale": ...} object per line."""
    from undo_cli.records import not_valid_json, text_lines

    p = Path(path)
    if not p.is_file():
        raise UndoError(f"--fewshot {path}: no such file", hint="a JSONL file of {\"question\", \"rationale\"} lines")
    examples = []
    for lineno, line in enumerate(text_lines(p), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(path, lineno, not_valid_json(exc)) from None
        for name in ("question", "rationale"):
            if not isinstance(row, dict) or not isinstance(row.get(name), str):
                raise RecordError(path, lineno, "missing or not text", field=name,
                                  hint="each few-shot line is {\"question\": \"...\", \"rationale\": \"... #### 42\"}")
        examples.append({"question": row["question"], "rationale": row["rationale"]})
    return examples


def build_items(problems: list[dict[str, Any]], template: str, fewshot: list[dict[str, str]]):
    """One work item per problem: the rendered prompt plus the problem itself."""
    from undo_cli.prompts import load_template, problem_variables, render_messages
    from undo_cli.stages.generation_loop import WorkItem

    tmpl = load_template(template)
    return [WorkItem(key=p["id"], messages=render_messages(tmpl, **problem_variables(p), examples=fewshot), data=p,
                     tags={"task": p.get("task") or "math"}) for p in problems]


def make_record_builder(config: GenerateConfig, backend_name: str):
    """`make_records` for the generation loop: completions of one problem -> scored rationale records."""
    from undo_cli.prompts import template_name
    from undo_cli.scoring import score, verdict_fields

    template = template_name(config.prompt)
    offsets = teacher_offsets_maker(config) if config.logprobs else None

    def make_records(item, completions) -> list[dict[str, Any]]:
        problem = item.data
        task = problem.get("task") or "math"
        records = []
        for sample, c in enumerate(completions):
            verdict = score(c.text, problem["answer"], task, problem.get("choices"), config.verify)
            record = {
                "id": f"{problem['id']}#{sample}",
                "problem_id": problem["id"],
                "question": problem["question"],
                "answer": problem["answer"],
                "task": task,
                **({"choices": problem["choices"]} if problem.get("choices") else {}),
                "rationale": c.text,
                "predicted": verdict.predicted,
                "correct": verdict.correct,
                "verify": config.verify,
                **verdict_fields(verdict),  # reject_reason (null when verified), step_error with --verify steps
                "teacher": config.teacher,
                "backend": backend_name,
                "sample": sample,
                "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens},
                "template": template,
                "finish_reason": c.finish_reason,
                **({"iteration": config.iteration} if config.iteration is not None else {}),
                **{k: problem[k] for k in ("source", "meta") if k in problem},
            }
            if config.logprobs:
                record["teacher_logprobs"] = [t.to_json() for t in c.logprobs] if c.logprobs is not None else None
                record["teacher_offsets"] = offsets(c)
            records.append(record)
        return records

    return make_records


def teacher_offsets_maker(config: GenerateConfig):
    """completion -> [[start, end], ...] UTF-8 byte spans of its tokens in its text, or None.

    The teacher's tokenizer is loaded once, on first use (only the tokenizer); where it does not load (a
    served model known here only by its name) the offsets are null, with one warning: such records serve
    a student with the same tokenizer, not one with another (docs/objectives.md).
    """
    state: dict[str, Any] = {}

    def offsets(completion) -> list[list[int]] | None:
        if "table" not in state:
            from undo_cli.models import load_pretrained
            from undo_cli.tokenization import TokenBytes

            try:
                state["table"] = TokenBytes.of(load_pretrained("tokenizer", config.teacher, flag="--teacher",
                                                               trust_remote_code=config.trust_remote_code))
            except UndoError as exc:
                state["table"] = None
                warn(f"teacher_offsets are null: the teacher's tokenizer does not load here ({exc.message}); a "
                     "student with another tokenizer cannot align these records")
        if state["table"] is None or completion.logprobs is None:
            return None
        from undo_cli.tokenization import byte_offsets, cover

        text = completion.text.encode("utf-8")
        pieces = cover(state["table"].pieces([t.token_id for t in completion.logprobs]), text)
        return None if pieces is None else byte_offsets(pieces, len(text))

    return offsets


def work_items(config: GenerateConfig) -> tuple[list[dict[str, Any]], list[dict[str, str]], list, list[dict[str, Any]]]:
    """(problems, few-shot examples, work items, every problem of --input): what `run` sends the teacher, in
    input order (the problems and items are the first --limit)."""
    from undo_cli.records import read_records

    every = read_records(config.input, "problem")
    problems = every if config.limit is None else every[: config.limit]
    fewshot = read_fewshot(config.fewshot) if config.fewshot else []
    return problems, fewshot, build_items(problems, config.prompt, fewshot), every


def run(config: GenerateConfig) -> dict[str, Any]:
    """Generate, verify and keep rationales; prints the summary table and returns it."""
    from undo_cli.records import read_records
    from undo_cli.records.sidecars import can_read_back
    from undo_cli.scoring import count_reasons
    from undo_cli.stages.generation_loop import Generation, digest, explain_limit, print_summary

    problems, fewshot, items, every = work_items(config)
    if config.keep == "correct":
        keep = lambda r: r["correct"] and bool(r["rationale"].strip())  # noqa: E731
    else:  # `all` still drops empty text: it teaches nothing, and train would have to skip it
        keep = lambda r: bool(r["rationale"].strip())  # noqa: E731
    generation = Generation(SPEC, config, items, make_record_builder(config, config.backend), keep=keep,
                            inputs={"input": digest(problems), "fewshot": digest(fewshot) if fewshot else None},
                            explain=explain_limit(every, config.limit, problems))
    summary = generation.run()
    summary["keep"] = config.keep
    if can_read_back(config.output):  # the whole output and sidecar, so a resumed run reports what one run would
        summary["rejected_by_reason"] = count_reasons(
            r for path in (config.output, summary.get("rejected_output")) if path
            for r in read_records(path, "rationale", allow_empty=True))
    if config.keep == "correct":
        mine = set(generation.keys)  # with --shard K/N only this shard's problems can be missing here
        _report_unverified(config, [p for p in problems if p["id"] in mine], summary)
    print_summary(summary, title=f"undo generate ({config.backend}: {config.teacher})")
    return summary


def item_keys(config: GenerateConfig) -> list[str]:
    """The work items' keys in run order (problem ids, input order): how `undo merge` orders shards."""
    from undo_cli.stages.shards import ids_of

    ids = ids_of(config.input)
    return ids if config.limit is None else ids[: config.limit]


def _report_unverified(config: GenerateConfig, problems: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Count the problems with no verified rationale in the whole output (this run and earlier ones)."""
    from undo_cli.records import read_records
    from undo_cli.records.sidecars import can_read_back

    if can_read_back(config.output):
        kept = {r["problem_id"] for r in read_records(config.output, "rationale", allow_empty=True)}
        left = set(summary.get("left_by_budget_ids") or [])  # not done yet (budget): not "unverified"
        missing = [p["id"] for p in problems if p["id"] not in kept and p["id"] not in left]
        count = len(missing)
    else:  # stdout: nothing to re-read, and nothing was resumed either; this run's count is the count
        missing, count = summary["without_kept_ids"], summary["questions_without_kept"]
    summary["questions_without_kept"] = count
    summary["without_kept_ids"] = missing[:10]
    summary["extra_rows"] = [("questions with no verified rationale", count), *summary.get("extra_rows", [])]
    if count:
        shown = ", ".join(missing[:5]) + (", ..." if count > 5 else "")
        where = f" (their samples are in {summary['rejected_output']})" if summary.get("rejected_output") else ""
        warn(f"{count} of {len(problems)} questions got no verified rationale and are left out: {shown}{where}. "
             "More samples (--n 4 --temperature 0.7) or a stronger teacher help.")
    elif problems:
        console.print("[green]every question has at least one verified rationale[/green]")


def merged_summary(config: GenerateConfig, merged: dict[str, Any]) -> dict[str, Any]:
    """The summary of a generate run whose shards were merged (`--launcher slurm`), read from the merged files.

    Streamed: at a million problems the merged rationales are gigabytes; only counts and ids are kept."""
    from undo_cli.records import iter_records

    with_kept: set[str] = set()
    kept = verified = 0
    for r in iter_records(config.output, None, allow_empty=True):
        with_kept.add(r["problem_id"])
        kept += 1
        verified += bool(r.get("correct"))
    questions = without = 0
    for p in iter_records(config.input, None):
        questions += 1
        without += p["id"] not in with_kept
    return {"questions": questions, "kept_total": kept, "rejected": merged.get("rejected", 0), "verified": verified,
            "questions_without_kept": without}


SPEC = StageSpec(
    name="generate", config=GenerateConfig, run=run, records="rationale", key="problem_id", shard_key="problem_id",
    item_keys=item_keys, merged_summary=merged_summary, teacher=True, heavy=True,
    keep=keep_keys("questions", "already_done", "samples", "kept_total", "rejected", "rejected_by_reason", "verified",
                   "verified_pct", "questions_without_kept", "tokens_in", "tokens_out", "wall_s", "teacher_usage",
                   "budget", "left_by_budget", "cascade"))
