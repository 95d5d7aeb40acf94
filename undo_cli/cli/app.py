"""The `undo` command line: one table of commands over the stages.

Each command's flags are the fields of its stage's config dataclass, made by
`cli/builder.py` (`--lora-r` is `TrainConfig.lora_r`, with its default and its
`metadata["help"]`); a command here is a name, the config class, the stage's
`run` and the command's help text. Only the invoked command is built and only
then is its stage imported: `undo --help` imports no stage, no torch,
transformers, datasets or math-verify, and is instant (a test checks it).

Errors the user can fix (`UndoError`) print one clear message on stderr and
exit with code 2; Ctrl-C exits with 130; anything else is a bug and shows a
traceback with exit code 1.
"""

from __future__ import annotations

import sys

import click

from undo_cli.cli.builder import Command, Group, LazyGroup, Special, Stage

# Order is the order of a UNDO run. The first paragraph of each help is its line in `undo --help`.
# A stage of the loop is a `Stage` row: its config and run come from its StageSpec (stages/spec.py).
COMMANDS: list[Command | Stage | Special | Group] = [
    Group("data", "Datasets: import a dataset into problems JSONL, split into train/val/test.", [
        Command("import", "undo_cli.data.importer:DataImportConfig", "undo_cli.data.importer:run", """\
Import a dataset as problems JSONL, one file per split, into --output-dir.

\b
Examples:
  undo data import --preset gsm8k --output-dir data/
  undo data import quiz.csv --question-field prompt --answer-field gold --split train=0.9,val=0.1"""),
    ]),
    Command("check", "undo_cli.stages.check:CheckConfig", "undo_cli.stages.check:run", """\
Before any training or generation: tokenizers, chat templates, context lengths and a served teacher, checked.

Says whether teacher and student tokenizers are identical, the same size but different, or different (token by
token, on the data's text too) and which objectives therefore apply; renders the same messages with each chat
template; checks the longest generate, refine and student prompt of --data against each model's context; and a
--teacher-url server: reachable, the model, prompt_logprobs with token ids, its --max-logprobs against
--teacher-top-k, /tokenize, one generation. Loads tokenizers and configs only. Exit 0 when everything would work,
2 with the fix otherwise.

\b
Example: undo check --teacher Qwen/Qwen2.5-7B-Instruct --student meta-llama/Llama-3.2-1B-Instruct --data train.jsonl
Served:  undo check --teacher T --teacher-url http://127.0.0.1:8000/v1 --student S --format json"""),
    Command("score", "undo_cli.stages.score:ScoreConfig", "undo_cli.stages.score:run", """\
Score model outputs against gold answers; print the accuracy on stderr.

Math answers are verified mathematically (1,250.00 = 1250, \\frac{3}{4} = 0.75); choice answers by letter
or option text; exact answers as normalised strings.

Example: undo score predictions.jsonl --output scored.jsonl"""),
    Stage("generate", """\
The teacher writes step-by-step rationales for each problem; verified ones are kept.

Example: undo generate --teacher Qwen/Qwen2.5-1.5B-Instruct --input train.jsonl --output rationales.jsonl"""),
    Stage("train", """\
Fine-tune the student on question -> rationale (loss on the rationale only).

\b
Example: undo train --student Qwen/Qwen2.5-0.5B-Instruct --data rationales.jsonl --output runs/student
Several GPUs: accelerate launch --num_processes 4 -m undo_cli train --student ... --data ... --output ...
White-box (same tokenizer): undo train --objective skl --lm-weight 1 --teacher T --student S --data ... --output ...
The student's own outputs: undo train --objective srkl --student-outputs adaptive --val-data VAL --teacher T ...
  or: undo train --method minillm --teacher T --student SFT_STUDENT --data ... --output ..."""),
    Stage("evaluate", """\
The student answers each question (greedy, with the chat formatting it was trained on); every answer is
scored and the metrics are written beside the predictions (preds.metrics.json for preds.jsonl).

Example: undo evaluate --model out/student --input val.jsonl --output out/val/predictions.jsonl"""),
    Stage("collect-errors", """\
Keep the failed predictions with the student's own output; classify each as truncated, no_answer or
wrong_answer.

Example: undo evaluate --model out/student --input val.jsonl --output - | undo collect-errors - > errors.jsonl"""),
    Stage("refine", """\
The teacher rewrites rationales to target the student's failures; each new rationale is verified, and the
previous one is kept when it does not verify.

Example: undo refine --teacher out/teacher --errors errors.jsonl --targets rationales.jsonl --output refined.jsonl"""),
    Stage("cluster", """\
Cluster the training and validation questions once (TF-IDF or a small sentence-embedding model), so each
round's failures map to the same cluster ids; refine --select clusters shares its budget by cluster.

Example: undo cluster train.jsonl val.jsonl --output clusters.json"""),
    Stage("mix", """\
Mix refined rationales into the training data: replace the old ones by id, or append the verified ones.

Example: undo mix --base iter_00/rationales.jsonl --refined iter_01/refined.jsonl -o iter_01/train_data.jsonl"""),
    Command("merge", "undo_cli.stages.shards:MergeConfig", "undo_cli.stages.shards:merge", """\
Merge the outputs of --shard K/N runs into the file one unsharded run writes (input order).

Works for generate, evaluate, refine and collect-errors shards; refuses missing, duplicated, unfinished or
foreign shards (each has <stem>.shard.json beside it: N, K, input hashes, settings); evaluate's metrics.json
is recomputed from the merged predictions.

Example: undo merge out/rationales.jsonl out/shards/rationales.*-of-4.jsonl"""),
    Special("iterate", "undo_cli.cli.iterate:build", """\
Run the UNDO loop: generate -> train -> evaluate -> collect errors -> refine -> train ... until the student
stops improving on validation; then test the best and the one-shot student.

Settings come from --config run.toml (see examples/run.toml), overridden by flags; each stage's own
options are dotted flags (--train.lr 2e-5), listed last below.

\b
Examples:
  undo iterate --config examples/run.toml --name my-run
  undo iterate --config examples/run.toml --name my-run --resume     # after a kill or Ctrl-C
  undo iterate --config examples/run.toml --name my-run --dry-run    # every setting and the plan first""",
            config="undo_cli.loop.config:IterateConfig"),
    Command("report", "undo_cli.loop.report:ReportConfig", "undo_cli.loop.report:run_report", """\
Per-iteration table (validation accuracy, errors, refinements, verification rate, loss, stage times), what
each round fixed and broke, and a PNG plot of validation and test accuracy; --html writes one self-contained
page with every problem's transitions and every refinement.

Example: undo report runs/qwen-gsm8k
The whole run in one offline page (transitions, every refinement): undo report runs/qwen-gsm8k --html report.html"""),
    Command("diff", "undo_cli.loop.diff:DiffConfig", "undo_cli.loop.diff:run", """\
Which problems the student newly got right (fixed) or lost (regressed) between two iterations, or between
any two prediction files.

\b
Examples:
  undo diff runs/qwen-gsm8k 1 2
  undo diff runs/qwen-gsm8k 0 best --split test --format jsonl > transitions.jsonl
  undo diff before/predictions.jsonl after/predictions.jsonl"""),
    Command("lineage", "undo_cli.loop.lineage:LineageConfig", "undo_cli.loop.lineage:run", """\
One training row's history across a run's iterations: which teacher (and model hash) wrote each version, the
template and sampling, the cascade's attempts (tokens, cost, verdict), the parent row and the failures that
informed each refinement.

\b
Example: undo lineage runs/qwen-gsm8k p07#0
As JSON:  undo lineage runs/qwen-gsm8k p07#0 --format json | jq '.history[].lineage.teacher'"""),
    Group("cache", "The teacher cache: what it holds and saved (stats), dropping entries (prune).", [
        Command("stats", "undo_cli.economy.commands:CacheStatsConfig", "undo_cli.economy.commands:stats", """\
Entries, file size, hits and teacher tokens saved, per model (docs/economy.md).

Example: undo cache stats"""),
        Command("prune", "undo_cli.economy.commands:CachePruneConfig", "undo_cli.economy.commands:prune", """\
Drop entries (unused for N days, of one model, or all) and compact the file.

Example: undo cache prune --older-than 30"""),
    ]),
    Group("batch", "Batch APIs: the batches an output or a run has in flight (status), waiting, cancelling.", [
        Command("status", "undo_cli.economy.batch_commands:BatchStatusConfig", "undo_cli.economy.batch_commands:status", """\
Per batch: status, requests answered and failed, tokens and cost at the batch price, created and expiry times.

Example: undo batch status out/rationales.jsonl"""),
        Command("wait", "undo_cli.economy.batch_commands:BatchWaitConfig", "undo_cli.economy.batch_commands:wait", """\
Wait until every batch of an output (or of a run folder) has ended, with progress; then run the stage again
to read the results into its output.

Example: undo batch wait runs/my-run --poll-s 60"""),
        Command("cancel", "undo_cli.economy.batch_commands:BatchCancelConfig", "undo_cli.economy.batch_commands:cancel", """\
Ask the API to cancel the open batches of an output or a run folder.

Example: undo batch cancel out/rationales.jsonl"""),
    ]),
    Group("models", "GGUF files as models: convert one ahead, list the conversions, remove them.", [
        Command("convert", "undo_cli.cli.models:ConvertConfig", "undo_cli.cli.models:convert", """\
Dequantize a .gguf file into a model folder once (safetensors, config, tokenizer, chat template) and print the
folder. Any stage given the .gguf file does this itself the first time and reuses the folder after; convert
ahead of a long run, for another --dtype, or to point another tool (vLLM) at the folder.

Example: undo models convert SmolLM2-135M-Instruct.Q4_1.gguf"""),
        Command("list", "undo_cli.cli.models:ListConfig", "undo_cli.cli.models:list_models", """\
The conversions: source file, sha256, size, dtype, folder, when made.

Example: undo models list"""),
        Command("rm", "undo_cli.cli.models:RemoveConfig", "undo_cli.cli.models:remove", """\
Delete conversions, named by sha256 prefix, .gguf file or folder (the file itself is never touched).

Example: undo models rm b179c952"""),
    ]),
    Command("demo", "undo_cli.demo:DemoConfig", "undo_cli.cli.demo:run", """\
Offline demo: builds a tiny teacher and student, runs `undo iterate` on the shipped arithmetic problems and
prints the report. About two minutes on 2 CPU cores; no network, no GPU.

The demo's models are tiny: their accuracy says nothing about real models.

Example: undo demo --workdir /tmp/undo-demo"""),
]

