"""Step 3 of the UNDO loop: the student answers held-out questions, and every answer is scored.

    undo evaluate --model out/student --input val.jsonl --output out/val/predictions.jsonl
    undo evaluate --model Qwen/Qwen2.5-1.5B-Instruct --adapter out/lora --input val.jsonl --output preds.jsonl
    undo evaluate --model student --backend openai --base-url http://127.0.0.1:8000/v1 --input val.jsonl --output -

The student sees each question through the `student` template
(prompts/student.jinja, via `prompts.student_messages`): the very same text
`undo train` puts in front of every rationale. If evaluation formatted the
question differently from training, the student would be tested on a prompt it
has never seen and the accuracy would measure the formatting, not the
distillation. Decoding is greedy by default (--temperature 0), so a run is
reproducible and two iterations are compared on equal terms.

One line per problem, shaped as a `prediction` (docs/artifacts.md), keyed by
the problem id so later stages can join on it:

    {"id": "val-3", "question": ..., "answer": "18", "task": "math", "output": "... #### 16",
     "predicted": "16", "correct": false, "finish_reason": "stop", "model": "out/student",
     "usage": {"prompt_tokens": 52, "completion_tokens": 87}}

`finish_reason` is kept because a student that runs out of tokens fails for a
different reason than one that reasons wrongly; `undo collect-errors` tells
them apart.

After generating, the stage scores the whole output (this run and any earlier
run it resumed) and writes the metrics beside it, named after it
(`preds.metrics.json` for `preds.jsonl`, so two evaluations in one folder never
overwrite each other's), atomically: accuracy, count, correct, per-task
accuracy, answers not extracted, truncated. With `--output -` predictions
stream to stdout for a pipe, and metrics go to a file only when `--metrics`
names one. `preds.run.json` records what produced the predictions (model,
adapter, backend, template, sampling, input digest): re-running into the same
output with another model is refused (`--overwrite` starts over) instead of
reporting the old model's accuracy under the new name. Batching, resume (a killed run loses at most
the batch in flight) and the progress bar are the shared `stages/generation_loop.py`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.backends.stopping import CUT_SHORT
from undo_cli.errors import UndoError, ref
from undo_cli.stages.options import (RUNTIME, EXTRACTIONS, GenerationOptions, check_limit, check_output_is_new,
                                     verify_field)
from undo_cli.stages.spec import StageSpec


@dataclass
class EvaluateConfig(GenerationOptions):
    """Everything `undo evaluate` needs (each field is one CLI flag; the backend and sampling ones are inherited)."""

    model: str = field(metadata={"help": "The student: a model folder (what `undo train` writes), a hub name, a .gguf file, or the model name on the server."})
    input: str = field(metadata={"input": True, "short": "-i", "help": "Problems JSONL (id, question, answer[, task, choices]); '-' reads stdin."})
    output: str = field(default="-", metadata={**RUNTIME, "short": "-o", "help": "Predictions JSONL; resumable unless '-' (stdout)."})
    adapter: str | None = field(default=None, metadata={"help": "hf backend: a LoRA adapter folder applied on top of --model."})
    prompt: str = field(default="student", metadata={"help": "Student template: the one `undo train` used (default 'student')."})
    metrics: str | None = field(default=None, metadata={**RUNTIME,
        "help": "Where to write the metrics JSON (default: <output stem>.metrics.json beside --output; none for '-')."})
    overwrite: bool = field(default=False, metadata={**RUNTIME,
        "help": "Start over: replace an existing --output (and its sidecars) instead of resuming it."})
    verify: str = verify_field("strict", "Which extraction sets `correct` and `accuracy` (both accuracies are reported): "
                                         "strict: only an explicit final answer (#### x, \\boxed{x}, 'The answer is "
                                         "x'); flexible: also the last number.", choices=EXTRACTIONS)
    limit: int | None = field(default=None, metadata={"help": "Only the first N problems of --input (a quick try)."})
    training_format: bool = field(default=True, metadata={
        "help": "Prompt the model the way it was trained, as `undo train` recorded in its folder (undo_training.json: "
                "a template, or the question alone for {\"messages\"} data); --no-training-format: always --prompt."})

    def __post_init__(self) -> None:
        if self.verify == "steps":
            raise UndoError(f"{ref('verify')} steps is for the teacher's rationales (undo generate/refine); a "
                            "student's accuracy is read strict or flexible", setting="verify",
                            hint="to see which predictions have false arithmetic steps: "
                                 "undo score PREDICTIONS.jsonl --verify steps")
        self.check_generation_options()  # with verify's choices
        check_limit(self.limit)
        if self.backend != "openai":  # on a server the name is the server's, not a folder
            from undo_cli.model_refs import check_model_ref

            check_model_ref(self.model, ref("model"))
        if self.adapter and self.backend != "hf":
            raise UndoError(f"{ref('adapter')} is applied by the hf backend, not '{self.backend}'", setting="adapter",
                            hint=f"use {ref('backend')} hf, or merge the adapter and serve the merged model")
        if self.adapter and not Path(self.adapter).is_dir():
            raise UndoError(f"{ref('adapter')} {self.adapter}: no such folder", setting="adapter",
                            hint="pass the folder `undo train --lora` wrote (it holds adapter_config.json)")
        check_output_is_new(self.output, {"input": self.input}, hint="write predictions to a new file")
        if self.metrics:
            check_output_is_new(self.metrics, {"input": self.input, ref("output"): self.output},
                                hint="write metrics to a new file", flag=ref("metrics"))

    @property
    def metrics_path(self) -> str | None:
        if self.metrics:
            return self.metrics
        from undo_cli.records.sidecars import METRICS, sidecar_path

        return sidecar_path(self.output, METRICS)

    def backend_config(self):
        return super().backend_config(self.model, adapter=self.adapter)

    # sampling(): the inherited one, one answer per question (n=1).


def make_record_builder(config: EvaluateConfig, sink: list[dict[str, Any]] | None = None):
    """`make_records` for the generation loop: the student's completion of one problem -> a scored prediction."""
    from undo_cli.scoring import score_both

    def make_records(item, completions) -> list[dict[str, Any]]:
        problem, c = item.data, completions[0]
        task = problem.get("task") or "math"
        both = score_both(c.text, problem["answer"], task, problem.get("choices"))
        verdict = both[config.verify]
        record = {
            "id": problem["id"],
            "question": problem["question"],
            "answer": problem["answer"],
            "task": task,
            **({"choices": problem["choices"]} if problem.get("choices") else {}),
            "output": c.text,
            "predicted": verdict.predicted,
            "correct": verdict.correct,
            "verify": config.verify,
            # Both extractions, so one prediction file gives both accuracies (lm-evaluation-harness reports
            # GSM8K as strict-match and flexible-extract).
            "scores": {mode: {"predicted": s.predicted, "correct": s.correct} for mode, s in both.items()},
            "finish_reason": c.finish_reason,
            "model": config.model,
            **({"adapter": config.adapter} if config.adapter else {}),
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens},
            **{k: problem[k] for k in ("source", "meta") if k in problem},
        }
        if sink is not None:
            sink.append(record)
        return [record]

    return make_records


