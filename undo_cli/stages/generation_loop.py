"""The one batched generation loop behind `undo generate`, `undo evaluate` and `undo refine`.

Every stage that asks a model for text does the same dance: skip what a
previous run already finished, open the backend only if something is left,
send prompts in batches, turn completions into records, append each batch
durably, show progress, and summarise. That lives here, once; a stage only says
what its prompts are and how a completion becomes a record:

    from undo_cli.stages.generation_loop import Generation, WorkItem, digest, print_summary

    items = [WorkItem(key=p["id"], messages=messages_for(p), data=p) for p in problems]

    def make_records(item: WorkItem, completions: list[Completion]) -> list[dict]:
        # one record per completion (n per item); ids must be unique in the output
        return [{"id": f"{item.key}#{s}", "problem_id": item.key, ...} for s, c in enumerate(completions)]

    summary = Generation(
        SPEC, config, items, make_records,  # the stage's spec (record kind, resume key) and its config
        keep=lambda r: r["correct"],        # None keeps everything
        inputs={"input": digest(problems)}, # what identifies the input: its content, not its path
    ).run()
    print_summary(summary, title="undo generate")

The config gives the output (`--output`; `-` for stdout: no resume), the
backend, the sampling, `--overwrite`, `--shard` and, for a stage whose spec
says `teacher`, the teacher economy; the spec gives the record shape every
line must fit (`records`) and the record field that holds an item's key
(`key`, e.g. `problem_id`).

Contract, in detail:

* **Resume.** The output is an `AppendLog`. An item counts as done when some
  record on disk has `record[spec.key] == item.key`; done items are skipped
  and the backend is not even loaded when nothing is left. For `generate` the
  key is the problem id (`problem_id`), for `evaluate` the prediction id (`id`).
* **Rejected records** (`keep` returned False) go to a sidecar next to the
  output, `<stem>.rejected.jsonl` (`rationales.rejected.jsonl` for
  `rationales.jsonl`). It serves two purposes: a person can read what the
  teacher got wrong, and resume knows that a problem whose every sample was
  rejected is *done* (otherwise a re-run would sample it again, and a third
  time, and so on). Per batch the kept records are written first, then the
  rejected ones, so a kill in between loses at most some rejected lines, never
  a kept one. The sidecar belongs to its output: when the output file does not
  exist yet (a fresh start, or the user deleted it) the sidecar is reset too.
  With `--output -` there is no sidecar (rejected records are only counted).
* **What produced the output.** The run's identity (the config's
  identifying fields, undo_cli/identity.py, with the inputs' digests and a
  digest of every prompt) goes to `<stem>.run.json` next to the output before
  the first record. A re-run resumes only when the
  identity is the same; otherwise it is refused, naming the keys that differ,
  with the hint `--overwrite`, so one file never mixes two
  models' records. An existing non-empty output without that sidecar was not
  written by this stage (or predates it) and is refused too: in particular a
  torn last line is only ever dropped from a file this stage wrote.
* **Durability.** Each batch is appended, flushed and fsynced before the next
  is written: a killed run loses at most the batches in flight (one; two with
  the openai backend) and never writes a record twice (AppendLog refuses
  duplicate ids).
* **Batching.** The batches go through one `backend.generate_stream`, each of
  `backend.batch_hint` items (hf: --batch-size; openai: enough to keep
  --concurrency requests in flight; vllm: a large block, since vLLM schedules
  internally). The openai backend starts the next batch's requests while one
  finishes, so its endpoints never drain at a batch boundary. Backends with
  `sort_by_length` (hf) get their work sorted by prompt length first, so a batch
  pads little; records then come out grouped by length, not in input order
  (join on ids, as every later stage does) until the run finishes: then the
  output (and its rejected sidecar) is rewritten, atomically, in item order, so
  a finished output is the same file however it was batched, resumed or sharded.
* **Teacher economy.** A stage whose spec says `teacher` gets
  `config.economy()` (undo_cli/economy): the backend is then wrapped
  in the teacher cache, the token ledger (`<stem>.usage.json`) and the budget,
  and opened only on the first cache miss. Every record gets `cached`; an item
  the budget does not allow comes back as None and is left undone (a re-run
  resumes it), and the summary gains `teacher_usage`, `budget`, `left_by_budget`.
* **Shards.** With `--shard K/N` only the items of shard K are generated, by a
  stable hash of `item.shard_key` (default: the key). What that means is decided
  once, before any work (`shards.ShardPlan`, stages/shards.py): the loop asks it
  for this shard's items (here and nowhere else; `Generation.items` then holds
  them, for the stage's own counts), claims the output through it before the
  first write and reports to it after the last; a sidecar `<stem>.shard.json` records N, K, the input hashes and the
  settings, and `undo merge` joins the shards into the unsharded run's file. A
  shard the teacher budget stopped is marked so (not complete) for the launcher.
* **Streams.** An output that is not a regular file (`-`, a FIFO, a device) is
  written and never read back, and gets no sidecar (records/sidecars.py).
* **Summary.** A dict (see `_summary`) with questions, samples, kept, verified
  %, (with `keep`) the samples that did not verify by reason (`rejected_by_reason`:
  no answer / wrong answer / false step), tokens in/out, wall time and throughput; `print_summary` renders it as a
  table on stderr. Stages add their own fields and write it where they like.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from undo_cli.backends.base import Completion, Message, SamplingConfig
from undo_cli.console import PlainProgress, console, print_stage_summary
from undo_cli.errors import UndoError
from undo_cli.scoring import REASONS, reject_reason

Record = dict[str, Any]


@dataclass
class WorkItem:
    """One prompt to send: `n` completions of it become records via the stage's `make_records`."""

    key: str                        # what resume matches against `record[spec.key]` (e.g. the problem id)
    messages: list[Message]         # the chat messages the backend formats and sends
    data: dict[str, Any] = field(default_factory=dict)  # whatever make_records needs (the problem, ...)
    shard_key: str | None = None    # the id `--shard K/N` hashes (default: key); refine: the target's problem id
    tags: dict[str, Any] = field(default_factory=dict)     # what a cascade's routes match: task, cluster
    lineage: dict[str, Any] = field(default_factory=dict)  # the stage's part of `lineage`: parent, informed_by, ...


