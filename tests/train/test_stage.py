"""The train stage's driver side: what it refuses before any Ray or DeepSpeed work starts."""

from __future__ import annotations

import subprocess
import sys

import yaml

from factories import spec_dict


def test_resume_from_outside_the_run_dir_needs_trust_checkpoint(tmp_path, repo_root):
    """DeepSpeed unpickles checkpoints (torch.load(weights_only=False)): a checkpoint from
    another directory could run code in every worker, so the CLI refuses it, exit 2, with the
    reason and the flag, before Ray starts."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(str(tmp_path / "runs"))))
    elsewhere = tmp_path / "downloaded" / "step_000010"
    elsewhere.mkdir(parents=True)
    run_dir = tmp_path / "runs" / "t" / "r1"
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "bigopt.cli", "train", str(spec), "--run-dir", str(run_dir),
           "--resume", str(elsewhere)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "outside the run dir" in proc.stderr and "--trust-checkpoint" in proc.stderr
    assert "pickle" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr.split("--resume")[0]  # nothing started
    assert not (run_dir / "spec.yaml").exists()  # nothing written either