def versions() -> list[tuple[str, str]]:
    """(name, version) of undo and what it runs on: torch, transformers, vllm when installed, CUDA."""
    from importlib.metadata import PackageNotFoundError, version

    import undo_cli

    found = [("undo", undo_cli.__version__)]
    for name in ("torch", "transformers", "vllm"):
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            if name != "vllm":  # vllm is optional: only shown when present
                found.append((name, "not installed"))
    try:
        import torch  # only here: `undo --help` must stay instant

        cuda = torch.version.cuda
        found.append(("cuda", f"{cuda} ({torch.cuda.device_count()} GPU(s) visible)" if cuda and
                      torch.cuda.is_available() else f"{cuda or 'none'} (no GPU visible)"))
    except ImportError:
        found.append(("cuda", "unknown (torch not installed)"))
    return found


def _print_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo("".join(f"{name} {ver}\n" for name, ver in versions()), nl=False)
        ctx.exit()


app = LazyGroup(
    "undo", table=COMMANDS, no_args_is_help=True,
    help="Iterative, error-driven teacher-student distillation (UNDO, DistiLLM, MiniLLM, GKD).\n\n"
         "Stages exchange JSONL files; `-` means stdin/stdout. Run `undo demo` for an offline tour.",
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it from this context
    params=[click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
                         help="Print the versions of undo, torch, transformers, vllm (if installed) and CUDA.")],
)