def digest(obj: Any) -> str:
    """A short stable hash of JSON-able data (records as read, prompts): equal data, equal digest."""
    import hashlib
    import json

    h = hashlib.sha256()
    for part in obj if isinstance(obj, list) else [obj]:
        h.update(_serial(part))
    return h.hexdigest()[:16]


def _serial(part: Any) -> bytes:
    import json

    return json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def prefix_length(parts: list[Any], target: str) -> int | None:
    """The n whose `digest(parts[:n])` is `target` (one pass, hashing each part once); None when no prefix has it.

    How a refusal says `--limit 20, was every problem (105)` instead of two digests: the output's
    `<stem>.run.json` records the digest of the problems it was made from, and the input's prefixes
    are what --limit takes."""
    import hashlib

    h = hashlib.sha256()
    for n, part in enumerate(parts, start=1):
        h.update(_serial(part))
        if h.hexdigest()[:16] == target:
            return n
    return None


def explain_limit(problems: list[dict[str, Any]], limit: int | None, used: list[dict[str, Any]]):
    """`claim_output`'s `explain` for a stage with --limit: a changed input digest said in words, and the prompts
    (which changed because the problems did) left unsaid. `problems`: all of --input; `used`: the first `limit`."""
    now = digest(used)

    def explain(previous: dict[str, Any]) -> dict[str, str | None]:
        if previous.get("input") == now:
            return {}
        return {"input": limit_words(problems, limit, previous.get("input")), "prompts": None, "limit": None}

    return explain


def limit_words(problems: list[dict[str, Any]], limit: int | None, previous_digest: Any) -> str:
    """A changed --limit (or input) in words: `--limit 20, was every problem (105)`."""
    n = prefix_length(problems, previous_digest) if isinstance(previous_digest, str) else None
    if n is None:
        return "the problems of --input differ from those it was made from (another file, or edited)"
    every = f"every problem ({len(problems)})"
    return f"{f'--limit {limit}' if limit is not None else every}, was {every if n == len(problems) else f'--limit {n}'}"


