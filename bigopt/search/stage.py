"""The search stage: Ray Tune runs bigopt's trainer over the spec's search space.

Trials share the data artifact, train with ``bigopt.train.trial.tune_trainable`` (one worker in
the trial process, more as a ``TorchTrainer`` inside the trial), and write run dirs of their own
under ``<run>/search/trials/``. Tune's experiment lives in ``<run>/search/tune/`` (a killed
search resumes from it: ``bigopt search SPEC --run-dir RUN --resume latest``). The stage
writes ``search/trials.parquet`` (every trial: config, metrics, status, error, checkpoint, costs),
``search/pareto.json`` (metric against each cost in ``search.objectives``), ``search/best.yaml``
(the best configuration as a ready-to-run job spec at the spec's full training budget) and
plots; its artifact carries the best configuration, which the train stage then trains.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from bigopt.artifacts import DataArtifact, SearchArtifact
from bigopt.resolve import ResolvedJob
from bigopt.runtime import RunDir
from bigopt.search.arch import InvalidPoint, active, arch_space, check_point, spec_values
from bigopt.search.pareto import pareto_front
from bigopt.search.spec import SEED_PATH, reevaluations
from bigopt.spec import JobSpec, SearchSpec, dump_spec, with_values
from bigopt.stages import StageOptions

log = logging.getLogger("bigopt")

MAX_REJECTIONS = 200  # draws in a row the space may refuse before the search gives up


def metric_and_mode(job: ResolvedJob) -> tuple[str, str]:
    """``search.metric``/``mode`` as ``resolve`` decided them (``auto``: the task's default)."""
    assert job.search_metric is not None and job.search_mode is not None
    return job.search_metric, job.search_mode


def to_domain(value: dict[str, Any]) -> Any:
    """``{loguniform: [1e-4, 1e-2]}`` -> ``tune.loguniform(1e-4, 1e-2)`` (validated by the spec)."""
    from ray import tune

    (kind, args), = value.items()
    if kind == "choice":
        return tune.choice(list(args))
    return getattr(tune, kind)(*args)


def tune_space(search: SearchSpec) -> dict[str, Any]:
    """The flat Tune space: hyperparameters by spec path, then the architecture decisions."""
    space = {path: to_domain(domain) for path, domain in search.space.items()}
    if search.arch is not None:
        space.update(arch_space(search.arch))
    return space


def trial_base(spec: JobSpec) -> JobSpec:
    """The spec every trial starts from: no search section, the trial budget applied."""
    assert spec.search is not None
    return with_values(spec.model_copy(update={"search": None}), spec.search.trial)


def build_searcher(search: SearchSpec, space: dict[str, Any], metric: str, mode: str) -> Any:
    from bigopt.search.searchers import EvolutionSearcher, RandomSearcher

    # the last trials re-train the best challengers with a new train.seed (search.reevaluate)
    again = {"reevaluate": reevaluations(search), "seed_key": SEED_PATH,
             "budget": search.num_trials}
    if search.searcher == "evolution":
        e = search.evolution
        return EvolutionSearcher(space, metric, mode, seed=search.seed, population=e.population,
                                 tournament=e.tournament, mutations=e.mutations,
                                 candidates=e.candidates, guided=e.guided,
                                 crossover=e.crossover, canonical=active,
                                 # at least one child: candidates 1 stays the paper's algorithm
                                 fresh=min(e.fresh, e.candidates - 1), **again)
    if search.searcher == "rl":
        from bigopt.search.rl import RLSearcher

        options = {k: v for k, v in search.rl.model_dump().items() if v is not None}
        return RLSearcher(space, metric, mode, seed=search.seed, canonical=active, **options,
                          **again)
    if search.searcher == "random":
        return RandomSearcher(space, metric, mode, seed=search.seed)
    from ray.tune.search.optuna import OptunaSearch

    from bigopt.search.searchers import SkipRepeats

    # TPE re-suggests points it has tried; a bigopt trial would return the same number
    return SkipRepeats(OptunaSearch(space=space, metric=metric, mode=mode, seed=search.seed),
                       canonical=active)


def build_scheduler(search: SearchSpec, space: dict[str, Any], metric: str, mode: str,
                    max_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = search.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    if s.kind == "asha":
        return ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=max_steps,
                             grace_period=min(s.grace_steps, max_steps),
                             reduction_factor=s.reduction_factor)
    mutate = ({p: to_domain(d) for p, d in s.mutate.items()} if s.mutate else
              {p: d for p, d in space.items() if p in ("train.lr", "train.batch_size")})
    if not mutate:
        raise ValueError("search.scheduler.mutate: pbt/pb2 need values to change (train.lr, ...)")
    if s.kind == "pbt":
        return PopulationBasedTraining(
            time_attr="step", metric=metric, mode=mode, perturbation_interval=s.interval_steps,
            quantile_fraction=s.quantile, hyperparam_mutations=mutate, synch=s.synch)
    from ray.tune.schedulers.pb2 import PB2

    bounds = {}
    for path, domain in mutate.items():
        if not hasattr(domain, "lower"):
            raise ValueError(f"search.scheduler.mutate.{path}: pb2 needs a numeric range")
        bounds[path] = [domain.lower, domain.upper]
    return PB2(time_attr="step", metric=metric, mode=mode, perturbation_interval=s.interval_steps,
               quantile_fraction=s.quantile, hyperparam_bounds=bounds, synch=s.synch)


class ValidatingSearcher:
    """Wraps a searcher so that a point the model zoo refuses (or ``max_params`` excludes) is
    rejected before a trial starts: the inner searcher hears of it as a failed trial (it learns
    to avoid such points) and is asked again. Rejections are kept, with the reason, for
    ``trials.parquet``. Built lazily as a Searcher subclass so Ray is imported only here.

    It also keeps the search's trial budget (``max_trials``) and concurrency
    (``max_concurrent``) itself, in place of Tune's ``ConcurrencyLimiter`` and ``num_samples``:
    Tune saves the searcher's state and the experiment's trial table as separate files, so a
    driver killed between the two leaves a searcher state one save older than the trials. The
    limiter then counts a finished trial as running and never suggests again (a resumed search
    hung forever, measured), and the counter starts one trial too many. On resume,
    ``reconcile`` brings this wrapper and the inner searcher level with the trial table (the
    newest ``experiment_state``), which Tune itself resumes from."""

    def __new__(cls, inner: Any, check: Any, max_trials: int, max_concurrent: int) -> Any:
        from ray.tune.search import Searcher

        class _Validating(Searcher):
            STATE_FILE = "bigopt-rejected.json"

            def __init__(self) -> None:
                super().__init__(metric=inner.metric, mode=inner.mode)
                self.inner, self.check = inner, check
                self.max_trials, self.max_concurrent = max_trials, max_concurrent
                self.rejected: list[dict[str, Any]] = []
                self.handed: dict[str, bool] = {}  # trial id -> finished, for every trial begun
                #: the experiment's trials, set by the search stage before a resumed fit
                self.truth: list[dict[str, Any]] | None = None

            def set_search_properties(self, metric: Any, mode: Any, config: Any, **spec: Any) -> bool:
                return self.inner.set_search_properties(metric, mode, config, **spec)

            def suggest(self, trial_id: str) -> Any:
                if len(self.handed) >= self.max_trials:
                    return Searcher.FINISHED
                if sum(not done for done in self.handed.values()) >= self.max_concurrent:
                    return None
                return self._draw(trial_id)

            def _draw(self, trial_id: str) -> Any:
                for attempt in range(MAX_REJECTIONS):
                    config = self.inner.suggest(trial_id if attempt == 0 else f"{trial_id}~{attempt}")
                    if config is None or config == Searcher.FINISHED:
                        return config
                    try:
                        self.check(config)
                    except InvalidPoint as exc:
                        self.rejected.append({"config": config, "reason": str(exc)})
                        self.inner.on_trial_complete(trial_id if attempt == 0 else
                                                     f"{trial_id}~{attempt}", None, error=True)
                        continue
                    if attempt:  # the inner searcher knows it under the attempt's id
                        self._alias[trial_id] = f"{trial_id}~{attempt}"
                    self.handed[trial_id] = False
                    return config
                raise RuntimeError(f"search.space: {MAX_REJECTIONS} points in a row were invalid; "
                                   f"last: {self.rejected[-1]['reason']}")

            @property
            def _alias(self) -> dict[str, str]:
                if not hasattr(self, "_aliases"):
                    self._aliases: dict[str, str] = {}
                return self._aliases

            def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
                self.inner.on_trial_result(self._alias.get(trial_id, trial_id), result)

            def on_trial_complete(self, trial_id: str, result: Any = None, error: bool = False) -> None:
                if trial_id in self.handed:
                    self.handed[trial_id] = True
                self.inner.on_trial_complete(self._alias.pop(trial_id, trial_id), result, error)

            def reconcile(self, trials: list[dict[str, Any]]) -> dict[str, int]:
                """Bring the saved state level with ``trials`` (id, status, config, result, in
                the order Tune created them). Returns what it changed, by kind."""
                changed = {"replayed": 0, "completed": 0, "dropped": 0}
                for t in trials:
                    trial_id = t["trial_id"]
                    if trial_id not in self.handed:  # begun after the searcher state was saved
                        config = self._draw(trial_id)  # the draw the lost state made next
                        if isinstance(config, dict) and config != t["config"] and hasattr(
                                self.inner, "adopt"):
                            self.inner.adopt(self._alias.get(trial_id, trial_id), t["config"])
                        self.handed[trial_id] = False
                        changed["replayed"] += 1
                    if t["status"] in ("TERMINATED", "ERROR") and not self.handed[trial_id]:
                        self.on_trial_complete(trial_id, t["result"], error=t["status"] == "ERROR")
                        changed["completed"] += 1
                recorded = {t["trial_id"] for t in trials}
                for trial_id in [i for i in self.handed if i not in recorded]:
                    # suggested, but the trial table never held it: Tune will not run it
                    if not self.handed.pop(trial_id):
                        self.inner.on_trial_complete(self._alias.pop(trial_id, trial_id), None, error=True)
                    changed["dropped"] += 1
                return changed

            def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
                import os

                self.inner.save_to_dir(checkpoint_dir, session_str)
                tmp = os.path.join(checkpoint_dir, self.STATE_FILE + ".tmp")
                with open(tmp, "w") as f:
                    json.dump({"rejected": self.rejected, "aliases": self._alias,
                               "handed": self.handed}, f)
                os.replace(tmp, os.path.join(checkpoint_dir, self.STATE_FILE))

            def restore_from_dir(self, checkpoint_dir: str) -> None:
                import os

                self.inner.restore_from_dir(checkpoint_dir)
                path = os.path.join(checkpoint_dir, self.STATE_FILE)
                if os.path.exists(path):
                    with open(path) as f:
                        state = json.load(f)
                    self.rejected, self._aliases = state["rejected"], state["aliases"]
                    self.handed = state.get("handed", {})
                if self.truth is not None:
                    changed = self.reconcile(self.truth)
                    if any(changed.values()):
                        log.warning("search state was behind its trial table (the driver died "
                                    "while saving); reconciled: %s", changed)

        return _Validating()


def experiment_trials(fs: Any, tune_dir: str) -> list[dict[str, Any]] | None:
    """The trials of the newest Tune experiment state under ``tune_dir`` (plain JSON): id,
    status, config and last result, in the order Tune created them. None if there is none."""
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(tune_dir, allow_not_found=True))
    states = sorted(i.path for i in infos if i.base_name.startswith("experiment_state-")
                    and i.base_name.endswith(".json"))
    if not states:
        return None
    with fs.open_input_stream(states[-1]) as f:
        state = json.loads(f.readall())
    trials = []
    for meta, runtime in state["trial_data"]:
        meta, runtime = json.loads(meta), json.loads(runtime)
        trials.append({"trial_id": meta["trial_id"], "status": meta["status"],
                       "config": meta.get("config") or {},
                       "result": runtime.get("last_result") or None})
    return trials


