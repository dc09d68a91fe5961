"""The ``compress`` section: an ordered recipe of steps over the model the train stage made.

Each step takes the previous step's model (the first takes the input model artifact) and makes
one variant: a model artifact in ``<run>/compress/NN-<kind>/``. Steps that fine-tune run
through the same trainer (and engine: any ZeRO stage, or DDP) as the train stage, with the
train section's settings and their own ``steps``/``lr``.

    compress:
      steps:
        - {kind: prune, method: magnitude, sparsity: 0.9, steps: 600}   # Zhu & Gupta's cubic schedule
        - {kind: prune, method: structured, ratio: 0.5, steps: 300}     # channels / neurons / heads
        - {kind: distill, student: {kind: cnn, ...}, alpha: 0.7, temperature: 4, steps: 1000}
        - {kind: quantize, mode: int8_dynamic}                          # or int8_weight_only, qat
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from bigopt.sections import Section as _Section

if TYPE_CHECKING:
    from bigopt.spec import JobSpec


class _FineTune(_Section):
    steps: int = Field(300, ge=0, description="Fine-tuning optimizer steps (0: none).")
    lr: float | None = Field(None, gt=0, description="Fine-tuning lr; default train.lr / 10.")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="Variant name (default NN-<kind>).")


class PruneStep(_FineTune):
    """Magnitude (unstructured, global), L1-regularised, or structured (physically removed)."""

    kind: Literal["prune"]
    method: Literal["magnitude", "l1", "structured"] = "magnitude"
    sparsity: float = Field(0.9, ge=0, lt=1, description="magnitude/l1: share of prunable weights "
                            "(Linear/Conv matrices) set to zero, over all layers together.")
    ratio: float = Field(0.5, ge=0, lt=1, description="structured: share of conv channels, MLP "
                         "neurons and attention heads removed from each layer.")
    schedule: Literal["cubic", "one_shot"] = Field(
        "cubic", description="magnitude: Zhu & Gupta's cubic ramp from 0 to `sparsity` over the "
        "first `ramp` of the steps, re-pruning every `frequency` steps; one_shot: all at step 1.")
    ramp: float = Field(0.6, gt=0, le=1, description="Share of the steps the cubic ramp takes.")
    frequency: int = Field(25, ge=1)
    l1_weight: float = Field(1e-5, ge=0, description="l1: weight of sum|w| added to the loss.")


class DistillStep(_FineTune):
    """A student trained on the teacher's temperature-softened outputs (Hinton et al. 2015)
    mixed with the hard labels; the teacher is the previous step's model, frozen."""

    kind: Literal["distill"]
    student: dict | None = Field(None, description="The student's model section (any zoo "
                                 "architecture); default: the teacher's architecture.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the soft-target loss.")
    temperature: float = Field(4.0, gt=0)
    steps: int = Field(1000, ge=1)
    lr: float | None = Field(None, gt=0, description="Student lr; default train.lr.")


class QuantizeStep(_FineTune):
    """int8 through torchao: dynamic (int8 activations and weights) or weight-only PTQ, or
    quantization-aware fine-tuning (fake quant, then convert). Static int8 with calibration
    is the export stage's int8 ONNX (onnxruntime QDQ), where the backend runs it."""

    kind: Literal["quantize"]
    mode: Literal["int8_dynamic", "int8_weight_only", "qat"] = "int8_dynamic"
    steps: int = Field(0, ge=0, description="qat: fine-tuning steps with fake quantization.")


COMPRESS_STEP_KINDS = ("prune", "distill", "quantize")
CompressStepSpec = Annotated[PruneStep | DistillStep | QuantizeStep, Field(discriminator="kind")]


class CompressSpec(_Section):
    steps: list[CompressStepSpec] = Field(min_length=1)
    eval_rows: int = Field(10000, ge=1, description="Rows of the test split (val without one) "
                           "each variant is evaluated on, by the driver.")
    latency_repeats: int = Field(30, ge=3, description="Timed repeats per CPU latency figure.")

    def problems(self, spec: JobSpec) -> list[tuple[str, str]]:
        """Cross-field rules of the section (run by ``bigopt validate``, before Ray)."""
        from bigopt.spec import parse_model_section

        out: list[tuple[str, str]] = []
        train = spec.train
        zero3 = train is not None and train.strategy == "deepspeed" and train.zero.stage == 3
        pipelined = train is not None and train.pipeline.stages > 1
        tunes = any(s.steps for s in self.steps)
        if tunes and train is None:
            out.append(("compress.steps", "fine-tuning runs on the train section's engine: add "
                                          "a train section (or set every step's steps: 0)"))
        quantized = [i for i, s in enumerate(self.steps) if isinstance(s, QuantizeStep)]
        if quantized and quantized[0] != len(self.steps) - 1:
            out.append((f"compress.steps.{quantized[0]}.kind", "quantize must be the last step (a "
                        "step after it would train or prune int8 weights); compare int8 modes in "
                        "separate runs (--from train=RUN)"))
        for i, step in enumerate(self.steps):
            where = f"compress.steps.{i}"
            if pipelined and step.steps:
                out.append((f"{where}.steps", "fine-tuning under pipeline parallelism is not "
                             "supported (the pipeline engine has no hooks); set "
                             "train.pipeline.stages: 1 for compression"))
            if isinstance(step, PruneStep) and step.method == "l1" and zero3:
                out.append((f"{where}.method", "l1 reads every weight in the loss, which ZeRO-3 "
                                               "partitions; use train.zero.stage <= 2 or DDP"))
            if isinstance(step, QuantizeStep) and step.mode == "qat" and zero3:
                out.append((f"{where}.mode", "torchao's QAT cannot prepare a ZeRO-3 partitioned "
                                             "model (pytorch/ao#803); use train.zero.stage <= 2"))
            if isinstance(step, QuantizeStep) and step.mode == "qat" and not step.steps:
                out.append((f"{where}.steps", "qat fine-tunes with fake quantization: set steps > 0"))
            if isinstance(step, DistillStep) and step.student is not None:
                try:
                    parse_model_section(step.student)
                except ValueError as exc:
                    out.append((f"{where}.student", str(exc)))
        return out
