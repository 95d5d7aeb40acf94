"""One round of `undo iterate`, stage by stage, and the decision after it.

    Loop(config, folder).iteration(k)     # k = 0: cluster, generate; k >= 1: refine, mix; then train, evaluate, collect_errors
    decide(history, config)               # (the best iteration, why to stop or None)

`Loop` builds each stage's config from the run's settings (loop/config.py) exactly as the loop runs it and runs
the stage through the run folder's bookkeeping (loop/manifest.py), here or under Slurm; `decide` and `choice`
read the validation results so far (loop/choose.py, loop/stop.py).
"""

from __future__ import annotations

from typing import Any

from undo_cli.errors import UndoError
from undo_cli.loop.choose import choose, read_outcomes
from undo_cli.loop.config import IterateConfig
from undo_cli.loop.terms import in_config_terms


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