def _trial_resources(base: JobSpec) -> dict[str, float]:
    c = base.cluster
    if c.num_workers == 1:  # the trial process trains
        return {"cpu": c.cpus_per_worker, "gpu": c.gpus_per_worker}
    # a TorchTrainer inside the trial reserves its workers itself; the trial process takes no
    # CPU (2 workers x 1 CPU must fit a 2-CPU machine) and a token of memory, because Tune
    # refuses an all-zero request
    return {"cpu": 0, "memory": 2**20}


def search_stage(job: ResolvedJob, inputs: dict[str, Any], run: RunDir,
                 options: StageOptions) -> SearchArtifact:
    from ray import tune

    from bigopt.train.trial import tune_trainable

    data: DataArtifact = inputs["data"]
    spec, search = job.spec, job.spec.search
    assert search is not None and spec.train is not None
    metric, mode = metric_and_mode(job)
    base = trial_base(spec)
    assert base.train is not None
    space = tune_space(search)
    max_params = search.arch.max_params if search.arch else None

    def check(point: dict[str, Any]) -> Any:
        return check_point(point, base, max_params=max_params, latency=False)

    population_based = search.scheduler.kind in ("pbt", "pb2")
    searcher = None
    if not population_based:
        searcher = ValidatingSearcher(build_searcher(search, space, metric, mode), check,
                                      max_trials=search.num_trials,
                                      max_concurrent=search.max_concurrent)
    scheduler = build_scheduler(search, space, metric, mode, base.train.max_steps)
    trainable = tune.with_resources(
        tune_trainable(base, data, hooks=options.hooks, to_values=lambda c: spec_values(c, base),
                       trials_dir=run.uri),
        _trial_resources(base))
    storage = run.path
    tune_dir = f"{storage}/tune"
    if options.resume and tune.Tuner.can_restore(tune_dir, storage_filesystem=run.fs):
        log.info("resuming the search in %s", run.uri_of("tune"))
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_errored=True,
                                   param_space=space if population_based else None,
                                   storage_filesystem=run.fs)
        restored = tuner._local_tuner._tune_config.search_alg  # the object fit() will restore
        if hasattr(restored, "reconcile"):
            restored.truth = experiment_trials(run.fs, tune_dir)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable,
            param_space=space if population_based else None,
            tune_config=tune.TuneConfig(
                search_alg=searcher or BasicVariantGenerator(random_state=search.seed),
                # with a searcher, the budget and concurrency are its own (see ValidatingSearcher)
                scheduler=scheduler, num_samples=-1 if searcher else search.num_trials,
                max_concurrent_trials=None if searcher else search.max_concurrent,
                # a finished trial's process runs the next one: no new actor importing torch,
                # Ray and DeepSpeed per trial (about 10 s each on 2 cores). Not under PBT/PB2:
                # PBT's pause/exploit restarts trial functions, not measured with reuse.
                reuse_actors=not population_based),
            run_config=tune.RunConfig(
                name="tune", storage_path=storage, storage_filesystem=run.fs,
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=1))
    results = tuner.fit()
    rows = trials_rows(results, metric, mode)
    rejected = _rejections(tuner, searcher)
    return finish(job, run, rows, rejected, metric, mode, base,
                  repeats_answered=_repeats_answered(tuner, searcher))


