"""The whole UNDO loop in one command: distil, diagnose, re-teach, repeat while the student improves.

    undo iterate --config examples/run.toml
    undo iterate --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-0.5B-Instruct \\
        --train-file data/train.jsonl --val-file data/val.jsonl --test-file data/test.jsonl \\
        --teacher-backend vllm --max-iterations 4 --train.epochs 1 --train.lr 2e-5 --name qwen-gsm8k
    undo iterate --config examples/run.toml --resume          # after a kill, Ctrl-C or a crash
    undo iterate --config examples/run.toml --dry-run         # settings, plan, teacher-token bound; no model
    undo iterate --config examples/run.toml --overwrite       # delete runs/NAME and start over
    undo iterate --config examples/run.toml --launcher slurm --slurm.shards 16   # stages as Slurm job arrays

What it runs (docs/method.md §1), every step a call to the stage's own `run()`:

    iteration 0 (one-shot distillation)     iteration k >= 1 (UNDO)
      cluster    train + val problems, once   refine     teacher re-teaches, from iteration k-1's errors
      generate   teacher rationales, train                (its budget, its targets: [refine] budget, select)
      train      student on them              mix        refined rationales replace (or join) the old ones
      evaluate   student on val               train      student on the mixed data
      collect_errors                          evaluate   student on val
                                              collect_errors

It stops when validation accuracy has not improved by `min_delta` for
`patience` iterations, after `max_iterations` refinement rounds, when the
student makes no validation error left to learn from, or when the teacher
budget (`max_teacher_tokens`, `max_cost`: paid teacher tokens of the whole run)
is reached: the teacher stage that reaches it keeps what it finished and is
marked `budget` in the manifest, and `--resume` with a higher budget continues
it (budgets, prices and the cache folder are not part of the run's identity).
Under `--launcher slurm` a sharded teacher stage shares its part of the budget
out among its shards. The teacher's tokens per iteration (paid and cached, and
cost with prices) go to manifest.json and summary.json under `teacher_usage`
(loop/usage.py).

The best iteration is chosen by a paired test on the same validation items
(loop/choose.py: a later student replaces the kept one only with an exact
McNemar p < choose_alpha and a gain of at least choose_min_gain), and it is
kept, and both its student and the iteration-0 student are evaluated on the
test split, which no decision ever looked at: every run reports UNDO against
one-shot distillation on held-out data.

Options the paper leaves open (docs/method.md, our defaults): `mix = replace|append` (what a
refined rationale does to the old one, see stages/mix.py) and
`init = base|previous` (each iteration fine-tunes the base student on the
current data, or continues from the previous iteration's student).

Everything lands in runs/NAME/ (layout in loop/layout.py), and a run
killed at any point, mid-training or mid-refine included, continues with
`--resume` from the first unfinished stage without recomputing anything that
finished. Between stages the models are released, so the teacher and the
student are never in memory together. Settings: loop/settings.py.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.economy.options import TeacherEconomyOptions
from undo_cli.errors import SettingError, UndoError
from undo_cli.fields import check_choices
from undo_cli.loop.choose import ALPHA, MIN_GAIN, choose, read_outcomes
from undo_cli.loop.stop import RULES as STOP_RULES
# The teacher economy of the loop (one budget shared out, usage per iteration): loop/usage.py.
from undo_cli.loop.usage import BudgetReached, record_usage

MIX = {"replace": "refined rationales replace the old ones by id", "append": "they are added"}
INIT = {"base": "each iteration trains the base student", "previous": "continue from the last one"}
LAUNCHERS = ("local", "slurm")
TEACHER_BACKENDS = ("hf", "openai", "vllm", "openai-batch", "anthropic-batch")  # BACKENDS; batch: backends/batch
STUDENT_BACKENDS = ("hf", "vllm")
VERIFY = ("strict", "flexible", "steps")

RUNTIME = {"identity": False}  # where and how the run goes, not what it computes (undo_cli/identity.py)
TEACHER_STAGES = ("generate", "refine")


@dataclass
class IterateConfig(TeacherEconomyOptions):
    """Everything `undo iterate` needs: top-level keys of run.toml (each one flag) plus one table per stage.

    Field metadata (undo_cli/fields.py): `identity: False` for what may change on --resume, `affects` for the
    stages a key's change reruns (none: every stage). The teacher economy's fields (cache, budget, prices) are
    TeacherEconomyOptions', declared once: here they hold for the whole run (loop/usage.py).
    """

    teacher: str = field(metadata={"group": "Models and data", "affects": TEACHER_STAGES, "help": "The teacher: a model folder, a hub name, a .gguf file, or the model name on the server."})
    student: str = field(metadata={"group": "Models and data", "affects": ("train",), "help": "The base student: a model folder, a hub name or a .gguf file."})
    train_file: str = field(metadata={"group": "Models and data", "help": "Training problems JSONL: the teacher writes rationales for these."})
    val_file: str = field(metadata={"group": "Models and data", "help": "Validation problems JSONL: diagnosis and convergence (never trained on)."})
    test_file: str = field(metadata={"group": "Models and data", "help": "Test problems JSONL: only the best and the iteration-0 students see it."})
    name: str | None = field(default=None, metadata={"group": "Models and data", **RUNTIME, "help": "Run name, the folder under runs_dir (default: <student>-from-<teacher>)."})
    runs_dir: str = field(default="runs", metadata={"group": "Models and data", **RUNTIME, "help": "Where run folders go."})
    teacher_backend: str = field(default="hf", metadata={"group": "Backends", "choices": TEACHER_BACKENDS, "affects": TEACHER_STAGES, "help": "Teacher backend: hf, openai (a server), vllm, or a batch API at half price: openai-batch, anthropic-batch (docs/economy.md)."})
    teacher_base_url: list[str] | None = field(default=None, metadata={"group": "Backends", **RUNTIME, "help": "openai teacher backend: the server, e.g. http://127.0.0.1:8000/v1, or a list of replicas to spread requests over."})
    teacher_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"group": "Backends", **RUNTIME, "help": "openai teacher backend: the NAME of the variable holding the key."})
    student_backend: str = field(default="hf", metadata={"group": "Backends", "choices": STUDENT_BACKENDS, "affects": ("evaluate", "test"), "help": "Backend that evaluates each trained student: hf or vllm."})
    trust_remote_code: bool = field(default=False, metadata={"group": "Backends", **RUNTIME, "help": "Run code shipped with the model repos (opt-in)."})
    max_iterations: int = field(default=3, metadata={"group": "The loop", "affects": (), "help": "Most refinement rounds after the one-shot iteration 0."})
    patience: int = field(default=1, metadata={"group": "The loop", "affects": (), "help": "Stop after this many iterations without a min_delta improvement."})
    min_delta: float = field(default=0.0, metadata={"group": "The loop", "affects": (), "help": "Smallest gain in validation accuracy (0-1) that counts as better."})
    stop_rule: str = field(default="patience", metadata={"group": "The loop", "affects": (), "choices": STOP_RULES, "help": "When to stop refining: patience (no raw validation gain of min_delta for `patience` iterations: the rule before), paired (the choice's paired test finds no evidence of a gain for `patience` rounds) or value (paired, or a round's validation gain per 1,000 paid teacher tokens below stop_min_gain_per_ktok); loop/stop.py."})
    stop_min_gain_per_ktok: float = field(default=0.0, metadata={"group": "The loop", "affects": (), "help": "stop_rule value: stop when a round gains fewer validation accuracy points (0-100) per 1,000 paid teacher tokens than this."})
    choose_alpha: float = field(default=ALPHA, metadata={"group": "The loop", "affects": (), "help": "A later iteration is kept as the best only if it beats the kept one on the same validation items with an exact McNemar p below this (loop/choose.py)."})
    choose_min_gain: float = field(default=MIN_GAIN, metadata={"group": "The loop", "affects": (), "help": "A later iteration kept as the best must also gain at least this much validation accuracy (0-1) on those items: a one-problem wobble keeps the earlier student."})
    mix: str = field(default="replace", metadata={"group": "The loop", "choices": MIX, "affects": ("mix",), "help": "replace: refined rationales replace the old ones by id; append: they are added."})
    init: str = field(default="base", metadata={"group": "The loop", "choices": INIT, "affects": ("train",), "help": "base: each iteration trains the base student; previous: continue from the last one."})
    # The stages see the seed through their tables (each table's effective `seed` identifies the run there).
    seed: int = field(default=0, metadata={"group": "The loop", "affects": (), "help": "Seed for every stage (sampling, data order, error sampling) unless a table sets its own."})
    verify: str = field(default="strict", metadata={"group": "The loop", 
        "help": "Which validation accuracy decides the best iteration and when to stop, and which answers count as "
                "errors to refine: strict (only an explicit final answer: #### x, \\boxed{x}, 'The answer is x') "
                "or flexible (also the last number); `undo evaluate` reports both. steps: the student is read "
                "strictly and the teacher's rationales (generate, refine) must also have every arithmetic "
                "statement true, unless their tables set their own verify.", "choices": VERIFY,
        # (verify = steps also reaches generate and refine: through their tables' `verify`, which the identity holds)
        "affects": ("evaluate", "test", "collect_errors")})
    teachers: list[dict[str, Any]] = field(default_factory=list, metadata={"group": "Models and data", "affects": TEACHER_STAGES, "help": "[[teachers]] tables: a teacher cascade, cheapest first (model, name, backend, base_url, price_input, price_output, max_teacher_tokens, max_cost, model_revision); a row goes to the next teacher only when the previous one's answer does not verify. The first is `teacher` (docs/economy.md)."})
    teacher_routes: dict[str, Any] = field(default_factory=dict, metadata={"group": "Models and data", "affects": TEACHER_STAGES, "help": "[teacher_routes] table: \"task:<task>\" or \"cluster:<id>\" = [tier names]: those rows go through these teachers only."})
    prices: dict[str, float] = field(default_factory=dict, metadata={"group": "Teacher economy (docs/economy.md)", **RUNTIME, "help": "[prices] table: input and output, per million teacher tokens (price_input/price_output override them)."})
    launcher: str = field(default="local", metadata={"group": "Where stages run", **RUNTIME,
        "help": "local: every stage in this process; slurm: sharded stages as job arrays, training as a job "
                "(settings in the [slurm] table).", "choices": LAUNCHERS})
    generate: dict[str, Any] = field(default_factory=dict, metadata={"group": "Stage tables", "help": "[generate] table: GenerateConfig fields."})
    train: dict[str, Any] = field(default_factory=dict, metadata={"group": "Stage tables", "help": "[train] table: TrainConfig fields."})
    evaluate: dict[str, Any] = field(default_factory=dict, metadata={"group": "Stage tables", "help": "[evaluate] table: EvaluateConfig fields."})
    collect_errors: dict[str, Any] = field(default_factory=dict, metadata={"group": "Stage tables", "help": "[collect_errors] table: CollectErrorsConfig fields."})
    cluster: dict[str, Any] = field(default_factory=dict, metadata={"group": "Stage tables", "help": "[cluster] table: ClusterConfig fields (the failure clusters, made once before iteration 0)."})
    refine: dict[str, Any] = field(default_factory=dict, metadata={"group": "Stage tables", "help": "[refine] table: RefineConfig fields."})
    slurm: dict[str, Any] = field(default_factory=dict, metadata={"group": "Where stages run", **RUNTIME, "help": "[slurm] table: SlurmConfig fields (--launcher slurm)."})

    def __post_init__(self) -> None:
        if self.student_backend == "openai":
            raise SettingError("student_backend", self.student_backend, "each iteration trains a new student folder, "
                               "which a remote server does not have", hint="use student_backend hf or vllm")
        check_choices(self)
        self._check_teacher_base_url()
        self._check_economy()
        self._check_teachers()
        if not 0 < self.choose_alpha <= 1 or not 0 <= self.choose_min_gain <= 1:
            raise UndoError(f"choose_alpha {self.choose_alpha:g} must be in (0, 1] and choose_min_gain "
                            f"{self.choose_min_gain:g} in [0, 1]", hint="e.g. --choose-alpha 0.05 --choose-min-gain 0.02")
        if self.max_iterations < 0 or self.patience < 1 or self.min_delta < 0:
            raise UndoError("max_iterations must be >= 0, patience >= 1 and min_delta >= 0",
                            hint="e.g. --max-iterations 3 --patience 1 --min-delta 0.01")
        for key in ("train_file", "val_file", "test_file"):
            path = getattr(self, key)
            if path == "-" or not Path(path).is_file():
                raise UndoError(f"{key} = {path!r}: no such file",
                                hint="`undo data import ... --split train=0.8,val=0.1,test=0.1` writes all three")
        if self.slurm and self.launcher != "slurm":
            raise UndoError("a [slurm] table is set but launcher is local", hint="add --launcher slurm, or drop [slurm]")
        if self.launcher == "slurm":
            from undo_cli.stages.slurm import SlurmConfig

            SlurmConfig(**self.slurm)  # its own checks, before anything starts
        if self.name is None:
            self.name = f"{_slug(self.student)}-from-{_slug(self.teacher)}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise UndoError(f"name = {self.name!r}: use letters, digits, '.', '_' and '-' only",
                            hint="the name is a folder under runs_dir")
        self._check_lora()

    def _check_teacher_base_url(self) -> None:
        from undo_cli.urls import base_urls

        if not isinstance(self.teacher_base_url, (str, list, tuple, type(None))) or (
                isinstance(self.teacher_base_url, (list, tuple)) and not all(isinstance(u, str) for u in self.teacher_base_url)):
            raise UndoError(f"teacher_base_url = {self.teacher_base_url!r}: expected a URL or a list of URLs",
                            hint='e.g. teacher_base_url = ["http://node1:8000/v1", "http://node2:8000/v1"]')
        self.teacher_base_url = base_urls(self.teacher_base_url) or None
        from undo_cli.backends import SERVED

        if self.teacher_base_url and self.teacher_backend not in SERVED:
            raise UndoError(f"teacher_base_url is for teacher_backend {', '.join(SERVED)}",
                            hint="add --teacher-backend openai")

    def _check_economy(self) -> None:
        """The [prices] table under price_input/price_output, then the economy's own checks (economy/options.py)."""
        unknown = set(self.prices) - {"input", "output"}
        if unknown:
            raise UndoError(f"prices: unknown key {', '.join(sorted(unknown))}",
                            hint="the prices table has input and output, per million tokens")
        for key, value in self.prices.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UndoError(f"prices.{key} = {value!r}: expected a number >= 0")
        self.price_input = self.price_input if self.price_input is not None else self.prices.get("input")
        self.price_output = self.price_output if self.price_output is not None else self.prices.get("output")
        self.check_economy_options()

    def _check_teachers(self) -> None:
        """[[teachers]] and [teacher_routes] (their shapes were checked where they were read, loop/settings.py):
        the first teacher is `teacher`, and routes name teachers that exist."""
        from undo_cli.economy.cascade import parse_route, tier_from_mapping

        tiers = [tier_from_mapping(t, f"teachers[{i + 1}]") for i, t in enumerate(self.teachers)]
        if tiers and tiers[0].model != self.teacher:
            raise UndoError(f"teacher = {self.teacher!r} but the first of the teachers tables has model = "
                            f"{tiers[0].model!r}", hint="the first of the teachers is the teacher: drop the teacher "
                                                       "key, or make the two the same")
        names = [t.name for t in tiers] or [self.teacher]
        if len(set(names)) != len(names):
            raise UndoError(f"teachers: two tables are named '{next(n for n in names if names.count(n) > 1)}'",
                            hint="give each teachers table its own name = \"...\"")
        for key, value in self.teacher_routes.items():
            listed = value if isinstance(value, list) else [value]
            parse_route(f"{key}={','.join(map(str, listed))}", names, "teacher_routes:")

    def cascade_settings(self) -> dict[str, Any]:
        """The teacher stages' cascade fields (economy/cascade.py) from [[teachers]] and [teacher_routes]."""
        from undo_cli.economy.cascade import tier_from_mapping

        if not self.teachers and not self.teacher_routes:
            return {}
        tiers = [tier_from_mapping(t, f"teachers[{i + 1}]") for i, t in enumerate(self.teachers)]
        routes = [f"{k}={','.join(v if isinstance(v, list) else [v])}" for k, v in self.teacher_routes.items()]
        return {"cascade": [t.spec() for t in tiers] or None, "route": routes or None}

    def _check_lora(self) -> None:
        lora = int(self.train.get("lora_r") or 0) > 0 and not self.train.get("merge")
        if lora and self.init == "previous":
            raise UndoError("init = previous needs a full model to continue from, but train.lora_r without train.merge "
                            "saves only an adapter", hint="add --train.merge (or use init base)")
        if lora and self.student_backend != "hf":
            raise UndoError(f"student_backend {self.student_backend} cannot apply a LoRA adapter",
                            hint="add --train.merge, or evaluate with student_backend hf")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / str(self.name)

    def settings(self, table: str) -> dict[str, Any]:
        """A stage table with the loop's defaults (seed, trust_remote_code) under the user's values."""
        from undo_cli.loop.settings import effective_settings

        loop_defaults: dict[str, Any] = {"seed": self.seed}
        if self.verify == "steps" and table in ("generate", "refine"):
            loop_defaults["verify"] = "steps"  # a [generate]/[refine] verify of its own still wins
        return effective_settings(table, getattr(self, table), loop_defaults)

    @property
    def student_verify(self) -> str:
        """How the student's answers are read: `steps` checks the teacher's rationales, the student is read
        strictly, so accuracy means the same with and without it and two runs compare on one measure."""
        return "strict" if self.verify == "steps" else self.verify

    def identity(self) -> dict[str, Any]:
        """What must not change on --resume: the identifying top-level keys and, per stage table, the identifying
        fields with their defaults filled in (undo_cli/identity.py)."""
        from undo_cli.identity import identity_names
        from undo_cli.loop.settings import STAGES, stage_class

        top = {k: getattr(self, k) for k in identity_names(type(self)) if k not in STAGES}
        if self.teachers:  # which models, not their prices, budgets or servers (economy/cascade.py)
            from undo_cli.economy.cascade import tier_from_mapping

            top["teachers"] = [tier_from_mapping(t, "teachers").identity() for t in self.teachers]
        tables = {}
        for table in STAGES:
            names = set(identity_names(stage_class(table)))
            tables[table] = {k: v for k, v in self.settings(table).items() if k in names}
        return {**top, **tables}

    def default_identity(self) -> dict[str, Any]:
        """identity() as it would be with every setting at its default (flattened: `train.lr`)."""
        from undo_cli.identity import defaults, flatten, identity_names
        from undo_cli.loop.settings import STAGES, effective_settings, stage_class

        top = {k: v for k, v in defaults(type(self)).items() if k not in STAGES}
        tables = {}
        for table in STAGES:
            names = set(identity_names(stage_class(table)))
            tables[table] = {k: v for k, v in effective_settings(table, {}, {"seed": top.get("seed", 0)}).items()
                             if k in names}
        return flatten({**top, **tables})


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip("-.") or "model"