def claim_output(output: str, identity: dict[str, Any], *, fresh: bool, defaults: dict[str, Any] | None = None,
                 explain: Callable[[dict[str, Any]], dict[str, str | None]] | None = None) -> None:
    """Refuse to resume into an output some other run (or program) wrote; then record who writes it.

    See "What produced the output" in the module docstring. `defaults`: the identifying fields' defaults, what
    a key an older run record lacks is compared as (undo_cli/identity.py). explain(previous identity) ->
    {key: words} says changed keys in words (a digest means nothing to a person); a key mapped to None goes
    unsaid (e.g. the prompts, which change because the input did).
    """
    from undo_cli.identity import changes, shown
    from undo_cli.records import write_json
    from undo_cli.records.sidecars import RUN, sidecar_path

    record = sidecar_path(output, RUN)
    if record is None:
        return
    stage = identity.get("stage", "this stage")
    if Path(output).exists() and not fresh:
        previous = None
        if Path(record).is_file():
            try:
                import json

                previous = json.loads(Path(record).read_text(encoding="utf-8")).get("identity")
            except (ValueError, AttributeError, OSError):
                previous = None
        if previous is None or not isinstance(previous, dict):
            if Path(output).stat().st_size:
                raise UndoError(f"--output {output} already exists and was not written by `undo {stage}` "
                                f"(there is no {Path(record).name} beside it); refusing to resume into it",
                                hint="pass --overwrite to replace it, or choose another --output")
        else:
            changed = changes(previous, identity, defaults)
            if changed:
                words = explain(previous) if explain else {}
                details = "; ".join(words[k] if k in words else f"{k}: {shown(was)} -> {shown(now)}"
                                    for k, was, now in changed if words.get(k, "") is not None)
                raise UndoError(f"--output {output} was written by a different run; changed: {details}",
                                hint="re-run with the same settings to resume it, pass --overwrite to start over, "
                                     f"or choose another --output (e.g. {_another(output)})")
    write_json(record, {"output": Path(output).name, "identity": identity})


