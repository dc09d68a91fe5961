"""``bigopt.run(spec)``: the stages present in a spec, in order, each consuming the last's output."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from bigopt.runtime import RunDir, connect_ray, embedded_cpus
from bigopt.spec import JobSpec, dump_spec

log = logging.getLogger("bigopt")


@dataclass
class RunResult:
    run_uri: str
    stages: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run(spec: JobSpec, *, stages: list[str] | None = None, run_dir: str | None = None,
        resume: str | None = None, data_from: str | None = None) -> RunResult:
    """Run ``stages`` (default: every stage the spec holds) into a new or existing run dir.

    ``run_dir`` reuses an existing run directory (e.g. to train on data prepared earlier);
    ``resume`` is a checkpoint URI, or ``latest`` for the run dir's newest checkpoint;
    ``data_from`` trains on the ``data/`` of another run dir (prepared once, trained many times).
    """
    started = time.time()
    stages = stages or spec.stages()
    run = RunDir(run_dir) if run_dir else RunDir.create(spec.storage, spec.name)
    run.write_text("spec.yaml", dump_spec(spec))
    log.info("run dir: %s", run.uri)
    c = spec.cluster
    connect_ray(c.address, num_cpus=embedded_cpus(c.num_workers * c.cpus_per_worker, c.num_cpus))
    result = RunResult(run.uri)
    if "data" in stages:
        from bigopt.data.prepare import run_data

        result.stages["data"] = run_data(spec, run).manifest
    if "train" in stages:
        from bigopt.train.stage import latest_checkpoint, run_train

        checkpoint = latest_checkpoint(run) if resume == "latest" else resume
        if resume == "latest" and checkpoint is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {run.uri}/train/checkpoints")
        result.stages["train"] = run_train(spec, run, resume_from=checkpoint,
                                            data=RunDir(data_from) if data_from else run).result
    from bigopt.report import write_report

    write_report(run)
    result.seconds = time.time() - started
    log.info("done in %.1f s; report: %s", result.seconds, run.uri_of("report.md"))
    return result
