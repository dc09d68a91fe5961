"""``bigopt.run(spec)``: walk the stage table, each stage consuming earlier stages' artifacts."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from bigopt.artifacts import Artifact, has_artifact, read_artifact, write_artifact
from bigopt.resolve import ResolvedJob, resolve, resolve_after_search
from bigopt.runtime import RunDir, connect_ray, embedded_cpus
from bigopt.spec import JobSpec, SpecError, dump_spec
from bigopt.stages import STAGES, Stage, StageOptions, get_stage, producers_before

log = logging.getLogger("bigopt")


@dataclass
class RunResult:
    run_uri: str
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # by stage name
    seconds: float = 0.0


def _process_start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # no psutil (it comes with ray[default]): count from bigopt.run instead
        return time.time()


def parse_from(items: list[str] | None) -> dict[str, str]:
    """``["data=runs/q/1"]`` -> ``{"data": "runs/q/1"}`` (the CLI's ``--from STAGE=RUN_DIR``)."""
    out: dict[str, str] = {}
    for item in items or []:
        stage, sep, where = item.partition("=")
        if not sep or not where:
            raise ValueError(f"--from {item!r}: expected STAGE=RUN_DIR")
        get_stage(stage)  # KeyError naming the known stages
        out[stage] = where
    return out


def plan(job: ResolvedJob, requested: list[str] | None, *, run: RunDir,
         inputs_from: dict[str, str]) -> tuple[list[Stage], dict[str, Artifact]]:
    """The stages to run, in table order, and the artifacts taken from elsewhere.

    A requested stage whose input is neither taken from another run (``--from``) nor already
    in the run dir gets its producing stage added when the spec has that section (``bigopt
    train`` on a fresh run dir prepares the data first); otherwise it is an error naming both.
    """
    # a stage whose artifact comes from another run is not run again (`bigopt run --from data=X`)
    wanted = set(requested or job.stages) - set(inputs_from)
    given: dict[str, Artifact] = {}
    for stage_name, where in inputs_from.items():
        art = read_artifact(RunDir(where), stage_name)
        given[art.kind] = art
    changed = True
    while changed:
        changed = False
        for stage in STAGES:
            if stage.name not in wanted:
                continue
            for kind in stage.consumes:
                if kind in given:
                    continue
                producers = producers_before(stage, kind)
                if any(p.name in wanted for p in producers):
                    continue
                inherited = _from_lineage(given, kind)
                if inherited is not None:  # e.g. --from train=RUN: the data that model used
                    given[kind] = inherited
                    continue
                existing = next((p for p in producers if has_artifact(run, p.name)), None)
                if existing is not None:
                    given[kind] = read_artifact(run, existing.name)
                    continue
                runnable = next((p for p in producers if p.name in job.stages), None)
                if runnable is None:
                    raise ValueError(
                        f"stage {stage.name!r} needs a {kind!r} artifact: add the "
                        f"{producers[0].name if producers else kind!r} section to the spec, or "
                        f"pass --from {producers[0].name if producers else kind}=RUN_DIR")
                wanted.add(runnable.name)
                changed = True
    return [s for s in STAGES if s.name in wanted], given


def _from_lineage(given: dict[str, Artifact], kind: str) -> Artifact | None:
    """An artifact of ``kind`` that a given artifact was made from (its ``parent`` chain)."""
    from bigopt.artifacts import ancestor

    return next((found for a in list(given.values()) if (found := ancestor(a, kind))), None)


def check_stage_inputs(job: ResolvedJob, todo: list[Stage], given: dict[str, Artifact]) -> None:
    """Each stage's ``check`` on the inputs known before anything runs (from another run or
    already in the run dir): SpecError naming the field, before Ray starts."""
    problems = []
    for stage in todo:
        check = stage.check_function()
        if check is not None:
            problems += check(job, given)
    if problems:
        raise SpecError(problems)


def job_for_stage(job: ResolvedJob, stage: Stage, inputs: dict[str, Artifact],
                  out: RunDir) -> ResolvedJob:
    """The resolved job a stage runs: after a search, the best configuration (resolved here,
    once, and saved beside the stage's artifact), else the run's own."""
    search = inputs.get("search")
    if search is None or stage.name == "search":
        return job
    best = search.best_config  # type: ignore[attr-defined]
    tuned = resolve_after_search(job, best)
    out.write_text("resolved.json", tuned.dumps())
    log.info("%s: the search's best configuration: %s", stage.name,
             ", ".join(f"{k}={v}" for k, v in best.items() if k != "model") or "its model")
    return tuned


def run(spec: JobSpec, *, stages: list[str] | None = None, run_dir: str | None = None,
        resume: str | None = None, inputs_from: dict[str, str] | None = None, hooks: Any = None,
        trust_checkpoint: bool = False, console: str | None = None) -> RunResult:
    """Run ``stages`` (default: every stage the spec holds) into a new or existing run dir.

    ``run_dir`` reuses an existing run directory; ``inputs_from`` maps a stage to another run
    dir whose artifact to use instead of running it (``{"data": RUN_DIR}``);
    ``resume`` is a checkpoint URI or ``latest`` (a checkpoint outside the run dir needs
    ``trust_checkpoint``: DeepSpeed unpickles it); ``hooks`` are the train stage's
    ``TrainHooks``. Each stage gets its own folder ``<run>/<stage>/`` as a ``RunDir`` view and
    writes its artifact there; the artifact names the one it was made from (``parent``).
    ``console``: ``"quiet"`` (the CLI's default: progress bars and summary lines, every other
    log in ``<run>/logs/``), ``"verbose"`` (``-v``: everything on the console too), or None
    (a library call: logging and Ray's output are left as the caller set them up).
    """
    started = time.time()
    # Start-up marks (wall clock), from this process's start: the train stage reports
    # time_to_first_step_s and a breakdown by phase against them.
    startup = {"process_start": _process_start_time(), "run_called": started}
    job = resolve(spec)
    inputs_from = dict(inputs_from or {})
    run = RunDir(run_dir) if run_dir else RunDir.create(spec.storage, spec.name)
    if resume == "latest" and run_dir and stages is None:
        # resuming a whole run: stages that finished keep their artifacts; the one that was cut
        # short resumes (a search from its Tune state, training from its newest checkpoint)
        done = [s.name for s in STAGES if s.name in job.stages and has_artifact(run, s.name)]
        stages = [s for s in job.stages if s not in done] or job.stages
        log.info("resuming %s: %s already done", run.uri, ", ".join(done) or "no stage")
    todo, artifacts = plan(job, stages, run=run, inputs_from=inputs_from)
    check_stage_inputs(job, todo, artifacts)
    options = StageOptions(resume=resume, trust_checkpoint=trust_checkpoint, hooks=hooks,
                           startup=startup, stages_run=[s.name for s in todo])
    if resume and resume != "latest" and any(s.resumable for s in todo):
        from bigopt.train.stage import checked_resume, refuse_incomplete

        # refused before Ray starts, not after
        refuse_incomplete(checked_resume(run.stage("train"), options))
    run.write_text("spec.yaml", dump_spec(job.spec))
    run.write_text("resolved.json", job.dumps())
    if console is None:
        return _run_stages(job, run, todo, artifacts, options, started, log_to_driver=True)
    from bigopt.console import failing_log_tails, quiet_console

    with quiet_console(run, verbose=console == "verbose") as logs:
        options.log_dir = None if console == "verbose" else logs
        try:
            return _run_stages(job, run, todo, artifacts, options, started,
                               log_to_driver=console == "verbose")
        except Exception:
            if console != "verbose":
                from bigopt.console import console_stream

                tails = failing_log_tails(logs)
                if tails:
                    print(tails, file=console_stream())
                print(f"bigopt: a stage failed; all logs are in {logs}", file=console_stream())
            raise


def pin_ray_data_stats_actor() -> None:
    """Create Ray Data's cluster-wide stats actor from the driver. Ray pins it (a detached
    actor) to the node of whichever process first runs a Ray Data execution; when that is a
    training worker or a data task on an autoscaled worker node, the node is never idle again
    and never scales down (seen: tests/integration/test_autoscale.py). From here it sits on
    the driver's node: the head, which stays anyway."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # a Ray without it: nothing to pin
        return
    get_or_create_stats_actor()


def _run_stages(job: ResolvedJob, run: RunDir, todo: list[Stage], artifacts: dict[str, Artifact],
                options: StageOptions, started: float, *, log_to_driver: bool) -> RunResult:
    startup = options.startup or {}
    log.info("run dir: %s; stages: %s", run.uri, ", ".join(s.name for s in todo))
    c = job.spec.cluster
    if options.log_dir is not None:
        import ray.data

        from bigopt.console import silence_ray_loggers

        silence_ray_loggers()  # Ray installs console handlers when imported, and again in init
        ray.data.DataContext.get_current().enable_progress_bars = False
    connect_ray(c.address, num_cpus=embedded_cpus(c.num_workers * c.cpus_per_worker, c.num_cpus),
                log_to_driver=log_to_driver)
    if options.log_dir is not None:
        silence_ray_loggers()
    pin_ray_data_stats_actor()
    startup["ray_up"] = time.time()
    result = RunResult(run.uri)
    stage_s: dict[str, float] = {}
    for stage in todo:
        stage_started = startup[f"{stage.name}_stage_start"] = time.time()
        inputs = {k: artifacts[k] for k in (*stage.consumes, *stage.optional) if k in artifacts}
        out = run.stage(stage.name)
        stage_job = job_for_stage(job, stage, inputs, out)
        artifact = stage.function()(stage_job, inputs, out, options)
        parent = next((inputs[k] for k in stage.consumes if k in inputs), None)
        if parent is not None and artifact.parent is None:
            artifact = artifact.model_copy(update={"parent": parent.artifact_uri})
        write_artifact(out, artifact)
        artifacts[artifact.kind] = result.artifacts[stage.name] = artifact
        stage_s[stage.name] = time.time() - stage_started
        log.info("%s: done in %.1f s -> %s", stage.name, stage_s[stage.name], out.uri)
    from bigopt.report import write_report
    from bigopt.report.compare import timing_record

    # what the run cost, for this report and for runs that compare themselves with this one
    run.write_json("run.json", timing_record(run.read_json("run.json") if run.exists("run.json")
                                             else None, time.time() - started, stage_s))

    write_report(run)
    result.seconds = time.time() - started
    log.info("done in %.1f s; report: %s", result.seconds, run.uri_of("report.md"))
    return result