def _searcher_in_use(tuner: Any, searcher: Any) -> Any:
    if searcher is not None and getattr(searcher, "rejected", None) is not None:
        return searcher
    try:  # restored: the searcher object is Tune's own copy
        alg = tuner._local_tuner._tune_config.search_alg
        return getattr(alg, "searcher", alg)
    except AttributeError:
        return None


def _rejections(tuner: Any, searcher: Any) -> list[dict[str, Any]]:
    return list(getattr(_searcher_in_use(tuner, searcher), "rejected", None) or [])


def _repeats_answered(tuner: Any, searcher: Any) -> int:
    """Points the searcher re-suggested after their trial completed, answered with that
    trial's result instead of training again (``SkipRepeats``, around TPE)."""
    inner = getattr(_searcher_in_use(tuner, searcher), "inner", None)
    return int(getattr(inner, "skipped", 0) or 0)


def trials_rows(results: Any, metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial: its config, last and best metric, status, error, checkpoint."""
    rows = []
    for r in results:
        history = r.metrics_dataframe
        values = ([float(v) for v in history[metric].dropna()]
                  if history is not None and metric in history else [])
        best = (max(values) if mode == "max" else min(values)) if values else None
        metrics = r.metrics or {}
        rows.append({
            "trial_id": metrics.get("trial_id") or (r.path or "").rsplit("/", 1)[-1],
            "status": "ERROR" if r.error else "TERMINATED",  # STOPPED is told apart in finish
            "config": dict(r.config or {}),
            "metric": float(metrics[metric]) if metrics.get(metric) is not None else None,
            "best_metric": best,
            "step": metrics.get("step"),
            "error": str(r.error).strip().splitlines()[-1][:500] if r.error else None,
            "checkpoint": r.checkpoint.path if r.checkpoint else None,
            "trial_run": metrics.get("trial_run"),
            "finished_at": metrics.get("timestamp"),
        })
    return rows


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def finish(job: ResolvedJob, run: RunDir, rows: list[dict[str, Any]], rejected: list[dict[str, Any]],
           metric: str, mode: str, base: JobSpec, *, repeats_answered: int = 0) -> SearchArtifact:
    """Costs, the tables, Pareto fronts, best.yaml, plots and the artifact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    search, spec = job.spec.search, job.spec
    assert search is not None
    max_steps = base.train.max_steps if base.train else None
    for row in rows:
        if row["status"] == "TERMINATED" and row["step"] is not None and max_steps is not None \
                and row["step"] < row["config"].get("train.max_steps", max_steps):
            row["status"] = "STOPPED"  # by the scheduler (ASHA) before the trial's budget
        try:  # measured here, one at a time, so latencies are comparable across trials
            _, costs = check_point(row["config"], base)
            row.update(params=costs.params, flops=costs.flops, latency_ms=costs.latency_ms)
        except InvalidPoint:
            row.update(params=None, flops=None, latency_ms=None)
    done = sorted((r for r in rows if r["metric"] is not None and not math.isnan(r["metric"])),
                  key=lambda r: r["finished_at"] or 0)
    if not done:
        raise RuntimeError(f"search: no trial reported {metric}; errors: "
                           + "; ".join(r["error"] or "?" for r in rows if r["status"] == "ERROR"))
    # the best trial among those that ran their full budget (an early-stopped trial's metric
    # is from fewer steps and not comparable); all of them if none did
    full = [r for r in done if r["status"] == "TERMINATED"] or done
    best = full[0]
    for r in full[1:]:
        if _better(r["metric"], best["metric"], mode):
            best = r
    # the point found, trained at the spec's own seed: a re-evaluation's seed is not part of it
    reevaluated = [r for r in rows if SEED_PATH in r["config"] and SEED_PATH not in search.space]
    best_values = spec_values({k: v for k, v in best["config"].items()
                               if k != SEED_PATH or SEED_PATH in search.space}, base)
    table = [{"trial_id": r["trial_id"], "status": r["status"], "metric": r["metric"],
              "best_metric": r["best_metric"], "step": r["step"], "params": r["params"],
              "flops": r["flops"], "latency_ms": r["latency_ms"], "error": r["error"],
              "checkpoint": r["checkpoint"], "trial_run": r["trial_run"],
              "config": json.dumps(active(r["config"]), sort_keys=True), "reason": None}
             for r in rows]
    table += [{"trial_id": None, "status": "REJECTED", "metric": None, "best_metric": None,
               "step": None, "params": None, "flops": None, "latency_ms": None, "error": None,
               "checkpoint": None, "trial_run": None,
               "config": json.dumps(active(x["config"]), sort_keys=True), "reason": x["reason"]}
              for x in rejected]
    with run.fs.open_output_stream(run.sub("trials.parquet")) as f:
        pq.write_table(pa.Table.from_pylist(table), f)
    fronts = {obj: pareto_front(done, obj, mode) for obj in search.objectives}
    run.write_json("pareto.json", {
        "metric": metric, "mode": mode,
        "fronts": {obj: [{"trial_id": r["trial_id"], obj: r[obj], metric: r["metric"],
                          "config": active(r["config"])} for r in front]
                   for obj, front in fronts.items()}})
    # best.yaml: the spec at its own (full) training budget with the best configuration
    best_spec = with_values(spec.model_copy(update={"search": None}), best_values)
    run.write_text("best.yaml", f"# best of {len(done)} trials by {metric} ({mode}): "
                   f"{best['metric']:.4f}, trial {best['trial_id']}\n" + dump_spec(best_spec))
    from bigopt.search.plots import best_so_far_plot, pareto_plot

    run.write_bytes("best_so_far.png", best_so_far_plot(done, metric, mode))
    for obj, front in fronts.items():
        run.write_bytes(f"pareto_{obj}.png", pareto_plot(done, front, obj, metric))
    summary = {"metric": metric, "mode": mode, "searcher": search.searcher,
               "scheduler": search.scheduler.kind, "trials": len(rows),
               "completed": sum(r["status"] == "TERMINATED" for r in rows),
               "stopped_early": sum(r["status"] == "STOPPED" for r in rows),
               "failed": sum(r["status"] == "ERROR" for r in rows), "rejected": len(rejected),
               "repeats_answered": repeats_answered, "reevaluated": len(reevaluated),
               "best": {k: best[k] for k in ("trial_id", "metric", "params", "flops", "latency_ms")},
               "best_config": active(best["config"])}
    run.write_json("summary.json", summary)
    return SearchArtifact(stage=run.name, run=run.parent.uri, uri=run.uri,
                          best_config=best_values, trials=run.uri_of("trials.parquet"),
                          metric=metric, mode=mode)


def report_section(run: RunDir, artifact: SearchArtifact) -> list[str]:
    where = RunDir(artifact.uri)  # the search's own folder, in this run or another
    s = where.read_json("summary.json")
    best = s["best"]
    lines = ["## Search", "",
             f"- searcher **{s['searcher']}**, scheduler {s['scheduler']}: {s['trials']} trials "
             f"({s['completed']} completed, {s['stopped_early']} stopped early, {s['failed']} failed"
             f", {s['rejected']} points rejected before starting"
             + (f", {s['repeats_answered']} repeated points answered from their earlier trial "
                "instead of trained again" if s.get("repeats_answered") else "")
             + (f"; {s['reevaluated']} of the trials re-trained a best challenger with a new "
                "train.seed (search.reevaluate)" if s.get("reevaluated") else "") + ")",
             f"- **best {s['metric']}: {best['metric']:.4f}** (trial {best['trial_id']}, "
             f"{best['params']:,} parameters, {best['latency_ms']:.2f} ms CPU latency)"
             if best.get("params") is not None else
             f"- **best {s['metric']}: {best['metric']:.4f}** (trial {best['trial_id']})",
             "- best configuration: `" + json.dumps({k: v for k, v in s["best_config"].items()
                                                     if v is not None}) + "`",
             f"- all trials: `{artifact.trials}`; ready-to-run spec: `{run.name}/best.yaml`", "",
             f"![best so far]({run.name}/best_so_far.png)", ""]
    pareto = where.read_json("pareto.json")
    for obj, front in pareto["fronts"].items():
        lines.append(f"- Pareto front, {s['metric']} against {obj}: " + ", ".join(
            f"{p[s['metric']]:.3f} @ {p[obj]:.3g}" for p in front))
        lines += ["", f"![pareto {obj}]({run.name}/pareto_{obj}.png)", ""]
    return lines