def _verdict(prediction: dict[str, Any], mode: str) -> dict[str, Any]:
    """{predicted, correct} of one extraction; a file without `scores` (older, or hand-made) has only its own."""
    scores = prediction.get("scores")
    if isinstance(scores, dict) and isinstance(scores.get(mode), dict):
        return scores[mode]
    return {"predicted": prediction.get("predicted"), "correct": bool(prediction.get("correct"))}


def compute_metrics(predictions: list[dict[str, Any]], verify: str = "strict") -> dict[str, Any]:
    """Accuracy overall and per task, for both extractions, plus the two failure counts worth watching.

    `accuracy`/`correct`/`no_answer` follow `verify` (what the records' `correct` says);
    `accuracy_strict`/`accuracy_flexible` (and their `correct_`/`no_answer_` twins) give both.
    The classes are those of `undo collect-errors` (`collect_errors.classify`), so the two
    commands count the same predictions the same way:
    `truncated`: outputs cut by --max-tokens (rationales too long for the budget) or in a degenerate
    repetition (`repetition`, --repetition-cut), right or wrong;
    `no_answer`: complete outputs the scorer could extract no answer from (format not learned yet).
    """
    from undo_cli.stages.collect_errors import classify

    modes = ("strict", "flexible")
    totals: Counter[str] = Counter()
    cut: Counter[str] = Counter()
    looped = 0
    hits = {m: Counter() for m in modes}
    empty = {m: Counter() for m in modes}
    for p in predictions:
        task = p.get("task") or "math"
        totals[task] += 1
        cut[task] += p.get("finish_reason") in CUT_SHORT
        looped += p.get("finish_reason") == "repetition"
        for m in modes:
            v = _verdict(p, m)
            hits[m][task] += bool(v.get("correct"))
            empty[m][task] += classify({**p, **v}) == "no_answer"
    n = sum(totals.values())
    out: dict[str, Any] = {}
    for m in modes:
        k = sum(hits[m].values())
        out.update({f"accuracy_{m}": k / n if n else 0.0, f"correct_{m}": k, f"no_answer_{m}": sum(empty[m].values())})
    by_task = {}
    for t in sorted(totals):
        row = {"count": totals[t], "truncated": cut[t]}
        for m in modes:
            row.update({f"correct_{m}": hits[m][t], f"accuracy_{m}": hits[m][t] / totals[t],
                        f"no_answer_{m}": empty[m][t]})
        row.update(correct=row[f"correct_{verify}"], accuracy=row[f"accuracy_{verify}"],
                   no_answer=row[f"no_answer_{verify}"])
        by_task[t] = row
    return {
        "verify": verify,
        "accuracy": out[f"accuracy_{verify}"],
        "count": n,
        "correct": out[f"correct_{verify}"],
        "no_answer": out[f"no_answer_{verify}"],
        "truncated": sum(cut.values()),
        "repetition": looped,  # of the truncated: cut in a degenerate repetition (--repetition-cut)
        **out,
        "by_task": by_task,
    }


