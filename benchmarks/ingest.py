"""Loading: how training data reaches the ranks, measured on real prepared shards.

Prepares the job's data once (``bigopt data``, embedded Ray), then, each figure a ratio from
this one run:

(a) reading the train split: Ray Data as bigopt reads it (``bigopt.data.ingest.read_shards``, then
    ``materialize()``; Ray's own ``read_parquet`` defaults beside it) and one rank's
    deterministic-order stream (``bigopt.data.partition.RankStream``, the default ingest)
    against ``pyarrow.parquet.read_table`` of the same files;
(d) the same shards on S3 (a real moto_server process on 127.0.0.1): epochs 1 and 2 of one
    rank's stream without and with the node-local cache, against local reads, with the GETs
    and bytes fetched per epoch;
(e) rows each rank reads per epoch in the deterministic order with 2 and 4 data-parallel
    ranks, as a share of the split (the goal: 1/N, within 5 %; the previous deterministic mode
    had every rank iterate the whole split).

    python benchmarks/ingest.py                       # Fashion-MNIST, ~2 minutes on 2 cores
    python benchmarks/ingest.py --job jobs/quickstart.yaml
    python benchmarks/ingest.py --train-dir RUN/data/train   # (a) only, on shards already prepared
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def prepare(job: str, storage: str) -> tuple[str, list[str], float]:
    """Runs the data stage; returns (train split dir, training columns, seconds)."""
    import bigopt
    from bigopt.tasks import get_task

    spec = bigopt.load_spec(os.path.join(REPO, job), [f"storage={storage}"])
    started = time.perf_counter()
    run = bigopt.run(spec, stages=["data"]).run_uri
    seconds = time.perf_counter() - started
    artifact = json.load(open(os.path.join(run, "data", "artifact.json")))
    columns = list(get_task(artifact["task"]).columns)
    return os.path.join(run, "data", "train"), columns, seconds


def epoch_seconds(stream, epochs: int = 1) -> list[float]:
    """Seconds per epoch of draining ``stream`` (its own batches-per-epoch)."""
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(stream.per_epoch):
            next(stream)
        out.append(time.perf_counter() - t0)
    return out


def read_ratios(train_dir: str, columns: list[str], repeats: int = 3) -> dict:
    """Each read ``repeats`` times, interleaved; ratios of the medians (one run's times on
    2 cores swing by 2x with Ray's worker start-ups, so one pass is not a figure)."""
    import glob
    import statistics

    import pyarrow.parquet as pq
    import ray

    from bigopt.data.ingest import read_shards
    from bigopt.data.partition import RankStream, plan_shards

    files = sorted(glob.glob(os.path.join(train_dir, "*.parquet")))
    ray.data.DataContext.get_current().enable_progress_bars = False
    read_shards(files[:1], columns=columns).materialize()  # read tasks warmed up
    rows = sum(pq.read_metadata(f).num_rows for f in files)

    def timed(read) -> float:
        t0 = time.perf_counter()
        n = read()
        assert n == rows, (n, rows)
        return time.perf_counter() - t0

    def streamed(reservation: bool = False) -> int:  # training's access: blocks stream past
        ds = read_shards(train_dir, columns=columns)
        if reservation:  # Ray Data's default, which read_shards turns off: the before, same run
            ds.context.op_resource_reservation_enabled = True
        return sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))

    times: dict[str, list[float]] = {"arrow": [], "arrow_kept": [], "bigopt_streamed": [],
                                     "bigopt_streamed_reserved": [], "bigopt": [],
                                     "ray_defaults": []}
    for _ in range(repeats):
        times["arrow"].append(timed(
            lambda: sum(pq.read_table(f, columns=columns).num_rows for f in files)))
        # like-for-like with materialize(): every table held at once (fresh memory for all)
        times["arrow_kept"].append(timed(
            lambda: sum(t.num_rows for t in [pq.read_table(f, columns=columns) for f in files])))
        times["bigopt_streamed"].append(timed(streamed))
        times["bigopt_streamed_reserved"].append(timed(lambda: streamed(reservation=True)))
        # bigopt's Ray Data read, materialized
        times["bigopt"].append(timed(
            lambda: read_shards(train_dir, columns=columns).materialize().count()))
    # Ray Data's own defaults (DataSourceV2, >= 200 read tasks), after the rest: their read
    # tasks leave the load at ~10 and slowed the reads after them in the same loop (session 17,
    # 1.68M rows, two runs: streamed 5.2-5.8 s interleaved with them, 4.3-5.1 s after the change)
    for _ in range(repeats):
        times["ray_defaults"].append(timed(
            lambda: ray.data.read_parquet(train_dir).select_columns(columns).materialize().count()))
    med = {k: statistics.median(v) for k, v in times.items()}
    arrow_s, ray_s, ray_default_s = med["arrow"], med["bigopt"], med["ray_defaults"]
    plan = plan_shards(train_dir, columns)
    stream = RankStream(plan, batch_size=64, seed=0, shuffle_buffer=1024)
    (stream_s,) = epoch_seconds(stream)
    stream.close()
    return {"rows": rows, "files": len(files), "repeats": repeats, "times_s": times,
            "pyarrow_read_table_s": arrow_s,
            "ray_data_materialize_s": ray_s, "rank_stream_epoch_s": stream_s,
            "ray_data_defaults_materialize_s": ray_default_s,
            "ray_data_streamed_s": med["bigopt_streamed"],
            "ray_data_streamed_vs_pyarrow": arrow_s / med["bigopt_streamed"],
            "ray_data_streamed_reserved_vs_pyarrow": arrow_s / med["bigopt_streamed_reserved"],
            "ray_data_vs_pyarrow": arrow_s / ray_s,
            "ray_data_vs_pyarrow_kept": med["arrow_kept"] / ray_s,
            "ray_data_defaults_vs_pyarrow": arrow_s / ray_default_s,
            "rank_stream_vs_pyarrow": arrow_s / stream_s}


