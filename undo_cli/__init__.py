"""undo: iterative, error-driven teacher-student distillation of language models.

The package is laid out by concern, so the folder names tell the architecture:

    cli/         the command table; each command's flags are its config dataclass's fields (cli/builder.py)
    stages/      one module per stage (generate, train, evaluate, ...): the real work;
                 generation_loop.py batches, resumes and shows progress for generate/evaluate/refine
    loop/        the UNDO loop: iterate, its settings, the run folder (layout, manifest) and report
    backends/    text generation: hf (embedded transformers), openai (any server), vllm
    records/     the JSONL artifact contract: shapes, reader, atomic/resumable writers
    objectives/  white-box distillation losses (fkl, rkl, jsd, skl, srkl, tvd)
    training/    train's config, the trainer, HF plumbing, collation/packing, student-output schedules
    models.py    loading models and tokenizers with one clear error; versions; freeing memory
    fields.py    what a config dataclass says about its fields (flags are made from it)
    data/        dataset import presets
    scoring.py   answer extraction and verification, shared by every stage
    prompts.py   Jinja templates and the one chat formatting used for train and eval
"""

__version__ = "0.1.0"