def run(config: EvaluateConfig) -> dict[str, Any]:
    """Answer, score, write predictions and <stem>.metrics.json; prints two tables and returns the summary."""
    from undo_cli.records import check_output_path, is_stream, read_records, write_json
    from undo_cli.stages.generation_loop import Generation, WorkItem, digest, explain_limit, print_summary

    every = read_records(config.input, "problem")
    problems = every if config.limit is None else every[: config.limit]
    messages_for, template = prompt_for(config)
    items = [WorkItem(key=p["id"], messages=messages_for(p), data=p) for p in problems]
    if config.metrics_path:  # before any work: a metrics path under a file must not fail after an hour
        check_output_path(config.metrics_path, "--metrics")
    stream = is_stream(config.output)
    streamed: list[dict[str, Any]] = []  # what went to a stream, which is never read back
    summary = Generation(SPEC, config, items, make_record_builder(config, streamed if stream else None),
                         inputs={"input": digest(problems)}, explain=explain_limit(every, config.limit, problems)).run()
    # Score the whole file, not just this run: a resumed run must report the same
    # metrics an uninterrupted one would. Only ids of this input count.
    if stream:
        predictions = streamed
    else:
        wanted = {p["id"] for p in problems}
        predictions = [r for r in read_records(config.output, "prediction", allow_empty=True) if r["id"] in wanted]
    metrics = build_metrics(config, compute_metrics(predictions, config.verify), template)
    if config.shard:  # a shard's partial metrics; `undo merge` recomputes the whole run's
        metrics["shard"] = config.shard
    if config.metrics_path:
        write_json(config.metrics_path, metrics)
    summary["metrics"] = metrics
    summary["metrics_path"] = config.metrics_path
    summary["extra_rows"] = [(f"accuracy, {m}" + (" *" if m == config.verify else ""),
                              f"{metrics[f'correct_{m}']} / {metrics['count']} ({metrics[f'accuracy_{m}']:.1%})")
                             for m in ("strict", "flexible")]
    print_summary(summary, title=f"undo evaluate ({config.backend}: {config.model})")
    _print_metrics(metrics, config.metrics_path)
    return summary


def prompt_for(config: EvaluateConfig):
    """(problem -> messages, the format's name): the prompt the model was trained on, as its folder records it.

    `undo train` writes undo_training.json into the model folder (prompts.prompt_format). A model
    trained through the student template is asked through that template; one trained on
    `{"messages"}` or `{"prompt", "completion"}` data, whose prompts were the question alone, is asked
    the question alone. A model trained on prompts of its own (or a mixture) cannot be asked the same
    way about new questions: evaluated through --prompt, with a warning, as is any mismatch under
    --no-training-format. A folder without the file (a hub model, an older run) gets --prompt.
    """
    from undo_cli.console import console, warn
    from undo_cli.prompts import (TRAINING_FORMAT, question_messages, read_training_format, student_messages,
                                  template_name)

    folder = config.adapter or config.model
    fmt = read_training_format(folder) if config.backend != "openai" or config.adapter else None
    as_asked = (lambda p: student_messages(p, config.prompt)), template_name(config.prompt)
    if fmt is None:
        return as_asked
    where = f"{Path(folder) / TRAINING_FORMAT}"
    kind = fmt["kind"]
    if kind == "template" and template_name(str(fmt.get("template"))) == template_name(config.prompt):
        return as_asked
    if kind == "template":
        trained = str(fmt["template"])
        if config.training_format:
            console.print(f"{config.model} was trained with the prompt template '{trained}' ({where}): evaluating "
                          "with it (--no-training-format to use --prompt instead)", markup=False, soft_wrap=True)
            return (lambda p: student_messages(p, trained)), template_name(trained)
        warn(f"{config.model} was trained with the prompt template '{trained}' ({where}), not --prompt "
             f"'{config.prompt}': it is evaluated on a prompt it never saw")
        return as_asked
    if kind == "question":
        system = fmt.get("system")
        if config.training_format:
            console.print(f"{config.model} was trained on {{\"messages\"}}-style data whose prompt is the question "
                          f"alone{' after a fixed system message' if system else ''} ({where}): evaluating the same "
                          "way, not through the student template", markup=False, soft_wrap=True)
            return (lambda p: question_messages(p, system)), "question" + ("+system" if system else "")
        warn(f"{config.model} was trained with the question alone as its prompt ({where}), not through --prompt "
             f"'{config.prompt}': it is evaluated on a prompt it never saw")
        return as_asked
    warn(f"{config.model} was trained on prompts of its own ({where}: "
         f"{'some records carried their own prompt' if kind == 'mixed' else 'each record carried its own prompt'}), "
         f"which `undo evaluate` cannot rebuild for new questions: evaluating through --prompt '{config.prompt}', which "
         "it never saw. For a comparable accuracy, train on rationales or on problems with --rationale-field")
    return as_asked