def rows_per_rank(train_dir: str, columns: list[str]) -> list[dict]:
    from bigopt.data.partition import RankStream, plan_shards

    plan = plan_shards(train_dir, columns[:1])
    out = []
    for dp in (2, 4):
        streams = [RankStream(plan, batch_size=64, seed=0, dp=dp, dp_rank=r, shuffle_buffer=1024)
                   for r in range(dp)]
        for s in streams:
            epoch_seconds(s, epochs=3)
            next(s)  # books epoch 3
            s.close()
        for epoch in range(3):
            reads = [s.counter.per_epoch[epoch][0] for s in streams]
            out.append({"dp": dp, "epoch": epoch + 1, "split_rows": plan.total_rows,
                        "rows_read_by_rank": reads,
                        "max_share": max(reads) / plan.total_rows, "goal": 1 / dp,
                        "max_over_goal": max(reads) * dp / plan.total_rows - 1})
    return out


def s3_epochs(train_dir: str, columns: list[str]) -> dict:
    """Local vs moto_server on loopback, epochs 1-2, with and without the node cache."""
    import socket

    import boto3

    from bigopt.data.node_cache import NodeCache
    from bigopt.data.partition import RankStream, plan_shards

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        for name in sorted(os.listdir(train_dir)):
            client.upload_file(os.path.join(train_dir, name), "bench", f"train/{name}")
        local = RankStream(plan_shards(train_dir, columns), batch_size=64, seed=0, shuffle_buffer=1024)
        remote_plan = plan_shards("s3://bench/train", columns)
        direct = RankStream(remote_plan, batch_size=64, seed=0, shuffle_buffer=1024)
        with tempfile.TemporaryDirectory() as cache_dir:
            cached = RankStream(remote_plan, batch_size=64, seed=0, shuffle_buffer=1024,
                                node_cache=NodeCache(cache_dir))
            result = {"local_s": epoch_seconds(local, 2), "s3_direct_s": epoch_seconds(direct, 2),
                      "s3_node_cache_s": epoch_seconds(cached, 2)}
            next(direct), next(cached)  # books epoch 2's traffic
            result["s3_direct_traffic"] = direct.remote.per_epoch[:2]
            result["s3_node_cache_traffic"] = cached.remote.per_epoch[:2]
            for stream in (local, direct, cached):
                stream.close()
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="jobs/fmnist_cnn.yaml")
    parser.add_argument("--out", default=None, help="write the figures as JSON here too")
    parser.add_argument("--train-dir", default=None,
                        help="only (a), on this prepared split's shards (e.g. a larger run's)")
    parser.add_argument("--repeats", type=int, default=3, help="(a): interleaved repeats per read")
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if args.train_dir:
        import glob

        import pyarrow.parquet as pq

        # the columns training reads (the task's, from the run's data artifact), as the default
        # path does; every column where the split has no artifact beside it
        artifact = os.path.join(os.path.dirname(os.path.normpath(args.train_dir)), "artifact.json")
        if os.path.exists(artifact):
            from bigopt.tasks import get_task

            columns = list(get_task(json.load(open(artifact))["task"]).columns)
        else:
            columns = pq.read_schema(sorted(glob.glob(os.path.join(args.train_dir, "*.parquet")))[0]).names
        load_before = os.getloadavg()[0]
        a = read_ratios(args.train_dir, columns, args.repeats)
        print(json.dumps({"train_dir": args.train_dir, "columns": columns, "load_before": load_before,
                          "load_after": os.getloadavg()[0], "a_read": a}))
        return 0
    with tempfile.TemporaryDirectory() as storage:
        train_dir, columns, prep_s = prepare(args.job, storage)
        figures = {"job": args.job, "machine": f"{platform.node()} {os.cpu_count()} cores",
                   "load_before": os.getloadavg()[0], "data_stage_s": prep_s,
                   "a_read": read_ratios(train_dir, columns, args.repeats),
                   "e_rows_per_rank": rows_per_rank(train_dir, columns)}
        ray.shutdown()
        figures["d_s3"] = s3_epochs(train_dir, columns)
        figures["load_after"] = os.getloadavg()[0]
    a, d = figures["a_read"], figures["d_s3"]
    print(f"ingest benchmark, {args.job}: {a['rows']} train rows in {a['files']} shards; load "
          f"{figures['load_before']:.1f} -> {figures['load_after']:.1f}")
    print(f"(a) pyarrow read_table {a['pyarrow_read_table_s']:.2f} s; Ray Data streamed "
          f"{a['ray_data_streamed_s']:.2f} s (ratio {a['ray_data_streamed_vs_pyarrow']:.2f}; with Ray's "
          f"per-operator reservation {a['ray_data_streamed_reserved_vs_pyarrow']:.2f}), materialize "
          f"{a['ray_data_materialize_s']:.2f} s (ratio {a['ray_data_vs_pyarrow']:.2f}; Ray's defaults "
          f"{a['ray_data_defaults_materialize_s']:.2f} s, "
          f"{a['ray_data_defaults_vs_pyarrow']:.2f}); one rank's "
          f"stream, one epoch in batches {a['rank_stream_epoch_s']:.2f} s (ratio "
          f"{a['rank_stream_vs_pyarrow']:.2f})")
    print(f"(d) epoch 1 / epoch 2 seconds: local {d['local_s'][0]:.2f} / {d['local_s'][1]:.2f}; "
          f"S3 direct {d['s3_direct_s'][0]:.2f} / {d['s3_direct_s'][1]:.2f}; S3 + node cache "
          f"{d['s3_node_cache_s'][0]:.2f} / {d['s3_node_cache_s'][1]:.2f}")
    for name in ("s3_direct_traffic", "s3_node_cache_traffic"):
        print(f"    {name}: " + "; ".join(f"epoch {i + 1}: {t['gets']} GETs, {t['bytes'] / 2**20:.1f} MiB, "
                                           f"{t['hits']} local hits" for i, t in enumerate(d[name])))
    print("(e) rows read per rank per epoch (deterministic order):")
    for row in figures["e_rows_per_rank"]:
        print(f"    dp {row['dp']} epoch {row['epoch']}: {row['rows_read_by_rank']} of "
              f"{row['split_rows']}: largest share {row['max_share']:.3f} (goal {row['goal']:.3f}, "
              f"{100 * row['max_over_goal']:+.1f} %)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
