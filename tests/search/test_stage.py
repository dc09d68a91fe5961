"""The search stage end to end on real data (scikit-learn's digits): Tune trials run bigopt's
trainer, the tables and the best spec are written, the train stage trains the best; a crashing
trial is recorded and the search goes on; ASHA stops trials; PBT's exploit continues from the
donor's checkpoint (step and weights); a killed search resumes without losing or repeating a
trial."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
import yaml

import bigopt
from bigopt.resolve import ResolvedJob
from bigopt.runtime import RunDir
from bigopt.spec import load_spec, parse_spec
from bigopt.train.hooks import TrainHooks

from factories import spec_dict

pytestmark = pytest.mark.slow

DIGITS = {"data": {"source": {"kind": "digits", "path": None, "max_files": None},
                   "split": {"val": 0.2}},
          "model": {"kind": "cnn", "image_size": 8, "n_layer": None, "n_head": None,
                    "d_model": None, "context": None},
          "cluster": {"num_workers": 1},
          "train": {"strategy": "ddp", "zero": None, "optimizer": "adamw", "lr": 1e-2,
                    "batch_size": 32, "max_steps": 40, "log_every": 10, "eval_every": 10,
                    "eval_batches": 5, "checkpoint_every": 0}}


def search_spec(storage, name="s", **search):
    base = {"searcher": "evolution", "num_trials": 6, "max_concurrent": 2,
            "evolution": {"population": 3, "tournament": 2},
            "trial": {"train.max_steps": 20, "cluster.num_workers": 1}}
    return spec_dict(storage, name=name, **DIGITS, search={**base, **search})


def trials(run_dir) -> list[dict]:
    return pq.read_table(os.path.join(run_dir, "search", "trials.parquet")).to_pylist()


def test_search_then_train_the_best_through_the_cli(ray_session, repo_root, tmp_path):
    raw = search_spec(tmp_path, arch={"families": ["cnn", "mlp"], "depth": [1, 2],
                                      "widths": [8, 16], "stem": [8], "heads": [1, 3]},
                      space={"train.lr": {"loguniform": [1e-3, 3e-2]}},
                      # the last 2 of 6 trials re-train the best challengers (the default
                      # fraction rounds to none at 6 trials; set here to see it end to end)
                      reevaluate=0.34)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "bigopt.cli", "run", str(path)], cwd=repo_root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "s" / "*"))
    rows = trials(run_dir)
    ran = [r for r in rows if r["status"] != "REJECTED"]
    assert len(ran) == 6 and len({r["trial_id"] for r in ran}) == 6
    assert all(r["status"] == "TERMINATED" and r["step"] == 20 and 0 <= r["metric"] <= 1 for r in ran)
    assert all(r["params"] > 0 and r["latency_ms"] > 0 and r["trial_run"] for r in ran)
    for r in rows:  # every rejection says why (heads=3 divides neither width)
        if r["status"] == "REJECTED":
            assert "heads=3" in r["reason"] or "pool" in r["reason"], r["reason"]
    # re-evaluations: points tried before, each trained with its own new train.seed
    again = [r for r in ran if "train.seed" in json.loads(r["config"])]
    points = [json.loads(r["config"]) for r in ran if r not in again]
    assert len(again) == 2
    for r in again:
        point = json.loads(r["config"])
        seed = point.pop("train.seed")
        assert point in points
        trained = ResolvedJob.loads(open(os.path.join(r["trial_run"], "resolved.json")).read())
        assert trained.spec.train.seed == seed != 0
    # best.yaml is a spec that runs as is: the best trial's model at the full budget, and at
    # the spec's own seed (a re-evaluation's seed is not part of the point)
    best = max(ran, key=lambda r: r["metric"])
    best_spec = load_spec(os.path.join(run_dir, "search", "best.yaml"))
    assert best_spec.search is None and best_spec.train.max_steps == 40
    assert best_spec.train.seed == 0
    assert best_spec.model.kind == json.loads(best["config"])["arch.family"]
    # the train stage trained exactly that model
    artifact = json.load(open(os.path.join(run_dir, "train", "artifact.json")))
    assert artifact["arch"]["kind"] == best_spec.model.kind and artifact["step"] == 40
    built = {k: v for k, v in best_spec.model.model_dump().items() if k in artifact["arch"]}
    assert built == {k: artifact["arch"][k] for k in built}
    # Pareto fronts: no trial off a front beats a front member on both axes
    pareto = json.load(open(os.path.join(run_dir, "search", "pareto.json")))
    for cost, front in pareto["fronts"].items():
        for r in ran:
            assert not any(r[cost] < f[cost] and r["metric"] > f["val_acc"] for f in front)
    report = open(os.path.join(run_dir, "report.md")).read()
    assert "## Search" in report and "## Training" in report
    assert "2 of the trials re-trained a best challenger with a new train.seed" in report
    for png in ("best_so_far.png", "pareto_params.png", "pareto_latency_ms.png"):
        assert os.path.getsize(os.path.join(run_dir, "search", png)) > 1000


def test_a_crashing_trial_is_recorded_failed_and_the_search_goes_on(ray_session, tmp_path):
    def crash_on_wide_models(model):  # local: pickled by value into the trial processes
        """A trial-side failure: models with a 64-wide first layer raise while being built."""
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        if first.out_features == 64:
            raise RuntimeError("simulated crash in a trial (64-wide model)")
        return model

    spec = parse_spec(search_spec(tmp_path, searcher="random", num_trials=6, arch={
        "families": ["mlp"], "depth": [1], "mlp_widths": [32, 64]}))
    result = bigopt.run(spec, stages=["data", "search"],
                        hooks=TrainHooks(model_transforms=[crash_on_wide_models]))
    rows = trials(result.run_uri)
    crashed = [r for r in rows if r["status"] == "ERROR"]
    fine = [r for r in rows if r["status"] == "TERMINATED"]
    assert len(rows) == 6 and crashed and fine
    assert all("simulated crash" in r["error"] for r in crashed)
    assert all(json.loads(r["config"])["arch.mlp0.width"] == 64 for r in crashed)
    assert all(json.loads(r["config"])["arch.mlp0.width"] == 32 for r in fine)


def test_asha_stops_poor_trials_early(ray_session, tmp_path):
    spec = parse_spec(search_spec(
        tmp_path, searcher="random", num_trials=6, max_concurrent=2,
        space={"train.lr": {"loguniform": [1e-5, 3e-2]}},
        scheduler={"kind": "asha", "grace_steps": 10, "reduction_factor": 2},
        trial={"train.max_steps": 40, "train.eval_every": 10, "cluster.num_workers": 1}))
    rows = trials(bigopt.run(spec, stages=["data", "search"]).run_uri)
    stopped = [r for r in rows if r["status"] == "STOPPED"]
    finished = [r for r in rows if r["status"] == "TERMINATED"]
    assert stopped and finished, [(r["status"], r["step"]) for r in rows]
    assert all(r["step"] < 40 for r in stopped) and all(r["step"] == 40 for r in finished)


def test_tpe_trains_each_point_once_and_says_how_many_repeats_it_answered(ray_session, tmp_path):
    # 4 points, 6 trials: TPE re-suggests, and a repeat is answered from its earlier trial
    # until the space is spent (then a repeat trains: a search never hangs on a spent space)
    spec = parse_spec(search_spec(tmp_path, searcher="tpe", num_trials=6, max_concurrent=1,
                                  arch={"families": ["mlp"], "depth": [1], "mlp_widths": [16, 32]},
                                  space={"train.lr": {"choice": [1e-2, 3e-2]}}))
    result = bigopt.run(spec, stages=["data", "search"])
    rows = trials(result.run_uri)
    configs = [json.dumps(json.loads(r["config"]), sort_keys=True) for r in rows]
    assert len(rows) == 6 and len(set(configs[:4])) == 4, configs
    summary = RunDir(result.run_uri).stage("search").read_json("summary.json")
    assert summary["repeats_answered"] > 0
    assert f"{summary['repeats_answered']} repeated points answered" in open(
        os.path.join(result.run_uri, "report.md")).read()


def _digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind,workers,precision", [
    ("pbt", 1, "auto"), ("pb2", 1, "auto"),
    ("pbt", 1, "fp32"),   # the user's default is auto (bf16 on CPU); fp32 is the other common one
    ("pbt", 2, "auto"),   # a TorchTrainer inside each trial
])
def test_pbt_exploit_continues_from_the_donor_checkpoint_step_and_weights(
        ray_session, tmp_path, kind, workers, precision):
    # two trials; one lr far too small: at each interval the worse copies the better, then
    # changes lr and batch size (PBT: perturbs or resamples; PB2: a GP bandit's pick)
    mutate = {"train.lr": {"loguniform": [1e-6, 3e-2]}, "train.batch_size": {"randint": [16, 64]}}
    # 2 trials x 2 workers x 0.5 CPU fit the session's 3 CPUs, with one left for Ray Data
    cluster = ({"cluster.num_workers": 1} if workers == 1 else
               {"cluster.num_workers": 2, "cluster.cpus_per_worker": 0.5})
    spec = parse_spec(search_spec(
        tmp_path, searcher="random", num_trials=2, max_concurrent=2,
        space={"train.lr": {"choice": [1e-6, 2e-2]}, "train.batch_size": {"choice": [32]}},
        scheduler={"kind": kind, "interval_steps": 10, "quantile": 0.5, "mutate": mutate,
                   "synch": True},  # both trials meet at each interval: an exploit every time
        trial={"train.max_steps": 40, "train.eval_every": 10, "train.checkpoint_every": 10,
               "train.keep_last": 10, "train.precision": precision, **cluster}))
    run = bigopt.run(spec, stages=["data", "search"]).run_uri
    exploited = []
    for result_path in glob.glob(os.path.join(run, "search", "trials", "*", "train", "result.json")):
        result = json.load(open(result_path))
        if result.get("resumed_from") is not None:
            exploited.append(result)
    assert exploited, "no trial was exploited"
    for result in exploited:
        # Tune hands the trial a copy of the donor's checkpoint (and keeps only the newest 2
        # per trial, so the copy may be gone by now); the donor trial's own checkpoint at that
        # step is the original: the weights loaded must be exactly those of one of them.
        step = result["resumed_from"]
        assert step > 0 and "search/tune/" in result["resumed_checkpoint"]
        originals = glob.glob(os.path.join(run, "search", "trials", "*", "train", "checkpoints",
                                           f"step_{step:06d}"))
        digests = set()
        for donor in originals:
            assert json.load(open(os.path.join(donor, "bigopt_state.json")))["step"] == step
            saved = torch.load(os.path.join(donor, "ddp_state.pt"), weights_only=True)["model"]
            digests.add(_digest(saved))
        assert result["resumed_weights_sha256"] in digests
        assert result["steps"] == 40  # and it went on to the end from there
    # the explored values reached the trials as valid spec values (an int batch size; PBT's
    # x0.8 / x1.2 perturbations may leave the initial range, by design)
    sizes = set()
    for resolved in glob.glob(os.path.join(run, "search", "trials", "*", "resolved.json")):
        train = json.load(open(resolved))["spec"]["train"]
        assert isinstance(train["batch_size"], int) and train["batch_size"] >= 1
        sizes.add(train["batch_size"])
    assert len(sizes) > 1  # the batch size did change during training


def _searcher_files(tune_dir: str) -> dict[str, bytes] | None:
    """The files of one searcher-state save (Tune's search_gen_state and the searcher's own
    files), or None while one is missing or being written."""
    names = (glob.glob(os.path.join(tune_dir, "search_gen_state-*.json"))
             + glob.glob(os.path.join(tune_dir, "searcher-state-*.pkl"))
             + glob.glob(os.path.join(tune_dir, "bigopt-rejected.json")))
    try:
        files = {n: open(n, "rb").read() for n in names}
        json.loads(files[os.path.join(tune_dir, "bigopt-rejected.json")])
    except (OSError, KeyError, ValueError):
        return None
    return files if len(files) == 3 else None


def test_a_killed_search_resumes_without_losing_or_repeating_a_trial(ray_session, repo_root, tmp_path):
    # trials long enough (300 steps) that the driver is killed while the search is running
    raw = search_spec(tmp_path, searcher="random", num_trials=6, max_concurrent=1,
                      space={"train.lr": {"loguniform": [1e-3, 3e-2]}},
                      trial={"train.max_steps": 300, "train.eval_every": 100,
                             "cluster.num_workers": 1})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    cli = [sys.executable, "-m", "bigopt.cli"]
    subprocess.run([*cli, "data", str(path), "--run-dir", str(tmp_path / "run")], cwd=repo_root,
                   check=True, capture_output=True, timeout=600)
    run_dir = str(tmp_path / "run")
    tune_dir = os.path.join(run_dir, "search", "tune")
    proc = subprocess.Popen([*cli, "search", str(path), "--run-dir", run_dir], cwd=repo_root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    done_before: dict[str, float] = {}
    first_save = None  # the searcher's state while only the first trial had begun
    while time.time() < deadline and len(done_before) < 2:
        time.sleep(0.2)
        files = first_save or _searcher_files(tune_dir)
        if files and first_save is None:
            handed = json.loads(files[os.path.join(tune_dir, "bigopt-rejected.json")])["handed"]
            first_save = files if list(handed.values()) == [False] else None
        for result in glob.glob(os.path.join(tune_dir, "*", "result.json")):
            lines = [json.loads(x) for x in open(result) if x.strip()]
            if lines and lines[-1].get("done") or (lines and lines[-1].get("step") == 300):
                done_before[lines[-1]["trial_id"]] = lines[-1]["val_acc"]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-search
    proc.wait()
    assert len(done_before) >= 2
    assert not os.path.exists(os.path.join(run_dir, "search", "trials.parquet"))
    # and as if it died while Tune was saving: the searcher's files one save (or more) behind
    # the trial table (Tune writes them apart; a resume from such a pair once hung forever)
    assert first_save is not None
    for name, data in first_save.items():
        with open(name, "wb") as f:
            f.write(data)
    out = subprocess.run([*cli, "search", str(path), "--run-dir", run_dir, "--resume", "latest"],
                         cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reconciled" in out.stderr
    rows = trials(run_dir)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6  # none lost, none twice
    assert all(r["status"] == "TERMINATED" for r in rows)
    by_id = {r["trial_id"]: r for r in rows}
    for trial_id, acc in done_before.items():  # finished trials kept their results
        assert by_id[trial_id]["metric"] == pytest.approx(acc)
    assert len({json.loads(r["config"])["train.lr"] for r in rows}) == 6
    assert RunDir(run_dir).exists("search/artifact.json")


def test_large_trials_run_a_torch_trainer_inside_the_trial(ray_session, tmp_path):
    # two workers per trial: each trial fits a TorchTrainer (gloo DDP over 2 ranks) inside it
    spec = parse_spec(search_spec(
        tmp_path, searcher="random", num_trials=2, max_concurrent=1,
        space={"train.lr": {"loguniform": [1e-3, 3e-2]}},
        trial={"train.max_steps": 10, "train.eval_every": 5, "cluster.num_workers": 2}))
    run = bigopt.run(spec, stages=["data", "search"]).run_uri
    rows = trials(run)
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["step"] == 10 for r in rows)
    for result_path in glob.glob(os.path.join(run, "search", "trials", "*", "train", "result.json")):
        assert json.load(open(result_path))["layout"]["world_size"] == 2
