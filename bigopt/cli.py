"""``bigopt`` command line: argument parsing only; the stages do the work."""

from __future__ import annotations

import argparse
import logging
import sys

from bigopt.spec import SpecError, load_spec

STAGE_COMMANDS = ("data", "train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigopt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_spec(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("spec", help="job spec YAML")
        sp.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="a.b=c", help="override a spec field (repeatable)")
        return sp

    with_spec("validate", "check a spec; exit 2 with one 'field.path: problem' line each")
    r = with_spec("run", "run every stage the spec holds")
    r.add_argument("--run-dir", help="reuse an existing run directory")
    for stage in STAGE_COMMANDS:
        s = with_spec(stage, f"run only the {stage} stage")
        s.add_argument("--run-dir", help="existing run directory (e.g. with prepared data)")
        if stage == "train":
            s.add_argument("--resume", help="checkpoint path/URI, or 'latest' in --run-dir")
            s.add_argument("--data-from", help="train on the data/ of this earlier run dir")
    rep = sub.add_parser("report", help="(re)write report.md for a run directory")
    rep.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bigopt %(message)s")
    if args.command == "report":
        from bigopt.report import write_report
        from bigopt.runtime import RunDir

        print(write_report(RunDir(args.run_dir)))
        return 0
    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as exc:
        for path, msg in exc.problems:
            print(f"{path}: {msg}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.spec}: ok (stages: {', '.join(spec.stages()) or 'none'})")
        return 0
    import bigopt

    stages = None if args.command == "run" else [args.command]
    if args.command == "train" and not (args.run_dir or args.data_from) and spec.data:
        stages = ["data", "train"]  # a fresh run dir has no data yet
    bigopt.run(spec, stages=stages, run_dir=args.run_dir, resume=getattr(args, "resume", None),
               data_from=getattr(args, "data_from", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