# --- the stages, each a call to the stage's own run() ----------------------------------------

class Loop:
    """One run: builds each stage's config from the run config and runs it through the run folder's bookkeeping."""

    def __init__(self, config: IterateConfig, folder, launcher=None):
        from undo_cli.loop.layout import RunLayout

        self.config = config
        self.folder = folder
        self.layout = RunLayout(folder.path)
        self.step_key = self.layout.step_key
        self.launcher = launcher  # a stages.slurm.SlurmLauncher, or None: every stage runs here

    def step(self, key: str, stage: str, cfg, outputs: dict[str, str | None]) -> dict[str, Any]:
        """One step of the run: the stage here, or on Slurm its shards (a job array) or its job; a teacher
        stage within the budget. What runs, what the manifest keeps and whether the budget applies is the
        stage's StageSpec (stages/spec.py). A stage run here says its errors in the loop's terms."""
        from undo_cli.loop.usage import within_budget
        from undo_cli.stages.spec import stage as spec_of

        spec = spec_of(stage)
        if self.launcher is not None and spec.heavy:
            work = (lambda: self.launcher.run_sharded(key, spec.name, cfg)) if spec.sharded else \
                (lambda: self.launcher.run_train(key, cfg))
        else:
            work = in_config_terms(spec.name, lambda: spec.run(cfg))
        fn = (lambda: within_budget(key, work())) if spec.teacher else work
        return self.folder.step(key, fn, outputs=outputs, keep=spec.keep)

    def teacher_kwargs(self, key: str) -> dict[str, Any]:
        from undo_cli.loop.usage import teacher_settings

        from undo_cli.loop.usage import tier_budgets

        c = self.config
        first = c.teachers[0] if c.teachers else {}
        cascade = tier_budgets(c.cascade_settings(), self.folder.manifest, key)
        return {"teacher": c.teacher, "backend": first.get("backend") or c.teacher_backend,
                "base_url": first.get("base_url") or c.teacher_base_url,
                "api_key_env": first.get("api_key_env") or c.teacher_api_key_env,
                "trust_remote_code": c.trust_remote_code, **teacher_settings(c, self.folder.manifest, key), **cascade}

    # Each `*_config` builds a stage's config exactly as the loop runs it; `check_stages` builds them all
    # before any work, so a bad value in any table stops the run before the teacher writes a line.

    def cluster_config(self):
        from undo_cli.stages import cluster

        problems = list(dict.fromkeys((self.config.train_file, self.config.val_file)))
        return cluster.ClusterConfig(problems=problems, output=str(self.layout.clusters),
                                     **self.config.settings("cluster"))

    def generate_config(self):
        from undo_cli.stages import generate

        return generate.GenerateConfig(**self.teacher_kwargs(self.step_key(0, "generate")),
                                       input=self.config.train_file,
                                       output=str(self.layout.rationales()), iteration=0,
                                       **self.config.settings("generate"))

    def refine_config(self, k: int):
        from undo_cli.stages import refine

        settings = self.config.settings("refine")
        # The round before's errors tell --select clusters which clusters the last refinements fixed.
        previous = str(self.layout.errors(k - 2)) if k >= 2 and settings.get("select") == "clusters" else None
        return refine.RefineConfig(**self.teacher_kwargs(self.step_key(k, "refine")),
                                   errors=str(self.layout.errors(k - 1)),
                                   targets=str(self.layout.training_data(k - 1)), output=str(self.layout.refined(k)),
                                   clusters=str(self.layout.clusters), previous_errors=previous,
                                   iteration=k, **settings)

    def mix_config(self, k: int):
        from undo_cli.stages import mix

        return mix.MixConfig(base=str(self.layout.training_data(k - 1)), refined=str(self.layout.refined(k)),
                             output=str(self.layout.training_data(k)), mode=self.config.mix)

    def train_config(self, k: int):
        from undo_cli.stages import train

        start = self.config.student if self.config.init == "base" or k == 0 else str(self.layout.student(k - 1))
        # resume=True: a fresh folder starts from step 0, a killed run continues from its last
        # checkpoint, a finished one (manifest not yet updated when killed) returns at once.
        return train.TrainConfig(student=start, data=str(self.layout.training_data(k)),
                                 output=str(self.layout.student(k)), resume=True,
                                 trust_remote_code=self.config.trust_remote_code, **self.config.settings("train"))

    def evaluate_config(self, k: int, split: str, trained: dict[str, Any] | None = None):
        from undo_cli.stages import evaluate

        saved = (trained or {}).get("saved") or {}
        model = saved.get("model") or ((trained or {}).get("student") if saved.get("adapter")
                                       else str(self.layout.student(k)))
        return evaluate.EvaluateConfig(
            model=model, adapter=None if saved.get("model") else saved.get("adapter"),
            input=self.config.val_file if split == "val" else self.config.test_file,
            output=str(self.layout.predictions(k, split)), metrics=str(self.layout.metrics(k, split)),
            backend=self.config.student_backend, trust_remote_code=self.config.trust_remote_code,
            verify=self.config.student_verify, **self.config.settings("evaluate"))

    def collect_errors_config(self, k: int):
        from undo_cli.stages import collect_errors

        return collect_errors.CollectErrorsConfig(predictions=str(self.layout.predictions(k, "val")),
                                                  output=str(self.layout.errors(k)),
                                                  **self.config.settings("collect_errors"))

    # Each method runs one stage (or skips it when the manifest says done) and returns its summary.

    def cluster(self) -> dict[str, Any]:
        cfg = self.cluster_config()
        return self.step(self.step_key(0, "cluster"), "cluster", cfg, {"clusters": cfg.output})

    def generate(self) -> dict[str, Any]:
        cfg = self.generate_config()
        summary = self.step(self.step_key(0, "generate"), "generate", cfg, {"rationales": cfg.output})
        if not summary.get("kept_total"):
            raise UndoError(f"the teacher wrote no verified rationale for {self.config.train_file}: nothing to train on",
                            hint=f"read {self.layout.rejected()}; sample more "
                                 "(--generate.n 4 --generate.temperature 0.7) or use a stronger teacher")
        return summary

    def refine(self, k: int) -> dict[str, Any]:
        cfg = self.refine_config(k)
        return self.step(self.step_key(k, "refine"), "refine", cfg, {"refined": cfg.output})

    def mix(self, k: int) -> dict[str, Any]:
        cfg = self.mix_config(k)
        return self.step(self.step_key(k, "mix"), "mix", cfg, {"train_data": cfg.output})

    def train(self, k: int) -> dict[str, Any]:
        cfg = self.train_config(k)
        return self.step(self.step_key(k, "train"), "train", cfg, {"student": cfg.output})

    def evaluate(self, k: int, split: str) -> dict[str, Any]:
        trained = (self.folder.stage(self.step_key(k, "train")) or {}).get("summary", {})
        cfg = self.evaluate_config(k, split, trained)
        key = self.step_key(k, split if split == "test" else "evaluate")
        return self.step(key, "evaluate", cfg, {"predictions": cfg.output, "metrics": cfg.metrics})

    def collect_errors(self, k: int) -> dict[str, Any]:
        cfg = self.collect_errors_config(k)
        return self.step(self.step_key(k, "collect_errors"), "collect_errors", cfg, {"errors": cfg.output})

    # --- the loop ---------------------------------------------------------------------------

    def finished(self, k: int) -> bool:
        """Did an earlier attempt finish iteration k (its errors collected)?"""
        stage = self.folder.stage(self.step_key(k, "collect_errors"))
        return bool(stage) and stage.get("status") == "done"

    def iteration(self, k: int) -> dict[str, Any]:
        names = ["cluster", "generate"] if k == 0 else ["refine", "mix"]
        names += ["train", "evaluate", "collect_errors"]
        self.folder.plan([self.step_key(k, n) for n in names], {})
        from undo_cli.console import console

        console.rule(f"[bold cyan]UNDO iteration {k}[/bold cyan]" + (" (one-shot distillation)" if k == 0 else ""))
        if k == 0:
            self.cluster()
            self.generate()
        else:
            self.refine(k)
            self.mix(k)
        self.train(k)
        metrics = self.evaluate(k, "val")
        errors = self.collect_errors(k)
        outcomes = read_outcomes(self.layout.predictions(k, "val"))
        return {"accuracy": metrics["accuracy"], "errors": errors["errors"], "outcomes": outcomes}


