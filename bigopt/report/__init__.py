"""Run directory -> plots -> ``report.md``, one section per stage of the stage table.

Each stage's section comes from its table entry (``Stage.report``), fed with the stage's
artifact; this module holds the shared pieces (the train section, plots). It reads only files
in run dirs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # bigopt.spec imports report.spec: nothing heavy at import time
    from bigopt.artifacts import ModelArtifact
    from bigopt.runtime import RunDir


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
    lines += _ingest_lines(result, rows)
    out.write_bytes("loss.png", _loss_plot(rows, val))
    images = ["", f"![loss]({link or out.name}/loss.png)"]
    if rows and any("data_wait_frac" in r for r in rows):
        out.write_bytes("input.png", _input_plot(rows))
        images.append(f"![input pipeline]({link or out.name}/input.png)")
    return lines + images + [""]


#: data wait above this share of step time names the input pipeline as the bottleneck
INPUT_BOUND_SHARE = 0.05


def _ingest_lines(result: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What the input pipeline cost: the bottleneck verdict, rows each rank read, remote
    traffic."""
    lines = []
    if rows:
        # the slowest rank's share (one starved rank holds every other at the all-reduce), in
        # steady state: step 1 waits for the first batch of a cold pipeline
        steady = [r for r in rows if r["step"] > 1] or rows
        wait = sum(max(r.get("data_wait_frac_by_rank") or [r.get("data_wait_frac") or 0])
                   for r in steady) / len(steady)
        if wait > INPUT_BOUND_SHARE:
            lines.append(f"- **bottleneck: the input pipeline**: the loop waited on data for "
                         f"{100 * wait:.1f} % of step time after step 1 "
                         f"(over {100 * INPUT_BOUND_SHARE:.0f} %); "
                         "more reader threads or CPUs per worker, a larger prefetch, or shards "
                         "on local disk (the node cache) would shorten it")
        else:
            lines.append(f"- input pipeline keeps up: data wait {100 * wait:.1f} % of step time "
                         "after step 1 (slowest rank)")
    ingest = result.get("ingest")
    if ingest:
        read, split = ingest["rows_read_by_rank"], ingest["split_rows"]
        lines.append(f"- rows read per data-parallel rank: {', '.join(map(str, read))} of a "
                     f"{split}-row split ({ingest['epochs_started']} epoch(s) started)")
        remote = ingest.get("remote")
        if remote:
            per_epoch = "; ".join(f"epoch {i + 1}: {e['gets']} GETs, {e['bytes'] / 2**20:.1f} MiB"
                                  for i, e in enumerate(remote["per_epoch"]))
            lines.append(f"- s3:// shards (rank 0), node cache {'on' if remote['node_cache'] else 'off'}"
                         f": {remote['gets']} GETs, {remote['bytes'] / 2**20:.1f} MiB, "
                         f"{remote['hits']} local hits" + (f" ({per_epoch})" if per_epoch else ""))
    return lines


def _input_plot(rows: list[dict[str, Any]]) -> bytes:
    """Step time and the part of it each rank spent waiting on data; each rank's training rows
    read per second (dotted, right axis)."""
    from bigopt.plotting import figure, png

    fig, ax = figure()
    steps = [r["step"] for r in rows]
    step_time = [r.get("step_time_s") or 0 for r in rows]
    ax.plot(steps, step_time, color="C0", label="step time (s)")
    by_rank = [r.get("data_wait_frac_by_rank") or [r.get("data_wait_frac") or 0] for r in rows]
    for rank in range(max(len(w) for w in by_rank)):
        waits = [t * (w[rank] if rank < len(w) else 0)
                 for t, w in zip(step_time, by_rank, strict=True)]
        ax.plot(steps, waits, color=f"C{rank + 1}", label=f"data wait, rank {rank} (s)")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds per step")
    ax.grid(alpha=0.3)
    rates = [(r["step"], r["rows_read_per_s_by_rank"]) for r in rows if r.get("rows_read_per_s_by_rank")]
    if rates:
        twin = ax.twinx()
        for rank in range(len(rates[0][1])):
            twin.plot([s for s, _ in rates], [v[rank] if rank < len(v) else 0 for _, v in rates], ":",
                      color=f"C{rank + 1}", label=f"rows read / s, rank {rank}")
        twin.set_ylabel("rows read per second")
        twin.legend(loc="upper right", fontsize="small")
    ax.legend(loc="upper left", fontsize="small")
    return png(fig)


def write_report(run: RunDir) -> str:
    """Write ``report.md`` (and its PNGs): one section per stage with an artifact in ``run``,
    then the runs the spec's ``report.compare_with`` names, beside this one."""
    from bigopt.artifacts import has_artifact, read_artifact
    from bigopt.stages import STAGES

    lines = [f"# bigopt report: `{run.uri}`", ""]
    for stage in STAGES:
        if stage.report is not None and has_artifact(run, stage.name):
            section = stage.report_function()
            assert section is not None
            lines += section(run.stage(stage.name), read_artifact(run, stage.name))
    from bigopt.report.compare import compare_with, comparison_section

    lines += comparison_section(run, compare_with(run))
    text = "\n".join(lines)
    run.write_text("report.md", text)
    return text
