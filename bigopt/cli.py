"""``bigopt`` command line: argument parsing only; the stage table says what the stages are."""

from __future__ import annotations

import argparse
import logging
import sys

from bigopt.spec import SpecError, load_spec
from bigopt.stages import STAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigopt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_spec(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("spec", help="job spec YAML")
        sp.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="a.b=c", help="override a spec field (repeatable)")
        return sp

    def with_run_options(sp: argparse.ArgumentParser, resumable: bool) -> None:
        sp.add_argument("--run-dir", help="write into this existing run directory")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, DeepSpeed's and the workers' logs on the console too "
                             "(otherwise they go to <run>/logs/)")
        sp.add_argument("--from", dest="inputs_from", action="append", default=[],
                        metavar="STAGE=RUN_DIR",
                        help="take STAGE's artifact from another run instead of running it")
        if resumable:
            sp.add_argument("--resume", help="checkpoint path/URI, or 'latest' in --run-dir")
            sp.add_argument("--trust-checkpoint", action="store_true",
                            help="allow --resume from a checkpoint outside the run dir: DeepSpeed "
                                 "unpickles checkpoints, so only for ones you made yourself")

    with_spec("validate", "check a spec; exit 2 with one 'field.path: problem' line each")
    with_run_options(with_spec("run", "run every stage the spec holds, in order"), True)
    for stage in STAGES:
        sp = with_spec(stage.name, f"run only the {stage.name} stage: {stage.help}")
        with_run_options(sp, stage.resumable)
        if "data" in stage.consumes:  # kept: users' scripts (and the regression checks) use it
            sp.add_argument("--data-from", help="same as --from data=RUN_DIR")
    rep = sub.add_parser("report", help="(re)write report.md for a run directory")
    rep.add_argument("run_dir")
    cache = sub.add_parser("cache", help="list or remove prepared-data cache entries "
                                         "(<storage>/cache/data/<key>/)")
    cache.add_argument("action", choices=["ls", "rm"])
    cache.add_argument("keys", nargs="*", help="rm: the entries' keys")
    cache.add_argument("--storage", default="./runs", help="the jobs' storage (default ./runs)")
    cache.add_argument("--older-than", type=float, metavar="DAYS",
                       help="rm: every entry created more than DAYS days ago")
    return p


def _cache_command(args: argparse.Namespace) -> int:
    from bigopt.data import cache

    if args.action == "ls":
        rows = cache.entries(args.storage)
        for e in rows:
            state = "complete" if e["complete"] else "INCOMPLETE (never read)"
            print(f"{e['key']}  {e['bytes'] / 2**20:9.1f} MiB  {e['created'] or '-':32}  {state}  "
                  f"{e['from_run'] or ''}")
        where = cache.cache_root(args.storage).uri
        print(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'} under {where}")
        return 0
    if bool(args.keys) == (args.older_than is not None):
        print("cache rm: give KEY... or --older-than DAYS", file=sys.stderr)
        return 2
    known = {e["key"] for e in cache.entries(args.storage)}
    keys = args.keys or cache.older_than(args.storage, args.older_than)
    missing = [k for k in keys if k not in known]
    if missing:
        print(f"cache rm: no entry {', '.join(missing)} under {cache.cache_root(args.storage).uri}",
              file=sys.stderr)
        return 2
    for key in keys:
        cache.remove(args.storage, key)
        print(f"removed {key}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bigopt %(message)s")
    if args.command == "cache":
        return _cache_command(args)
    if args.command == "report":
        from bigopt.report import write_report
        from bigopt.runtime import RunDir

        print(write_report(RunDir(args.run_dir)))
        return 0
    try:
        from bigopt.resolve import resolve

        spec = load_spec(args.spec, args.overrides)
        job = resolve(spec)  # derived rules fail here too, before Ray starts
    except SpecError as exc:
        for path, msg in exc.problems:
            print(f"{path}: {msg}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.spec}: ok (stages: {', '.join(job.stages) or 'none'})")
        return 0
    import bigopt
    from bigopt.pipeline import parse_from

    try:
        inputs_from = parse_from(args.inputs_from)
    except (KeyError, ValueError) as exc:
        print(f"--from: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "data_from", None):
        inputs_from["data"] = args.data_from
    stages = None if args.command == "run" else [args.command]
    from bigopt.train.stage import IncompleteCheckpointError, UntrustedCheckpointError

    try:
        bigopt.run(spec, stages=stages, run_dir=args.run_dir, resume=getattr(args, "resume", None),
                   inputs_from=inputs_from, trust_checkpoint=getattr(args, "trust_checkpoint", False),
                   console="verbose" if args.verbose else "quiet")
    except (UntrustedCheckpointError, IncompleteCheckpointError) as exc:
        print(f"--resume: {exc}", file=sys.stderr)
        return 2
    except SpecError as exc:  # an input from another run that does not fit the spec
        for path, msg in exc.problems:
            print(f"{path}: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