def decide(history: list[dict[str, Any]], config: IterateConfig,
           paid: dict[int, int] | None = None) -> tuple[int, str | None]:
    """(best iteration, why to stop or None) from the validation results so far.

    Best = choose.choose's: a later iteration only when a paired test on the
    same validation items says it is better (choose_alpha, choose_min_gain).
    For stopping, an iteration *improves* when its raw accuracy beats the best
    so far by at least min_delta (and by something at all when min_delta is 0).
    """
    accs = [h["accuracy"] for h in history]
    best = choice(history, config)[0]
    reference, last_gain = accs[0], 0
    for i in range(1, len(accs)):
        if accs[i] > reference and accs[i] - reference >= config.min_delta - 1e-12:
            reference, last_gain = accs[i], i
    k = len(accs) - 1
    if history[-1]["errors"] == 0:
        return best, "the student answered every validation question correctly: nothing left to refine"
    if config.stop_rule != "patience":  # paired / value: loop/stop.py (paid: teacher tokens per iteration)
        from undo_cli.loop.stop import rounds, should_stop

        reason = should_stop(config.stop_rule, rounds(history, choice(history, config)[1], paid or {}),
                             config.patience, config.stop_min_gain_per_ktok)
        if reason:
            return best, reason
    elif k - last_gain >= config.patience and k > 0:
        rounds = f"{config.patience} iteration{'s' if config.patience > 1 else ''}"
        if config.min_delta > 0:
            return best, f"no validation gain of at least {config.min_delta:g} for {rounds}"
        return best, f"validation accuracy did not improve for {rounds}"  # min_delta 0: any gain counts
    if k >= config.max_iterations:
        return best, f"reached max_iterations ({config.max_iterations})"
    return best, None