def record_applied(output: str, applied: dict[str, Any]) -> None:
    """Add the generation settings that applied (Backend.applied) to the output's run record: what the
    model's generation_config set aside, the eos ids, the end rules. Not part of the identity."""
    import json

    from undo_cli.records import write_json
    from undo_cli.records.sidecars import RUN, sidecar_path

    record = sidecar_path(output, RUN)
    if record is None or not Path(record).is_file():
        return
    try:
        data = json.loads(Path(record).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return
    if isinstance(data, dict):
        write_json(record, {**data, "applied": applied})


def _another(output: str) -> str:
    """A free file name beside `output`: preds.jsonl -> preds-2.jsonl (or -3, ...)."""
    p = Path(output)
    stem, suffix = (p.name[: -len(".jsonl")], ".jsonl") if p.name.endswith(".jsonl") else (p.stem, p.suffix)
    for i in range(2, 1000):
        other = p.with_name(f"{stem}-{i}{suffix}")
        if not other.exists():
            return str(other)
    return str(p.with_name(f"{stem}-new{suffix}"))


def _prompt_chars(item: WorkItem) -> int:
    # A cheap stand-in for the token length (exact ordering is the backend's job within a batch).
    return sum(len(m.get("content", "")) for m in item.messages)


class Generation:
    """One run of a generating stage over its work items: claim the output, generate what is left, finish.

        gen = Generation(SPEC, config, items, make_records, keep=..., inputs={"input": digest(problems)})
        summary = gen.run()
        gen.items    # the items this run is responsible for (this shard's, with --shard K/N)

    spec, config: the stage (stages/spec.py) and its config: the output (`config.output`), `--overwrite`,
        `--shard`, the backend (`config.backend_config()`), sampling (`config.sampling()`) and, for a
        teacher stage, the economy (`config.economy()`) come from them; the record kind, the resume key
        and the description from the spec.
    items: every work item of the input, in input order; `--shard K/N` keeps shard K's here and only here.
    make_records: (item, completions) -> records. keep: which records go to the output (the others to
        `<stem>.rejected.jsonl`); None keeps all and writes no rejected sidecar.
    inputs: input field -> a digest of what the stage read from it: what identifies the run in
        `<stem>.run.json` with the config's identifying fields (undo_cli/identity.py) and a digest of the prompts.
    backend: an open backend to use instead of opening `config.backend_config()` (left open).
    explain: says a refused resume's changed identity keys in words (`claim_output`, `explain_limit`).
    """

    def __init__(self, spec: Any, config: Any, items: Sequence[WorkItem],
                 make_records: Callable[[WorkItem, list[Completion]], list[Record]], *,
                 keep: Callable[[Record], bool] | None = None, inputs: dict[str, Any] | None = None,
                 backend: Any = None, explain: Callable[[dict[str, Any]], dict[str, str | None]] | None = None):
        from undo_cli.records import is_stream
        from undo_cli.records.sidecars import REJECTED, sidecar_path
        from undo_cli.stages import shards

        keys = [item.key for item in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k, c in Counter(keys).items() if c > 1)
            raise UndoError(f"two work items share the key '{dup}'", hint="input ids must be unique")
        self.spec, self.config, self.make_records, self.keep, self.explain = spec, config, make_records, keep, explain
        self.output, self.fresh = config.output, bool(config.overwrite)
        # The one place a stage's work is split: by a stable hash of the id (stages/shards.py), decided here.
        self.shards = shards.ShardPlan(spec, config)
        self.items = self.shards.mine(items, [it.shard_key or it.key for it in items])
        self.stream = is_stream(self.output)
        self.side = sidecar_path(self.output, REJECTED) if keep is not None else None
        inputs = dict(inputs or {})
        if spec.teacher and hasattr(config, "cascade_identity"):  # a cascade's models, not its prices or budgets
            inputs.update(cascade=config.cascade_identity(), route=None)
        self.identity = {**spec.identity(config, **inputs), "prompts": digest(sorted(
            ([i.key, i.messages] for i in self.items), key=lambda kv: kv[0]))}
        self.backend = backend if backend is not None else config.backend_config()
        from undo_cli.backends import BATCH_BACKENDS, BackendConfig

        if isinstance(self.backend, BackendConfig) and self.backend.backend in BATCH_BACKENDS:
            from undo_cli.records.sidecars import BATCHES

            self.backend.batch_manifest = sidecar_path(self.output, BATCHES)  # None for a stream: the backend says
        self.economy = config.economy() if spec.teacher else None
        self.stats = _Stats(questions=len(self.items))

    @property
    def keys(self) -> list[str]:
        return [item.key for item in self.items]

    def run(self) -> dict[str, Any]:
        """Generate for every item not already in the output; returns the summary (module docstring)."""
        from undo_cli.records import AppendLog

        started = time.perf_counter()
        existed = self._claim()
        with AppendLog(self.output, self.spec.records, fresh=self.fresh) as out:
            rejected = AppendLog(self.side, self.spec.records, fresh=self.fresh or not existed) if self.side else None
            try:
                self._generate(out, rejected, started)
            except BaseException:
                if not existed and self.stats.items_done == 0:
                    # Failed before writing anything (unknown model, server down): leave no empty files behind.
                    out.close()
                    self._remove_new_files()
                raise
            finally:
                if rejected is not None:
                    rejected.close()
        return self._finish(out, rejected, started)

    # --- the phases ----------------------------------------------------------------------------

    def _claim(self) -> bool:
        """Before anything is written: this output is ours to write (or resume); True if it existed."""
        from undo_cli.identity import defaults
        from undo_cli.records import check_output_path
        from undo_cli.records.sidecars import remove_stale_temps_of

        self.shards.claim(fresh=self.fresh)
        check_output_path(self.output)
        existed = not self.stream and Path(self.output).exists()
        claim_output(self.output, self.identity, fresh=self.fresh, defaults=defaults(type(self.config)),
                     explain=self.explain)
        remove_stale_temps_of(self.output)  # a killed run's temp files of this output and its sidecars
        if self.fresh and getattr(self.backend, "batch_manifest", None):
            from undo_cli.backends.batch.manifest import discard

            discard(self.backend.batch_manifest)
        if self.economy is not None:
            self.economy.begin(self.output, fresh=self.fresh or not existed)
        return existed

    def _generate(self, out, rejected, started: float) -> None:
        """Skip what is done; open the backend only if something is left; generate the rest in batches."""
        from undo_cli.backends import BackendConfig, open_backend

        key = self.spec.key
        done = out.done_ids(key) | (rejected.done_ids(key) if rejected is not None else set())
        todo = [item for item in self.items if item.key not in done]
        stats = self.stats
        stats.skipped, stats.kept_before = len(self.items) - len(todo), len(out.existing)
        if stats.skipped:
            console.print(f"resuming {self.output}: {stats.skipped} of {len(self.items)} already done, "
                          f"{len(todo)} to go")
        if not todo:
            return
        owned = isinstance(self.backend, BackendConfig)
        if self.economy is not None:  # the wrappers open the real backends on the first cache miss
            from undo_cli.stages.cascade_run import TeacherTiers

            llm, owned = TeacherTiers(self.economy, self.config, self.backend), True
        else:
            llm = open_backend(self.backend) if owned else self.backend
        stats.backend, stats.model = llm.name, llm.model
        try:
            self._batches(llm, todo, out, rejected, started)
        finally:
            stats.endpoints = llm.endpoint_summary()  # openai: requests, failures, req/s per server
            stats.applied = llm.applied(self.config.sampling())  # the generation settings in force
            if owned:
                llm.close()

    def _batches(self, llm, todo: list[WorkItem], out, rejected, started: float) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        stats, sampling = self.stats, self.config.sampling()
        if llm.sort_by_length:
            todo = sorted(todo, key=_prompt_chars)  # stable: equal lengths keep input order
        step = max(1, int(llm.batch_hint))
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   TextColumn("{task.fields[tps]:>8.1f} tok/s")]
        gen_start = time.perf_counter()
        stats.load_s = gen_start - started
        # A terminal gets rich's live bar; a log file (stderr not a TTY) gets a plain line every 30 s and at
        # each 10%, since a redrawn bar reaches a file only when the stage ends.
        plain = None if console.is_terminal else PlainProgress(self.spec.name, len(todo))
        with Progress(*columns, console=console, transient=False, disable=plain is not None) as progress:
            task = progress.add_task(self.spec.name, total=len(todo), tps=0.0)
            batches = [todo[start : start + step] for start in range(0, len(todo), step)]
            # One stream over all batches: a backend with servers sends the next batch while one finishes
            # (no drain at batch boundaries); records are still written batch by batch, in order.
            cascade = self.economy is not None and llm.cascading
            if cascade:  # each batch through its tiers in turn (stages/cascade_run.py)
                stream = ((lambda batch: llm.run(batch, sampling, self.make_records))(b) for b in batches)
            else:
                stream = llm.generate_stream(([item.messages for item in batch] for batch in batches), sampling)
            try:
                for batch, results in zip(batches, stream, strict=True):  # a short stream is a bug, not an end
                    if cascade:
                        self._write(llm, batch, [m[1][-1].completions if m else None for m in results], out,
                                    rejected, made=results)
                    else:
                        self._write(llm, batch, results, out, rejected)
                    # what the model wrote, not the cache's answers
                    tps = stats.generated_tokens / max(time.perf_counter() - gen_start, 1e-9)
                    progress.update(task, advance=len(batch), tps=tps)
                    if plain is not None:
                        plain.update(stats.items_done, f"{tps:,.1f} tok/s")
            except BaseException:
                if stats.items_done and out.resumable:
                    console.print(f"[yellow]stopped after {stats.items_done} of {len(todo)} items; what was "
                                  f"written to {out.path} is complete. Re-run the same command to resume.[/yellow]")
                raise
            finally:
                stream.close()  # a failure or Ctrl-C: the batch still in flight is cancelled, not left running
                stats.generation_s = time.perf_counter() - gen_start

    def _write(self, llm, batch: list[WorkItem], results: list[list[Completion] | None], out, rejected_log,
               made: list | None = None) -> None:
        """One batch's completions as records, appended (kept first, then rejected), durably. made: a cascade's
        (records, attempts) per item (stages/cascade_run.py), its records already made."""
        from undo_cli.records.schema import check_record

        stats, kind = self.stats, self.spec.records
        if len(results) != len(batch):
            raise UndoError(f"backend {llm.name} returned {len(results)} results for {len(batch)} prompts",
                            hint="this is a bug in the backend; please report it")
        kept, rejected = [], []
        for index, (item, completions) in enumerate(zip(batch, results)):
            if completions is None:  # the teacher budget did not allow it: not done, a re-run resumes it
                stats.left_by_budget.append(item.key)
                continue
            stats.count_item(item, completions)
            item_kept = 0
            if made is not None:
                records, attempts = made[index]
                stats.count_cascade(attempts, item.key)
            else:
                records = self.make_records(item, completions)
                attempts = [llm.attempt(llm.tiers[0], completions, records)] if self.economy is not None else None
            for record in records:
                if self.economy is not None:  # the n samples of one request are cached (or not) together
                    record["cached"] = bool(completions and completions[0].cached)
                    llm.lineage.attach(record, item, attempts)
                problem = check_record(record, kind)
                if problem is not None:  # a stage bug, not user input: say so plainly
                    raise UndoError(f"internal: a generated {kind} record is malformed: {problem}")
                if self.keep is None or self.keep(record):
                    kept.append(record)
                    item_kept += 1
                else:
                    rejected.append(record)
                stats.count_record(record)
            if item_kept == 0:
                stats.without_kept.append(item.key)
        # Kept first: a kill between the two appends can only lose rejected lines (see docstring).
        out.append(kept)
        if rejected_log is not None:
            rejected_log.append(rejected)
        stats.kept += len(kept)
        stats.rejected += len(rejected)
        stats.items_done += len(batch)

    def _finish(self, out, rejected, started: float) -> dict[str, Any]:
        """Put the output in item order, mark a finished shard complete (or stopped by the budget), summarise."""
        from undo_cli.records.order import put_in_order

        stats = self.stats
        # Every item is done (or left by the budget, to resume): a finished output is in item (input) order
        # whatever the backend's batching did, so a re-run, a resumed run and `undo merge` of shards all give
        # the same file. A FIFO or a device is never read back: it would wait for a writer forever.
        if not self.stream:
            put_in_order(self.output, self.spec.records, self.keys, self.spec.key)
            if self.side:
                put_in_order(self.side, self.spec.records, self.keys, self.spec.key)
        summary = stats.summary(self.output, self.side)
        if stats.applied is not None:
            record_applied(self.output, stats.applied)
        if self.keep is not None:  # a verifying stage: this run's samples that did not verify, by reason
            summary["rejected_by_reason"] = stats.unverified
        summary.update(self.shards.done(
            records=len(out.existing) + stats.kept,
            rejected_records=None if self.side is None else len(rejected.existing) + stats.rejected,
            left_by_budget=len(stats.left_by_budget), budget=self.economy.limits() if stats.left_by_budget else None))
        stats.wall_s = time.perf_counter() - started
        if self.economy is not None:
            self._economy_summary(summary)
        summary["wall_s"] = round(stats.wall_s, 3)
        return summary

    def _economy_summary(self, summary: dict[str, Any]) -> None:
        economy, stats = self.economy, self.stats
        if economy.load_s:  # the wrapper opened the backend inside the loop (on the first cache miss)
            stats.load_s += economy.load_s
            stats.generation_s = max(0.0, stats.generation_s - economy.load_s)
            summary.update({k: v for k, v in stats.summary(self.output, None).items()
                            if k in ("load_s", "generation_s", "tokens_per_s", "samples_per_s")})
        summary.update(economy.summary())
        if stats.cascade is not None:  # per tier: rows sent, verified there, paid tokens; rows no tier verified
            summary["cascade"] = stats.cascade_summary(summary["teacher_usage"])
            summary.setdefault("extra_rows", []).extend(stats.cascade_rows(summary["cascade"]))
        summary["left_by_budget"] = len(stats.left_by_budget)
        summary["left_by_budget_ids"] = stats.left_by_budget  # all of them: a stage may need to exclude them
        summary.setdefault("extra_rows", []).extend(economy.rows())
        if stats.left_by_budget:
            flag = "--max-teacher-tokens" if economy.budget.max_tokens is not None else "--max-cost"
            console.print(f"[yellow]teacher budget reached: {len(stats.left_by_budget)} of {stats.questions} items "
                          f"are left to do; what finished is in {self.output}. Re-run with a higher {flag} to "
                          "resume.[/yellow]")

    def _remove_new_files(self) -> None:
        from undo_cli.records.sidecars import RUN, sidecar_path

        if not self.stream:
            for path in (self.output, self.side, sidecar_path(self.output, RUN)):
                if path:
                    Path(path).unlink(missing_ok=True)