def build_metrics(config: EvaluateConfig, scores: dict[str, Any], template: str | None = None) -> dict[str, Any]:
    """The metrics file: `compute_metrics` scores plus what produced them (`template`: the prompt format used)."""
    from undo_cli.prompts import template_name

    return {
        **scores,
        "model": config.model,
        **({"adapter": config.adapter} if config.adapter else {}),
        "backend": config.backend,
        "template": template or template_name(config.prompt),
        "input": config.input,
        "predictions": config.output,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
    }


def item_keys(config: EvaluateConfig) -> list[str]:
    """Prediction ids in run order (input order): how `undo merge` orders shards."""
    from undo_cli.stages.shards import ids_of

    ids = ids_of(config.input)
    return ids if config.limit is None else ids[: config.limit]


def merge_consumer(config: EvaluateConfig):
    """`undo merge` of evaluate shards: metrics recomputed from the merged predictions (never averaged from the
    shards'), counted in the merge's own pass over them, so nothing is held in memory."""
    return lambda records: compute_metrics(records, config.verify)


def after_merge(config: EvaluateConfig, merge_config, summary: dict[str, Any], scores: dict[str, Any]) -> None:
    """Write the metrics beside the merged predictions (or to `undo merge --metrics`)."""
    from undo_cli.records import write_json

    metrics = build_metrics(config, scores)
    path = merge_config.metrics or config.metrics_path
    write_json(path, metrics)
    summary["metrics"] = metrics
    summary["metrics_path"] = path
    _print_metrics(metrics, path)


def _print_metrics(metrics: dict[str, Any], path: str | None) -> None:
    from rich.table import Table

    from undo_cli.console import compact, console, print_stage_summary

    v = metrics["verify"]
    # Both accuracies (lm-evaluation-harness's strict-match / flexible-extract); `correct` and `no answer`
    # are those of --verify, the extraction the records' `correct` and iterate's decisions use.
    table = Table(title=f"accuracy (correct, no answer: --verify {v})", title_justify="left")
    for col in ("task", "count", "correct", "strict", "flexible", "no answer", "truncated"):
        table.add_column(col + (" *" if col == v else ""), justify="left" if col == "task" else "right")
    rows = list(metrics["by_task"].items())
    for task, row in rows:
        table.add_row(task, str(row["count"]), str(row["correct"]), f"{row['accuracy_strict']:.1%}",
                      f"{row['accuracy_flexible']:.1%}", str(row["no_answer"]), str(row["truncated"]))
    if len(rows) != 1:
        table.add_row("all", str(metrics["count"]), str(metrics["correct"]), f"{metrics['accuracy_strict']:.1%}",
                      f"{metrics['accuracy_flexible']:.1%}", str(metrics["no_answer"]), str(metrics["truncated"]),
                      style="bold")
    where = f"; metrics written to {path}" if path else ""
    print_stage_summary(table, f"accuracy (--verify {v}): {metrics['correct']}/{metrics['count']} "
                               f"({metrics['accuracy']:.1%}){where}")
    if path and not compact():
        console.print(f"metrics written to {path}")


def keep_in_manifest(summary: dict[str, Any]) -> dict[str, Any]:
    """What `undo iterate`'s manifest keeps of an evaluation: the accuracies and counts, not every prediction."""
    metrics = summary.get("metrics", {})
    kept = {k: metrics[k] for k in ("accuracy", "count", "correct", "no_answer", "truncated", "verify",
                                    "accuracy_strict", "accuracy_flexible") if k in metrics}
    return {**kept, "already_done": summary.get("already_done"), "wall_s": summary.get("wall_s")}


SPEC = StageSpec(
    name="evaluate", config=EvaluateConfig, run=run, records="prediction", key="id", shard_key="id",
    item_keys=item_keys, merge_consume=merge_consumer, after_merge=after_merge, heavy=True,
    merged_summary=lambda config, merged: {"metrics": merged["metrics"]}, keep=keep_in_manifest)
