"""Run directory -> plots -> ``report.md``. Reads only files in the run dir."""

from __future__ import annotations

import io
import math
from typing import Any

from bigopt.runtime import RunDir


def _loss_plot(rows: list[dict[str, Any]], val: dict[int, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _data_section(manifest: dict[str, Any]) -> list[str]:
    lines = ["## Data", "",
             f"- source: {manifest['source']['kind']} `{manifest['source']['root']}`",
             f"- rows in {manifest['rows_in']} = kept {manifest['rows_kept']} + rejected "
             f"{manifest['rows_rejected']} {manifest['rejected_by_reason'] or ''}",
             "", "| split | windows | tokens | files | shards |", "|---|---|---|---|---|"]
    for name, s in manifest["splits"].items():
        lines.append(f"| {name} | {s['rows']} | {s['tokens']} | {s['files']} | {len(s['shards'])} |")
    return lines + [""]


def _train_section(run: RunDir, rows: list[dict[str, Any]], result: dict[str, Any]) -> list[str]:
    val = {int(k): v for k, v in result.get("val_losses", {}).items()}
    lines = ["## Training", "",
             f"- steps: {result['steps']}, strategy: {result.get('strategy', 'deepspeed')}, "
             f"precision: {result['precision']}, layout: "
             f"{result['layout']}"]
    if result.get("resumed_from") is not None:
        repeated = len(rows) - len({r["step"] for r in rows})
        lines.append(f"- resumed from the step-{result['resumed_from']} checkpoint "
                     f"({repeated} logged steps were run twice)")
    lines.append("")
    if len(val) >= 2:
        first, last = val[min(val)], val[max(val)]
        text = (f"- **validation loss {first:.4f} -> {last:.4f}** (step {min(val)} -> {max(val)}): "
                f"down {first - last:.4f} nats, {100 * (first - last) / first:.1f} %")
        if any("tokens_per_s" in r for r in rows):  # a language model: perplexity reads better
            text += f"; perplexity {math.exp(first):.2f} -> {math.exp(last):.2f}"
        lines.append(text)
    acc = {int(k): v for k, v in result.get("val_accuracy", {}).items()}
    if acc:
        lines.append(f"- **validation accuracy {100 * acc[min(acc)]:.1f} % -> "
                     f"{100 * acc[max(acc)]:.1f} %** (step {min(acc)} -> {max(acc)})")
    if rows:
        tail = rows[-min(5, len(rows)):]
        mean = {k: sum(r.get(k) or 0 for r in tail) / len(tail)
                for k in ("samples_per_s", "tokens_per_s", "data_wait_frac")}
        tokens = f", {mean['tokens_per_s']:.0f} tokens/s" if mean["tokens_per_s"] else ""
        lines.append(f"- throughput (last {len(tail)} log points): {mean['samples_per_s']:.1f} "
                     f"samples/s{tokens}, data wait {100 * mean['data_wait_frac']:.1f} % of step time")
    run.write_bytes("train/loss.png", _loss_plot(rows, val))
    return lines + ["", "![loss](train/loss.png)", ""]


def write_report(run: RunDir) -> str:
    """Write ``report.md`` (and its PNGs) for whatever stages the run dir holds."""
    lines = [f"# bigopt report: `{run.uri}`", ""]
    if run.exists("data/manifest.json"):
        lines += _data_section(run.read_json("data/manifest.json"))
    if run.exists("train/result.json"):
        rows = run.read_jsonl("train/metrics.jsonl") if run.exists("train/metrics.jsonl") else []
        lines += _train_section(run, rows, run.read_json("train/result.json"))
    text = "\n".join(lines)
    run.write_text("report.md", text)
    return text
