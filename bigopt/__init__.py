"""bigopt: raw data to a trained, compressed, deployable model on Ray + DeepSpeed."""

from bigopt.spec import JobSpec, SpecError, load_spec

__all__ = ["JobSpec", "SpecError", "load_spec", "run"]


def run(spec: JobSpec, **kwargs):  # noqa: ANN201 - re-exported; see bigopt.pipeline.run
    """Run every stage the spec holds (``bigopt run``). See :func:`bigopt.pipeline.run`."""
    # torch first, while the working directory surely exists: torch's bundled oneMKL cannot
    # initialise in a process whose cwd was deleted ("Intel oneMKL FATAL ERROR: Cannot load
    # .../libtorch_cpu.so"; reproduced with a plain `python -c`). That happens to `ray job
    # submit --working-dir` drivers on the local fake_multinode cluster, whose nodes share one
    # session dir and re-extract the job's working dir when they join; the driver would import
    # torch only at the train stage, after the autoscaler added nodes.
    import torch  # noqa: F401

    from bigopt.pipeline import run as _run

    return _run(spec, **kwargs)