def choice(history: list[dict[str, Any]], config: IterateConfig) -> tuple[int | None, list[dict[str, Any]]]:
    """(best iteration, the paired comparisons that chose it) from the iterations' validation outcomes."""
    return choose([h.get("outcomes") for h in history], config.choose_alpha, config.choose_min_gain)


# --- checks before any work, --dry-run, what a changed setting reruns ----------------------------

class _Unopened:
    """A stand-in for the run folder: the configs only need its path (nothing is created)."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict[str, Any] = {}  # no run yet: no budget spent

    def stage(self, key: str) -> None:  # nothing has run
        return None


def _config_words(table: str):
    """How `undo iterate` names a stage's setting: `train.lr`, or the loop's own key for a field the loop sets
    itself (generate's `backend` is `teacher_backend`)."""
    from undo_cli.loop.settings import OWNED

    owned = {**OWNED.get(table, {}), **({"mode": "mix"} if table == "mix" else {})}

    def name(field: str) -> str:
        if field in owned and not owned[field].startswith("("):
            return owned[field].split(" ")[0]
        return f"{table}.{field}"
    return name


def _in_config_terms(table: str, exc: UndoError, *, where_always: bool = True) -> UndoError:
    """A stage's error in the loop's terms: `train.lr`, not `undo train`'s `--lr`.

    Settings named with `ref()` (every config check) are worded here; a message a stage writes while it runs
    may still name a flag as text (`lower --max-tokens to ...`): a flag of that stage is renamed too.
    where_always: add where such keys are set even when the message names none (the checks before any
    work are all about settings; an error while a stage runs, a server down say, may not be).
    """
    from undo_cli.errors import word
    from undo_cli.loop.settings import OWNED, stage_class

    name = _config_words(table)
    known = {f.name for f in dataclasses.fields(stage_class(table))} if table != "mix" else {"mode"}
    known |= set(OWNED.get(table, {}))

    def loop_terms(text: str | None) -> str | None:
        text = word(text, name)
        return None if text is None else re.sub(  # a stage's flag written as text
            r"(?<![\w-])--([a-z][a-z0-9-]*)",
            lambda m: name(m.group(1).replace("-", "_")) if m.group(1).replace("-", "_") in known else m.group(0), text)

    message, hint = loop_terms(exc._text[0]) or "", loop_terms(exc._text[1])
    where = f"set in the config's {table} table or with --{table.replace('_', '-')}.KEY"
    if not where_always and (message, hint) == (exc.message, exc.hint):
        return exc  # nothing about a stage option in it: as the stage said it
    return UndoError(message, hint=f"{hint}; {where}" if hint else where, setting=exc.setting)


def in_config_terms(table: str, fn):
    """`fn` (a stage's run), its errors about the stage's options said in the loop's terms: `lower --max-tokens`
    from `undo refine` is `lower refine.max_tokens` here, where `--max-tokens` is no flag of `undo iterate`."""
    def run():
        try:
            return fn()
        except UndoError as exc:
            raise _in_config_terms(table.replace("-", "_"), exc, where_always=False) from None
    return run


def check_stages(config: IterateConfig) -> None:
    """Build every stage's config (iteration 0 and a refinement round) and its templates: fails before any work.

    Each stage checks its own values in its config's `__post_init__`; building them all here means
    `[train] lr = -1` is refused before the teacher has generated anything, in terms of the config
    key (`train.lr`), not of `undo train`'s flag (`--lr`): the error names its settings with `ref`
    (errors.py), and is worded here.
    """
    from undo_cli.model_refs import to_be_written
    from undo_cli.prompts import load_template

    loop = Loop(config, _Unopened(config.run_dir))
    builders = [("cluster", loop.cluster_config), ("generate", loop.generate_config),
                ("train", lambda: loop.train_config(0)),
                ("evaluate", lambda: loop.evaluate_config(0, "val")),
                ("collect_errors", lambda: loop.collect_errors_config(0))]
    if config.max_iterations > 0:
        builders += [("refine", lambda: loop.refine_config(1)), ("mix", lambda: loop.mix_config(1)),
                     ("train", lambda: loop.train_config(1))]
    for table, build in builders:
        try:
            with to_be_written(config.run_dir):  # the students of later stages do not exist yet
                cfg = build()
            for attr in ("prompt", "template"):
                if getattr(cfg, attr, None):
                    try:
                        load_template(getattr(cfg, attr))
                    except UndoError as exc:
                        raise UndoError(f"{table}.{attr}: {exc.message}", hint=exc.hint) from None
        except UndoError as exc:
            raise _in_config_terms(table, exc) from None


_EVERY_STAGE = frozenset({"cluster", "generate", "refine", "mix", "train", "evaluate", "collect_errors", "test"})
# Which stages' results an input changes (manifest.json's inputs: the files' sha256, the models' fingerprints).
# A top-level key says it in its field's metadata (`affects`).
_INPUT_AFFECTS: dict[str, frozenset[str]] = {
    "inputs.train": frozenset({"cluster", "generate"}), "inputs.val": frozenset({"cluster", "evaluate"}),
    "inputs.test": frozenset({"test"}),
    "inputs.teacher": frozenset(TEACHER_STAGES), "inputs.student": frozenset({"train"}),
    "inputs.teachers": frozenset(TEACHER_STAGES),
}


def affected_stages(key: str) -> frozenset[str]:
    """The stage names (`train`, `test`, ...) whose results depend on a config key or input (`train.lr`).

    A stage table's key changes that stage (the evaluate table also makes the test predictions); a top-level
    key the stages its field's `affects` names (the stopping rule: none, so a finished run can be extended
    with --resume --max-iterations N); an input, `_INPUT_AFFECTS`; anything else, every stage.
    """
    import dataclasses

    from undo_cli.loop.settings import STAGES

    head = key.split(".", 1)[0]
    if head in STAGES:  # the evaluate table also makes the test predictions; refine reads the clusters
        return frozenset({"evaluate", "test"} if head == "evaluate" else {"cluster", "refine"} if head == "cluster"
                         else {head})
    if key in _INPUT_AFFECTS:
        return _INPUT_AFFECTS[key]
    meta = {f.name: f.metadata for f in dataclasses.fields(IterateConfig)}.get(key, {})
    return frozenset(meta["affects"]) if "affects" in meta else _EVERY_STAGE


def plan(config: IterateConfig) -> list[tuple[str, str, str]]:
    """(stage key, what it does, the files it writes) for every stage the run may reach, in order."""
    from undo_cli.model_refs import to_be_written

    with to_be_written(config.run_dir):
        return _plan(config, Loop(config, _Unopened(config.run_dir)))


def _plan(config: IterateConfig, loop: "Loop") -> list[tuple[str, str, str]]:
    rows = [("iter_00/cluster", "train_file and val_file's questions in clusters, once", loop.cluster_config().output),
            ("iter_00/generate", "the teacher's rationales for train_file", loop.generate_config().output)]
    for k in range(config.max_iterations + 1):
        if k:
            rows += [(loop.step_key(k, "refine"), f"the teacher re-teaches iteration {k - 1}'s errors",
                      loop.refine_config(k).output),
                     (loop.step_key(k, "mix"), f"refined rationales {config.mix} the old ones", loop.mix_config(k).output)]
        ev = loop.evaluate_config(k, "val")
        rows += [(loop.step_key(k, "train"), "train the student" + (" (from the previous one)" if k and config.init ==
                                                                 "previous" else ""), loop.train_config(k).output),
                 (loop.step_key(k, "evaluate"), f"the student on val_file (--verify {config.student_verify})",
                  f"{ev.output}, {ev.metrics}"),
                 (loop.step_key(k, "collect_errors"), "its validation errors", loop.collect_errors_config(k).output)]
    rows.append(("iter_XX/test", "the best and the iteration-0 students on test_file, once each",
                 str(config.run_dir / "iter_XX" / "test" / "predictions.jsonl")))
    return rows


def dry_run(config: IterateConfig, origins: dict[str, str] | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Every setting (with where it came from: default, file or flag), the plan and an upper bound of iteration
    0's teacher tokens (economy/estimate.py), printed as tables on stderr unless `quiet`; load no model.
    Returns the same as a dict (`undo iterate --dry-run --format json` prints it)."""
    from undo_cli.loop.settings import STAGES

    check_stages(config)
    origins = origins or {}
    settings: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                if f.name not in STAGES}
    for table in STAGES:
        for key, value in config.settings(table).items():
            settings[f"{table}.{key}"] = value
    shown = {"settings": settings, "origins": origins, "plan": plan(config),
             "teacher_estimate": estimate_iteration0(config)}
    if not quiet:
        _print_dry_run(config, shown)
    return shown


def _origin(key: str, origins: dict[str, str]) -> str:
    origin = origins.get(key)
    if origin is None and key.endswith(".seed") and key.split(".")[0] not in (
            k.split(".")[0] for k in origins if k.endswith(".seed")):
        return "default (the loop's seed)" if origins.get("seed") is None else "flag/file (the loop's seed)"
    return origin or ("default (from name: <student>-from-<teacher>)" if key == "name" else "default")


def _print_dry_run(config: IterateConfig, shown: dict[str, Any]) -> None:
    from rich.table import Table

    from undo_cli.console import console
    from undo_cli.economy.estimate import describe as describe_estimate
    from undo_cli.economy.estimate import describe_tiers

    def table(title: str, columns: tuple[str, ...], rows) -> None:
        # The first column (a key, a stage) never wraps: a key cut mid-word cannot be searched for or pasted.
        t = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            t.add_column(col, no_wrap=i == 0, overflow="fold")
        for row in rows:
            t.add_row(*row)
        console.print(t)

    table(f"undo iterate --dry-run: {config.run_dir}", ("key", "value", "from"),
          [(key, repr(value), _origin(key, shown["origins"])) for key, value in shown["settings"].items()])
    table("plan (stops early when validation accuracy stops improving)", ("stage", "what", "writes"), shown["plan"])
    table("teacher tokens of iteration 0 (generate over train_file): an UPPER BOUND, before any call",
          ("what", "value"), describe_estimate(shown["teacher_estimate"]) + describe_tiers(
              shown["teacher_estimate"].get("tiers") or []))
    if (config.run_dir / "manifest.json").is_file():
        console.print(f"{config.run_dir} already holds a run: add --resume to continue it or --overwrite to start over")
    console.print("nothing was run (--dry-run); drop --dry-run to start; --format json prints all this on stdout")


def estimate_iteration0(config: IterateConfig) -> dict[str, Any]:
    """Upper bound of iteration 0's teacher tokens (and cost, with prices): its generate stage, as the loop runs it."""
    from undo_cli.economy.estimate import estimate_generate
    from undo_cli.model_refs import to_be_written
    from undo_cli.stages.generate import work_items

    with to_be_written(config.run_dir):
        cfg = Loop(config, _Unopened(config.run_dir)).generate_config()
    prompts = [item.messages for item in work_items(cfg)[2]]  # what generate would send, in order
    estimate = {"stage": "iter_00/generate", **estimate_generate(
        prompts, cfg, max_teacher_tokens=config.max_teacher_tokens, max_cost=config.max_cost,
        trust_remote_code=config.trust_remote_code)}
    if cfg.cascade:  # a teacher cascade: each tier's bound (economy/estimate.py)
        from undo_cli.economy.estimate import estimate_tiers

        estimate["tiers"] = estimate_tiers(prompts, cfg, trust_remote_code=config.trust_remote_code)
    return estimate


def _inputs(config: IterateConfig) -> dict[str, Any]:
    from undo_cli.loop.manifest import model_fingerprint
    from undo_cli.records import sha256_file

    files = {key: {"path": getattr(config, f"{key}_file"), "sha256": sha256_file(getattr(config, f"{key}_file"))}
             for key in ("train", "val", "test")}
    more = {}
    if config.teachers[1:]:  # compared as one fingerprint (manifest.py compares an input's dict)
        from undo_cli.stages.generation_loop import digest

        more = {"teachers": {"fingerprint": digest([model_fingerprint(t["model"]) for t in config.teachers[1:]])}}
    return {**files, "teacher": model_fingerprint(config.teacher), "student": model_fingerprint(config.student),
            **more}  # a cascade's other teachers: retrained weights at the same path rerun the teacher stages


def _iterate_command(command: list[str] | None, drop: dict[str, bool], add: list[str]) -> str | None:
    """`undo iterate ARGS` with flags dropped and added: ARGS are `command` (the equivalent arguments a caller such
    as `undo demo` gave), else this process's own when it is `undo iterate`; None when neither is known."""
    from undo_cli.invocation import drop_flags, rerun

    drop = {"--resume": False, "--overwrite": False, **drop}
    if command is not None:
        return "undo iterate " + shlex.join(drop_flags(command, drop) + add)
    return rerun("iterate", drop=drop, add=add)


def _resume_command(command: list[str] | None = None) -> str:
    """The command that continues this run: the one that was run, plus --resume."""
    # Called from elsewhere without its arguments (a test, a script): say it in words.
    return _iterate_command(command, {}, ["--resume"]) or "the same `undo iterate` command with --resume"


def more_rounds(config: IterateConfig, history: list[dict[str, Any]], command: list[str] | None = None) -> str | None:
    """The command that runs one more refinement round on a finished run, or None when none can help.

    `--resume --max-iterations N` alone is not enough after the patience ran out: the rule would stop
    again at once. So it raises whichever of the two stopped the run, just enough for one more round.
    """
    k = len(history) - 1
    if not history or history[-1]["errors"] == 0:
        return None  # nothing left to refine
    accs = [h["accuracy"] for h in history]
    reference, last_gain = accs[0], 0
    for i in range(1, len(accs)):  # as decide() counts it
        if accs[i] > reference and accs[i] - reference >= config.min_delta - 1e-12:
            reference, last_gain = accs[i], i
    add = ["--resume", "--max-iterations", str(max(config.max_iterations, k + 1))]
    if k - last_gain >= config.patience:
        add += ["--patience", str(k - last_gain + 1)]
    return _iterate_command(command, {"--max-iterations": True, "--patience": True}, add)


def run(config: IterateConfig, *, resume: bool = False, overwrite: bool = False,
        command: list[str] | None = None, resume_with: str | None = None) -> dict[str, Any]:
    """Run (or resume) the loop; returns the summary, also written to runs/NAME/summary.json.

    command: `undo iterate`'s arguments that reproduce this run (what `undo demo` runs in process), for the
    commands its hints print; default: this process's command line when it is `undo iterate`.
    resume_with: the command that continues a stopped run, when it is not `undo iterate` (`undo demo --resume`).
    """
    if resume and overwrite:
        raise UndoError("--resume and --overwrite contradict each other",
                        hint="--resume continues the run; --overwrite deletes it and starts over")
    _preflight(config, overwrite=overwrite)
    folder = _open_folder(config, resume=resume, overwrite=overwrite)
    loop = Loop(config, folder, _launcher(config, folder))
    try:
        history, best, stop, budget_stop = _iterate(loop)
        # Held-out test: the best student and the one-shot student, evaluated once each.
        for i in sorted({best, 0}) if best is not None else []:
            loop.evaluate(i, "test")
    except BaseException as exc:
        _stopped(folder, exc, resume_with or _resume_command(command))
        raise
    summary = _finish(folder, best, stop)
    more = more_rounds(config, history, command) if history and not budget_stop else None
    if more:
        from undo_cli.console import console

        console.print(f"more rounds: {more}", markup=False, highlight=False, soft_wrap=True)
    return summary


def _preflight(config: IterateConfig, *, overwrite: bool) -> None:
    """Everything that can be refused before the run folder exists and before any model loads."""
    from undo_cli.model_refs import check_hub_reachable
    from undo_cli.records import read_records

    check_stages(config)  # every table
    from undo_cli.backends import SERVED

    if config.teacher_backend not in SERVED:  # a hub name with the hub unreachable: one line now, not mid-run
        check_hub_reachable(config.teacher, "teacher")
    check_hub_reachable(config.student, "student")
    if config.launcher == "slurm":  # off Slurm, fail without leaving a run folder behind
        from undo_cli.stages.slurm import check_slurm

        check_slurm()
    for path in dict.fromkeys((config.train_file, config.val_file, config.test_file)):
        read_records(path, "problem")  # a bad line fails here, file:line:field
    if overwrite or not (config.run_dir / "manifest.json").is_file():  # before iteration 0: tokenizers, templates,
        from undo_cli.stages.check import preflight                     # context (stages/check.py, `undo check`)

        preflight(config)


def _open_folder(config: IterateConfig, *, resume: bool, overwrite: bool):
    from undo_cli.console import console
    from undo_cli.loop.manifest import RunFolder
    from undo_cli.loop.settings import STAGES

    seeds = {"seed": config.seed, **{t: config.settings(t).get("seed") for t in STAGES}}
    folder = RunFolder.open(config.run_dir, config=config.identity(), inputs=_inputs(config), seeds=seeds,
                            resume=resume, overwrite=overwrite, affects=affected_stages,
                            defaults=config.default_identity())
    # A resumed run has not stopped (yet): the tables printed along the way must not repeat the last reason.
    folder.manifest.pop("stop_reason", None)
    console.print(f"run folder: {folder.path}  (teacher {config.teacher}, student {config.student}, "
                  f"mix {config.mix}, init {config.init})")
    return folder


def _launcher(config: IterateConfig, folder):
    if config.launcher != "slurm":
        return None
    from undo_cli.stages.slurm import SlurmConfig, SlurmLauncher

    return SlurmLauncher(SlurmConfig(**config.slurm), folder)


def _iterate(loop: Loop) -> tuple[list[dict[str, Any]], int | None, str, bool]:
    """Iterations until the stopping rule (or the teacher budget) says stop:
    (each iteration's validation result, the best iteration, why it stopped, whether the budget stopped it)."""
    from undo_cli.console import console
    from undo_cli.loop import report, run_state

    folder, config = loop.folder, loop.config
    history: list[dict[str, Any]] = []
    k, best, budget_stop = 0, None, False
    while True:
        try:
            history.append(loop.iteration(k))
        except BudgetReached as exc:  # what finished is kept; --resume with a higher budget continues
            stop, budget_stop = exc.reason, True
            console.print(f"[bold]stopping:[/bold] {stop}")
            record_usage(folder)
            break
        from undo_cli.loop.stop import describe as describe_round
        from undo_cli.loop.stop import rounds
        from undo_cli.loop.usage import usage_by_iteration

        paid = {r["iteration"]: r["paid"]["tokens"] for r in usage_by_iteration(folder.path)["iterations"]}
        best, stop = decide(history, config, paid)
        table = rounds(history, choice(history, config)[1], paid)
        folder.manifest["stop"] = {"rule": config.stop_rule, "patience": config.patience,
                                   "min_gain_per_ktok": config.stop_min_gain_per_ktok, "rounds": table}
        if stop and loop.finished(k + 1):
            # An earlier attempt, under another stopping rule, finished iteration k+1: a resume never
            # un-counts what finished, so the best is decided over every finished iteration.
            stop = None
        folder.manifest.update(best_iteration=best, iterations_done=k + 1,
                               choice={"alpha": config.choose_alpha, "min_gain": config.choose_min_gain,
                                       "tests": choice(history, config)[1]})
        record_usage(folder)
        state = run_state.collect(folder.path)
        run_state.write_summary(folder.path, state)
        if stop:  # the table comes once, finished, after the test evaluation (_finish)
            console.print(f"[bold]stopping:[/bold] {stop}; best iteration: {best} (stop_rule {config.stop_rule})")
            for row in table:  # what each round cost and proved (loop/stop.py)
                console.print("  " + describe_round(row), markup=False, highlight=False, soft_wrap=True)
            break
        if not loop.finished(k + 1):  # a resume replaying finished iterations shows the table once, at the last
            # The rows the decision has seen: an earlier attempt's later iteration is not yet decided on here.
            report.print_table({**state, "rows": [r for r in state["rows"] if r["iteration"] <= k]},
                               title=f"{folder.path.name}: iterations so far")
        k += 1
    folder.manifest["stop_reason"] = stop
    folder.save()
    return history, best, stop, budget_stop


def _stopped(folder, exc: BaseException, resume_with: str) -> None:
    """A run that stopped on an error or Ctrl-C: the manifest says so, and the user how to go on."""
    from rich.markup import escape

    from undo_cli.console import console

    interrupted = isinstance(exc, KeyboardInterrupt)
    if folder.manifest.get("status") == "running":  # failed outside a stage (e.g. no verified rationale)
        folder.finish("interrupted" if interrupted else "failed",
                      error=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
    what = "interrupted" if interrupted else "stopped by an error"
    # Printed before the error itself (main() prints that): what finished is kept, and how to go on.
    console.print(f"[yellow]{escape(str(folder.path))}: {what}; every finished stage is kept. Continue with:"
                  f"[/yellow] {escape(resume_with)}" + ("" if interrupted else
                                                              " (after fixing the cause; changed settings are "
                                                              "allowed for stages that have not finished)"),
                  highlight=False)


def _finish(folder, best: int | None, stop: str) -> dict[str, Any]:
    from undo_cli.console import console
    from undo_cli.loop import report, run_state

    folder.finish("done", best_iteration=best, stop_reason=stop)
    state = run_state.collect(folder.path)
    summary = run_state.write_summary(folder.path, state)
    report.print_table(state, title=f"{folder.path.name}: UNDO run finished")
    report.print_verdict(summary)
    console.print(f"next: undo report {shlex.quote(str(folder.path))}", markup=False, highlight=False, soft_wrap=True)
    return summary

