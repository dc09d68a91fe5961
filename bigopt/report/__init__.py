"""Run directory -> plots -> ``report.md``, one section per stage of the stage table.

Each stage's section comes from its table entry (``Stage.report``), fed with the stage's
artifact; this module holds the shared pieces (the train section, plots). It reads only files
in run dirs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bigopt.runtime import RunDir

if TYPE_CHECKING:
    from bigopt.artifacts import ModelArtifact


def _loss_plot(rows: list[dict[str, Any]], val: dict[int, float]) -> bytes:
    from bigopt.plotting import figure, png

    fig, ax = figure()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def train_section(out: RunDir, artifact: ModelArtifact, *, title: str = "Training",
                  link: str | None = None) -> list[str]:
    """A training run's report section (the train stage's, a compress step's fine-tuning):
    loss, the task's own metrics, throughput, plot; ``out`` is its stage folder, ``link`` its
    path relative to ``report.md`` (default: the stage's name)."""
    from bigopt.tasks import get_task

    result = out.read_json("result.json")
    rows = out.read_jsonl("metrics.jsonl") if out.exists("metrics.jsonl") else []
    val = {int(k): v for k, v in result.get("val_losses", {}).items()}
    lines = [f"## {title}", "",
             f"- steps: {result['steps']}, strategy: {result.get('strategy', 'deepspeed')}, "
             f"precision: {result['precision']}, layout: {result['layout']}",
             f"- model: `{artifact.weights}` (`bigopt.load_model`), engine checkpoint "
             f"`{artifact.checkpoint}` ({artifact.format}, step {artifact.step})"]
    if result.get("resumed_from") is not None:
        repeated = len(rows) - len({r["step"] for r in rows})
        restarts = result.get("restarts") or 0
        cause = (f"after {restarts} worker-group restart{'s' * (restarts != 1)} (worker failures)"
                 if restarts else "as asked (--resume)")
        lines.append(f"- resumed from the step-{result['resumed_from']} checkpoint {cause}: "
                     f"{repeated} logged steps were run twice")
    if result.get("time_to_first_step_s") is not None:
        marks = result.get("startup_s", {})
        lines.append(f"- first optimizer step {result['time_to_first_step_s']:.1f} s after start ("
                     + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items() if k != "process_start")
                     + ")")
    lines.append("")
    if len(val) >= 2:
        first, last = val[min(val)], val[max(val)]
        lines.append(f"- **validation loss {first:.4f} -> {last:.4f}** (step {min(val)} -> "
                     f"{max(val)}): down {first - last:.4f} nats, {100 * (first - last) / first:.1f} %")
    lines += get_task(artifact.task).report_lines(result)
    if rows:
        tail = rows[-min(5, len(rows)):]
        mean = {k: sum(r.get(k) or 0 for r in tail) / len(tail)
                for k in ("samples_per_s", "tokens_per_s", "data_wait_frac")}
        tokens = f", {mean['tokens_per_s']:.0f} tokens/s" if mean["tokens_per_s"] else ""
        lines.append(f"- throughput (last {len(tail)} log points): {mean['samples_per_s']:.1f} "
                     f"samples/s{tokens}, data wait {100 * mean['data_wait_frac']:.1f} % of step time")
    out.write_bytes("loss.png", _loss_plot(rows, val))
    return lines + ["", f"![loss]({link or out.name}/loss.png)", ""]


def write_report(run: RunDir) -> str:
    """Write ``report.md`` (and its PNGs): one section per stage with an artifact in ``run``."""
    from bigopt.artifacts import has_artifact, read_artifact
    from bigopt.stages import STAGES

    lines = [f"# bigopt report: `{run.uri}`", ""]
    for stage in STAGES:
        if stage.report is not None and has_artifact(run, stage.name):
            section = stage.report_function()
            assert section is not None
            lines += section(run.stage(stage.name), read_artifact(run, stage.name))
    text = "\n".join(lines)
    run.write_text("report.md", text)
    return text
