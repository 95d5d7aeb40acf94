"""`undo iterate`'s settings, declared once: `IterateConfig` (run.toml's top-level keys, each one flag, and one
table per stage) with its checks, and which stages a changed setting reruns (`affected_stages`).

    undo iterate --config examples/run.toml --train.lr 2e-5 --max-iterations 4   # loop/settings.py fills it

Below every other part of the loop (rounds.py, plan.py, ending.py, iterate.py), which read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.economy.options import TeacherEconomyOptions
from undo_cli.errors import SettingError, UndoError
from undo_cli.fields import check_choices
from undo_cli.loop.choose import ALPHA, MIN_GAIN
from undo_cli.loop.stop import RULES as STOP_RULES


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
