"""bigopt: raw data to a trained, compressed, deployable model on Ray + DeepSpeed."""

from bigopt.spec import JobSpec, SpecError, load_spec

__all__ = ["JobSpec", "SpecError", "load_spec", "run"]


def run(spec: JobSpec, **kwargs):  # noqa: ANN201 - re-exported; see bigopt.pipeline.run
    """Run every stage the spec holds (``bigopt run``). See :func:`bigopt.pipeline.run`."""
    # torch before Ray Data, pyarrow and grpc. Imported late (the driver needs torch only for
    # the train stage), libtorch_cpu's bundled oneMKL failed to dlopen its own library in
    # `ray job submit` drivers on the fake autoscaling cluster: "Intel oneMKL FATAL ERROR:
    # Cannot load .../libtorch_cpu.so", 6 runs of 6; imported first, the same job succeeds.
    # (The loader's reason was not isolated; exhausted static TLS is the usual suspect.)
    import torch  # noqa: F401

    from bigopt.pipeline import run as _run

    return _run(spec, **kwargs)