@dataclass
class _Stats:
    questions: int = 0
    skipped: int = 0
    kept_before: int = 0
    items_done: int = 0
    samples: int = 0
    kept: int = 0
    rejected: int = 0
    verified: int = 0
    scored: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    load_s: float = 0.0
    generation_s: float = 0.0
    wall_s: float = 0.0
    backend: str | None = None
    model: str | None = None
    finish: Counter = field(default_factory=Counter)
    without_kept: list[str] = field(default_factory=list)
    endpoints: list[dict[str, Any]] | None = None
    applied: dict[str, Any] | None = None  # Backend.applied: the generation settings in force
    left_by_budget: list[str] = field(default_factory=list)
    unverified: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))  # not verified, by reason
    cached_samples: int = 0  # answered by the teacher cache: instant, so outside the throughput
    cached_tokens: int = 0
    cascade: dict[str, dict[str, int]] | None = None  # tier -> rows sent / verified there (this run)
    cascade_unverified: list[str] = field(default_factory=list)  # rows no tier verified

    def count_cascade(self, attempts: list[Any], key: str) -> None:
        self.cascade = self.cascade or {}
        for a in attempts:
            row = self.cascade.setdefault(a.teacher, {"rows": 0, "verified": 0})
            row["rows"] += 1
            row["verified"] += a.verdict == "verified"
        if attempts[-1].verdict != "verified":
            self.cascade_unverified.append(key)

    def cascade_summary(self, usage: dict[str, Any]) -> dict[str, Any]:
        by_row = usage.get("by_backend") or {}
        tiers = [{"teacher": name, **counts, "paid_tokens": (by_row.get(name) or {}).get("paid", {}).get("tokens", 0),
                  "cost": (by_row.get(name) or {}).get("cost")} for name, counts in (self.cascade or {}).items()]
        return {"tiers": tiers, "unverified": len(self.cascade_unverified),
                "unverified_ids": self.cascade_unverified[:10]}

    @staticmethod
    def cascade_rows(cascade: dict[str, Any]) -> list[tuple[str, str]]:
        rows = [(f"tier {t['teacher']}", f"{t['rows']} rows, {t['verified']} verified, {t['paid_tokens']:,} tokens "
                 "paid (whole output)") for t in cascade["tiers"]]
        rows.append(("rows no teacher verified", str(cascade["unverified"])))
        return rows

    @property
    def generated_tokens(self) -> int:
        return self.tokens_out - self.cached_tokens

    def count_item(self, item: WorkItem, completions: list[Completion]) -> None:
        self.samples += len(completions)
        # The prompt is encoded once per item whatever n is (hf, vLLM and OpenAI's `n` share it).
        if completions:
            self.tokens_in += completions[0].prompt_tokens
        self.tokens_out += sum(c.completion_tokens for c in completions)
        if completions and completions[0].cached:  # the n samples of one request are cached together
            self.cached_samples += len(completions)
            self.cached_tokens += sum(c.completion_tokens for c in completions)
        self.finish.update(str(c.finish_reason) for c in completions)

    def count_record(self, record: Record) -> None:
        if "correct" in record:
            self.scored += 1
            self.verified += bool(record["correct"])
            if not record["correct"]:
                reason = reject_reason(record)
                self.unverified[reason] = self.unverified.get(reason, 0) + 1

    def summary(self, output: str, side: str | None) -> dict[str, Any]:
        gen = max(self.generation_s, 1e-9)
        return {
            "output": output,
            "rejected_output": side,
            "backend": self.backend,
            "model": self.model,
            "questions": self.questions,
            "already_done": self.skipped,
            "generated_for": self.items_done,
            "samples": self.samples,
            "kept": self.kept,
            "rejected": self.rejected,
            "kept_total": self.kept_before + self.kept,
            "verified": self.verified,
            "verified_pct": round(100.0 * self.verified / self.scored, 2) if self.scored else None,
            "questions_without_kept": len(self.without_kept),
            "without_kept_ids": self.without_kept[:10],
            "finish_reasons": dict(self.finish),
            "generation": self.applied,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "load_s": round(self.load_s, 3),
            "generation_s": round(self.generation_s, 3),
            "wall_s": round(self.wall_s, 3),
            # Throughput of what the model generated; answers from the teacher cache are counted apart.
            "tokens_per_s": round(self.generated_tokens / gen, 2) if self.samples > self.cached_samples else 0.0,
            "samples_per_s": round((self.samples - self.cached_samples) / gen, 3)
            if self.samples > self.cached_samples else 0.0,
            "cached_samples": self.cached_samples,
            "cached_tokens_out": self.cached_tokens,
            **({"endpoints": self.endpoints} if self.endpoints is not None else {}),
        }