def main(args: list[str] | None = None) -> None:
    from undo_cli.invocation import set_invocation

    set_invocation(sys.argv[1:] if args is None else args)  # what a "continue with: undo ..." hint repeats
    try:
        _main(args)
    finally:
        set_invocation(None)


def _main(args: list[str] | None) -> None:
    from undo_cli import threads
    from undo_cli.errors import UndoError

    threads.configure()  # before any stage imports torch: thread count, no OpenMP spinning (undo_cli/threads.py)
    try:
        result = app.main(args, prog_name="undo", standalone_mode=False)
    except UndoError as exc:
        from undo_cli.console import console

        console.print(f"[bold red]error:[/bold red] {exc.message}", markup=True, highlight=False,
                      soft_wrap=True)  # never folded mid-path in a log file (see console.warn)
        if exc.hint:
            console.print(f"  [dim]hint:[/dim] {exc.hint}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort; an interrupt must not look like success, nor like a plain abort.
        if isinstance(exc.__cause__, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt):
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        sys.stderr.write("aborted\n")
        sys.exit(1)
    except click.exceptions.ClickException as exc:  # usage errors: click's message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    # In non-standalone mode click returns the code of an Exit (e.g. `--help`: 0) instead of exiting.
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        if result == 130:
            sys.stderr.write("interrupted\n")
        sys.exit(result)


if __name__ == "__main__":
    main()
