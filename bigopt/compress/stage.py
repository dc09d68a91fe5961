"""The compress stage: the ``compress.steps`` recipe over a model artifact, one variant per step.

Each step starts from the previous step's model (the first from the input artifact: train's,
or ``--from train=RUN``) and writes a model artifact into its own folder
``<run>/compress/NN-<kind>/`` (lineage: ``parent`` names the model it came from). Fine-tuning
runs through the train stage's ``fit`` (Ray Train + the spec's engine: DDP or any ZeRO stage)
with compression as hooks (``bigopt.compress.hooks``); structured pruning and post-training
quantization happen here, in the driver, on the consolidated weights. The driver then measures
every variant the same way: accuracy (perplexity for language models) on the test split (val
without one), parameters, non-zero parameters, size on disk and single-thread CPU latency at
batch 1 and 64. The stage's own artifact is the last variant, listing all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from bigopt.artifacts import DataArtifact, ModelArtifact, write_artifact
from bigopt.compress.spec import CompressSpec, DistillStep, PruneStep, QuantizeStep
from bigopt.resolve import ResolvedJob, model_arch, resolve
from bigopt.runtime import RunDir
from bigopt.stages import StageOptions

log = logging.getLogger("bigopt")

SUMMARY_FILE = "summary.json"


# --------------------------------------------------------------------------- checks
def check_inputs(job: ResolvedJob, inputs: dict[str, Any]) -> list[tuple[str, str]]:
    """Before Ray starts: the input model must be the spec's architecture (when the spec has a
    model section and no search picks another) and of the same task as the data."""
    model, data = inputs.get("model"), inputs.get("data")
    problems = []
    if model is not None and job.arch is not None and "search" not in job.stages \
            and _arch_key(model.arch) != _arch_key(job.arch):
        problems.append(("model", f"the model artifact of {model.run} is {_describe(model.arch)}, "
                                  f"the spec's model section is {_describe(job.arch)}"))
    if model is not None and data is not None and model.task != data.task:
        problems.append(("data", f"the model is a {model.task}, the data artifact of {data.run} "
                                 f"holds {data.task} data"))
    return problems


def _arch_key(arch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arch.items() if k != "activation_checkpointing"}


def _describe(arch: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(_arch_key(arch).items()))


# --------------------------------------------------------------------------- evaluation data
class EvalData:
    """The rows every variant is measured on, read once by the driver: the data artifact's
    test split (val when it has none), at most ``rows`` of them, in shard order."""

    def __init__(self, data: DataArtifact, rows: int, batch_size: int = 256):
        from bigopt.tasks import get_task
        from bigopt.train.stage import read_split_in_driver

        self.split = "test" if "test" in data.splits else "val"
        self.task = get_task(data.task)
        x_col, y_col = data.columns
        from bigopt.runtime import filesystem_for

        fs, path = filesystem_for(data.splits[self.split].uri)
        ds = read_split_in_driver(fs, path, list(data.columns)).limit(rows)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in ds.iter_torch_batches(batch_size=batch_size, drop_last=False):
            x = batch[x_col]
            self.batches.append((x if torch.is_floating_point(x) else x.long(), batch[y_col].long()))
        self.rows = sum(len(y) for _, y in self.batches)
        self.example = self.batches[0][0]

    def metrics(self, model: torch.nn.Module) -> dict[str, float]:
        from bigopt.compress.measure import accuracy, perplexity

        if self.task.is_sequence:
            return {"perplexity": perplexity(model, self.batches)}
        return {"accuracy": accuracy(model, self.batches)}

    def batches_of(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same rows in batches of at most ``size`` (a .pte is planned for a largest batch)."""
        x = torch.cat([b[0] for b in self.batches])
        y = torch.cat([b[1] for b in self.batches])
        return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]

    def inputs(self, batch: int) -> torch.Tensor:
        x = torch.cat([b[0] for b in self.batches])[:batch]
        if len(x) < batch:  # fewer eval rows than the batch: repeat them
            x = x.repeat((batch + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:batch]
        return x


def measure(artifact: ModelArtifact, data: EvalData, repeats: int) -> dict[str, Any]:
    """Accuracy or perplexity, parameters (and non-zero ones), size on disk, CPU latency."""
    from bigopt.compress.measure import cpu_latency_ms, param_count
    from bigopt.compress.prune import sparsity_report
    from bigopt.load import load_model

    model = load_model(artifact)
    quantized = bool(artifact.transforms)
    if quantized:
        from bigopt.compress.quantize import quantized_size_bytes

        size = quantized_size_bytes(model)
    else:
        folder, _, name = (artifact.weights or "").rpartition("/")
        size = RunDir(folder).fs.get_file_info(RunDir(folder).sub(name)).size
    # the weights as stored (fp32), for counts and sparsity: the same model unless quantized
    dense = load_model(artifact, transforms=False) if quantized else model
    report = sparsity_report(dense)
    latency = {f"batch_{b}": cpu_latency_ms(model, data.inputs(b), repeats=repeats)
               for b in (1, 64)}
    return {"metrics": {**data.metrics(model), "eval_split": data.split, "eval_rows": data.rows},
            "params": param_count(dense),
            "nonzero_params": int(sum(int((p != 0).sum()) for p in dense.parameters())),
            "size_bytes": int(size), "latency_ms": latency,
            "sparsity": {k: v["sparsity"] for k, v in report.items()}}


# --------------------------------------------------------------------------- steps
def _finetune_job(job: ResolvedJob, *, steps: int, lr: float, arch: dict[str, Any]) -> ResolvedJob:
    """The train section, shortened to a fine-tune: ``steps`` steps at ``lr``, a short warmup,
    checkpoint at the end, evaluate four times; the variant's architecture."""
    train = job.spec.train
    assert train is not None
    schedule = train.schedule.model_copy(update={"warmup_steps": min(train.schedule.warmup_steps,
                                                                     max(1, steps // 10))})
    short = train.model_copy(update={
        "max_steps": steps, "lr": lr, "schedule": schedule, "checkpoint_every": 0,
        "checkpoint_at": [], "eval_every": max(1, steps // 4), "log_every": max(1, min(train.log_every,
                                                                                       steps // 10))})
    spec = job.spec.model_copy(update={"train": short, "search": None, "compress": None,
                                       "export": None})
    return resolve(spec).model_copy(update={"arch": arch, "stages": ["train"]})


def _fine_tune(job: ResolvedJob, data: DataArtifact, out: RunDir, options: StageOptions, *,
               arch: dict[str, Any], steps: int, lr: float, hooks: Any) -> ModelArtifact:
    from bigopt.train.stage import fit

    tuned = _finetune_job(job, steps=steps, lr=lr, arch=arch)
    out.write_text("resolved.json", tuned.dumps())
    return fit(tuned, data, out, dataclasses.replace(options, hooks=hooks, resume=None), resume=None)


def _save(out: RunDir, state: dict[str, torch.Tensor]) -> str:
    from bigopt.train.weights import write_weights

    return write_weights(out, state)


def run_step(step: Any, current: ModelArtifact, job: ResolvedJob, data: DataArtifact,
             out: RunDir, options: StageOptions, example: torch.Tensor) -> ModelArtifact:
    """One recipe step: the variant's model artifact (weights written into ``out``)."""
    from bigopt.compress.hooks import L1Penalty, LoadWeights, PruneMasks, Teacher
    from bigopt.load import load_model
    from bigopt.train.hooks import TrainHooks

    train = job.spec.train
    base_lr = train.lr if train is not None else 1e-3
    lr = step.lr or (base_lr if isinstance(step, DistillStep) else base_lr / 10)
    same = {"arch": current.arch, "transforms": list(current.transforms)}
    if isinstance(step, PruneStep) and step.method in ("magnitude", "l1"):
        from bigopt.compress.prune import MaskCallback

        if step.method == "magnitude" and step.schedule == "cubic" and step.steps:
            end = max(1, int(step.ramp * step.steps))
            masks = MaskCallback(final_sparsity=step.sparsity, end=end, start=1,
                                 frequency=min(step.frequency, end))
        else:  # one shot: at the first step (magnitude) or after L1 training (l1)
            at = 1 if step.method == "magnitude" else max(1, step.steps)
            masks = MaskCallback(final_sparsity=step.sparsity, end=at, start=at, frequency=1)
        if not step.steps:  # no fine-tuning: prune the weights as they are
            model = load_model(current, transforms=False)
            masks(model, masks.start)
            return _artifact(out, current, weights=_save(out, model.state_dict()), **same)
        hooks = TrainHooks(model_transforms=(LoadWeights(current.weights),),
                           step_callbacks=(PruneMasks(masks),),
                           regularizers=(L1Penalty(step.l1_weight),) if step.method == "l1" else ())
        tuned = _fine_tune(job, data, out, options, arch=current.arch, steps=step.steps, lr=lr,
                           hooks=hooks)
        return _artifact(out, current, from_fit=tuned, **same)
    if isinstance(step, PruneStep):  # structured: physically smaller, then fine-tuned
        from bigopt.compress.prune import structured_prune

        model = load_model(current, transforms=False)
        pruned, arch = structured_prune(model, step.ratio, example[:2].clone())
        if not step.steps:
            return _artifact(out, current, weights=_save(out, pruned.state_dict()), arch=arch,
                             transforms=list(current.transforms))
        start = out.uri_of("pruned_start.safetensors")
        from bigopt.train.weights import write_weights

        write_weights(out, pruned.state_dict(), rel="pruned_start.safetensors")
        hooks = TrainHooks(model_transforms=(LoadWeights(start),))
        tuned = _fine_tune(job, data, out, options, arch=arch, steps=step.steps, lr=lr, hooks=hooks)
        return _artifact(out, current, from_fit=tuned, arch=arch, transforms=list(current.transforms))
    if isinstance(step, DistillStep):
        from bigopt.compress.distill import DistillLoss
        from bigopt.spec import parse_model_section

        student = (model_arch(parse_model_section(step.student), train)
                   if step.student is not None else current.arch)
        hooks = TrainHooks(teacher=Teacher(current.arch, current.weights),
                           loss_builder=DistillLoss(alpha=step.alpha, temperature=step.temperature))
        tuned = _fine_tune(job, data, out, options, arch=student, steps=step.steps, lr=lr,
                           hooks=hooks)
        return _artifact(out, current, from_fit=tuned, arch=student, transforms=[])
    assert isinstance(step, QuantizeStep)
    transforms = [*current.transforms, {"kind": "quantize", "mode": step.mode}]
    if step.mode == "qat":
        from bigopt.compress.hooks import KeepZeros, KeepZerosFrom
        from bigopt.compress.quantize import QATPrepare

        keeper = KeepZeros()  # an earlier pruning step's zeros stay zero while QAT fine-tunes
        hooks = TrainHooks(model_transforms=(LoadWeights(current.weights), KeepZerosFrom(keeper),
                                             QATPrepare()),
                           step_callbacks=(keeper,))
        tuned = _fine_tune(job, data, out, options, arch=current.arch, steps=step.steps, lr=lr,
                           hooks=hooks)
        return _artifact(out, current, from_fit=tuned, arch=current.arch, transforms=transforms)
    # post-training: the same fp32 weights, quantized when loaded (torchao, on the CPU)
    model = load_model(current, transforms=False)
    return _artifact(out, current, weights=_save(out, model.state_dict()), arch=current.arch,
                     transforms=transforms)


def _artifact(out: RunDir, parent: ModelArtifact, *, arch: dict[str, Any],
              transforms: list[dict[str, Any]], weights: str | None = None,
              from_fit: ModelArtifact | None = None) -> ModelArtifact:
    run = out.parent.parent  # <run>/compress/<variant>
    fields: dict[str, Any] = {
        "stage": "compress", "run": run.uri, "uri": out.uri, "task": parent.task, "arch": arch,
        "transforms": transforms, "variant": out.name, "parent": parent.artifact_uri}
    if from_fit is not None:
        fields.update(format=from_fit.format, step=from_fit.step, checkpoint=from_fit.checkpoint,
                      weights=from_fit.weights, metrics={"train": from_fit.metrics})
    else:
        fields.update(format="none", step=0, checkpoint=None, weights=weights)
    return ModelArtifact(**fields)


# --------------------------------------------------------------------------- stage
def compress_stage(job: ResolvedJob, inputs: dict[str, Any], out: RunDir,
                   options: StageOptions) -> ModelArtifact:
    """The compress stage (stage table entry)."""
    spec: CompressSpec | None = job.spec.compress
    assert spec is not None
    source: ModelArtifact = inputs["model"]
    data: DataArtifact = inputs["data"]
    if not source.weights:
        raise FileNotFoundError(f"the model artifact of {source.run} has no model.safetensors "
                                "to compress (it predates consolidated weights): train again")
    evaluation = EvalData(data, spec.eval_rows)
    rows = [{"variant": "input", "step": None, **measure(source, evaluation, spec.latency_repeats)}]
    log.info("compress: input %s", _line(rows[0]))
    current, variants = source, []
    for i, step in enumerate(spec.steps):
        started = time.time()
        name = step.name or f"{i + 1:02d}-{step.kind}"
        vout = out.stage(name)
        variant = run_step(step, current, job, data, vout, options, evaluation.example)
        measured = measure(variant, evaluation, spec.latency_repeats)
        variant = variant.model_copy(update={
            "metrics": {**variant.metrics, **measured["metrics"]}, "params": measured["params"],
            "size_bytes": measured["size_bytes"], "latency_ms": measured["latency_ms"]})
        write_artifact(vout, variant)
        rows.append({"variant": name, "step": step.model_dump(mode="json"), **measured,
                     "seconds": round(time.time() - started, 1)})
        log.info("compress: %s %s", name, _line(rows[-1]))
        variants.append(variant)
        current = variant
    out.write_json(SUMMARY_FILE, {"input": source.artifact_uri, "rows": rows,
                                  "eval_split": evaluation.split, "eval_rows": evaluation.rows})
    out.write_bytes("tradeoff.png", tradeoff_plot(rows, evaluation.task.is_sequence))
    return current.model_copy(update={"variants": [v.artifact_uri for v in variants]})


def _line(row: dict[str, Any]) -> str:
    m = row["metrics"]
    quality = (f"perplexity {m['perplexity']:.2f}" if "perplexity" in m
               else f"accuracy {100 * m['accuracy']:.2f} %")
    return (f"{quality}, {row['params']:,} params ({row['nonzero_params']:,} non-zero), "
            f"{row['size_bytes'] / 1e3:.0f} kB, {row['latency_ms']['batch_1']['median']:.2f} ms "
            f"at batch 1")


def tradeoff_plot(rows: list[dict[str, Any]], sequence: bool) -> bytes:
    from bigopt.plotting import figure, png

    fig, axes = figure(10, 3.8, ncols=2)
    key = "perplexity" if sequence else "accuracy"
    scale = 1 if sequence else 100
    for ax, (xkey, xlabel) in zip(axes, (("size", "size on disk (kB)"),
                                         ("latency", "CPU latency, batch 1 (ms)")), strict=True):
        for r in rows:
            x = r["size_bytes"] / 1e3 if xkey == "size" else r["latency_ms"]["batch_1"]["median"]
            ax.scatter([x], [scale * r["metrics"][key]])
            ax.annotate(r["variant"], (x, scale * r["metrics"][key]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key + ("" if sequence else " (%)"))
        ax.grid(alpha=0.3)
    return png(fig)


def report_section(out: RunDir, artifact: ModelArtifact) -> list[str]:
    summary = RunDir(artifact.run).stage("compress").read_json(SUMMARY_FILE)
    rows = summary["rows"]
    sequence = "perplexity" in rows[0]["metrics"]
    key = "perplexity" if sequence else "accuracy"
    lines = ["## Compression", "",
             f"Every variant measured by the driver on {summary['eval_rows']} rows of the "
             f"{summary['eval_split']} split; latency: one CPU thread, median of repeats.", "",
             f"| variant | {key} | params | non-zero | size (kB) | latency b1 (ms) | b64 (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["metrics"][key]
        lines.append(f"| {r['variant']} | {q:.2f} |" if sequence else f"| {r['variant']} | {100 * q:.2f} % |")
        lines[-1] += (f" {r['params']:,} | {r['nonzero_params']:,} | {r['size_bytes'] / 1e3:.1f} | "
                      f"{r['latency_ms']['batch_1']['median']:.3f} | "
                      f"{r['latency_ms']['batch_64']['median']:.2f} |")
    lines += ["", f"![accuracy against size and latency]({out.name}/tradeoff.png)", ""]
    for r in rows[1:]:
        sparse = {k: v for k, v in r["sparsity"].items() if k != "total" and v > 0}
        if sparse:
            lines.append(f"- {r['variant']}: sparsity per layer " + ", ".join(
                f"`{k}` {100 * v:.0f} %" for k, v in sparse.items()) +
                f" (total {100 * r['sparsity'].get('total', 0):.1f} %)")
    return lines + [""]