def _throughput(summary: dict[str, Any]) -> str:
    """Generated tokens per second; samples the teacher cache answered (instantly) are said apart, not averaged in."""
    cached = summary.get("cached_samples") or 0
    generated = summary["samples"] - cached
    rate = f"{summary['tokens_per_s']:,.1f} tok/s, {summary['samples_per_s']:.2f} samples/s generated"
    if not cached:
        return rate
    from_cache = f"{cached} samples ({summary.get('cached_tokens_out', 0):,} tokens) from the teacher cache"
    return f"{rate} ({generated} samples); {from_cache}" if generated else f"none generated; {from_cache}"


def print_summary(summary: dict[str, Any], title: str = "summary") -> None:
    """The summary as a two-column table on stderr (stdout may be carrying JSONL)."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    pct = summary.get("verified_pct")
    rows = [
        ("questions", f"{summary['questions']}" + (f" ({summary['already_done']} already done)"
                                                   if summary.get("already_done") else "")),
        ("samples generated", summary["samples"]),
        ("verified", "-" if pct is None else f"{summary['verified']} ({pct:.1f}%)"),
        ("kept (this run / in file)", f"{summary['kept']} / {summary['kept_total']}"),
        ("rejected", summary["rejected"]),
        ("tokens in / out", f"{summary['tokens_in']:,} / {summary['tokens_out']:,}"),
        ("finish reasons", ", ".join(f"{k} {v}" for k, v in sorted(summary["finish_reasons"].items())) or "-"),
        ("wall time", f"{summary['wall_s']:.1f} s (model load {summary['load_s']:.1f} s)"),
        ("throughput", _throughput(summary)),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for e in summary.get("endpoints") or []:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(e["faults"].items()))
        table.add_row(f"endpoint {e['url']}", "unreachable at start" if e.get("unreachable_at_start") else
                      f"{e['requests']} requests, {e['failures']} failed{f' ({faults})' if faults else ''}, "
                      f"{e['req_per_s']:.1f} req/s")
    for reason, count in (summary.get("rejected_by_reason") or {}).items():
        table.add_row(f"not verified: {reason.replace('_', ' ')}", str(count))
    for extra_name, value in summary.get("extra_rows", []):
        table.add_row(extra_name, str(value))
    verified = "" if pct is None else f", {summary['verified']} verified ({pct:.1f}%)"
    line = (f"{title}: {summary['questions']} questions, {summary['samples']} samples{verified}, "
            f"{summary['wall_s']:.1f} s, {_throughput(summary)}")
    print_stage_summary(table, line)
