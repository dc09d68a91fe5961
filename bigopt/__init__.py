"""bigopt: raw data to a trained, compressed, deployable model on Ray + DeepSpeed."""

from bigopt.spec import JobSpec, SpecError, load_spec

__all__ = ["JobSpec", "SpecError", "load_model", "load_spec", "run"]


def run(spec: JobSpec, **kwargs):  # noqa: ANN201 - re-exported; see bigopt.pipeline.run
    """Run every stage the spec holds (``bigopt run``). See :func:`bigopt.pipeline.run`."""
    from bigopt.pipeline import run as _run

    return _run(spec, **kwargs)


def load_model(where, **kwargs):  # noqa: ANN001, ANN201 - re-exported; see bigopt.load.load_model
    """Rebuild the model of a model artifact or run dir (no DeepSpeed, no pickle).
    See :func:`bigopt.load.load_model`."""
    from bigopt.load import load_model as _load_model

    return _load_model(where, **kwargs)
