"""`undo data ...`: get datasets into problems JSONL (see undo_cli/data/importer.py)."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="Datasets: import a dataset into problems JSONL, split into train/val/test.",
                  no_args_is_help=True, add_completion=False)


@app.command("import")
def import_(
    source: Optional[str] = typer.Argument(None, help="A local .json/.jsonl/.csv/.parquet file, '-' (JSONL on "
                                           "stdin) or a Hugging Face dataset name (default: the --preset's dataset on the Hub)."),
    output_dir: str = typer.Option("data", "--output-dir", "-o", help="Folder for <split>.jsonl files."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Column layout of a known dataset: gsm8k, svamp, "
                                         "math, commonsense_qa, strategyqa, arc."),
    config: Optional[str] = typer.Option(None, "--config", help="Hub dataset configuration (e.g. 'main' for gsm8k)."),
    source_split: Optional[str] = typer.Option(None, "--source-split", help="Split of the Hub dataset to read "
                                               "(default: train)."),
    question_field: Optional[str] = typer.Option(None, "--question-field", help="Column with the question."),
    answer_field: Optional[str] = typer.Option(None, "--answer-field", help="Column with the gold answer."),
    choices_field: Optional[str] = typer.Option(None, "--choices-field", help="Column with the options "
                                                "(a list, {label, text}, or a JSON / '|'-separated string)."),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="Column with a stable id (default: 'id' if "
                                           "present, else <preset or file stem>-<row>)."),
    task: Optional[str] = typer.Option(None, "--task", help="math, choice or exact (default: the preset's, else "
                                       "choice with --choices-field, else math)."),
    split: str = typer.Option("train=0.8,val=0.1,test=0.1", "--split", help="Output splits as name=fraction "
                              "pairs adding up to 1; 'all=1' writes a single file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split shuffle: same seed, same split."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Import only the first N rows of the source."),
) -> None:
    """Import a dataset as problems JSONL, one file per split, into --output-dir.

    Examples:

      undo data import --preset gsm8k --output-dir data/

      undo data import quiz.csv --question-field prompt --answer-field gold --split train=0.9,val=0.1
    """
    from undo_cli.data.importer import DataImportConfig, run

    run(DataImportConfig(source=source, output_dir=output_dir, preset=preset, config=config,
                         source_split=source_split, question_field=question_field, answer_field=answer_field,
                         choices_field=choices_field, id_field=id_field, task=task, split=split, seed=seed,
                         limit=limit))
