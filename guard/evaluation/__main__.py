"""Command line: ``python -m guard.evaluation run | rescore | summarise ...`` (``--help`` on each).

``run`` generates, scores and summarises an evaluation (resumable; ``accelerate launch -m
guard.evaluation run ...`` shards it over processes), ``rescore`` adds SSCD or CLIP to a run from its
saved images, ``summarise`` prints the results table of a run directory. User errors are one line
on stderr with exit status 2 (set GUARD_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from .command import (
    PROG,
    CommandError,
    add_rescore_arguments,
    add_run_arguments,
    debugging,
    report_error,
    rescore_command,
    run,
)


def _process() -> int | None:
    """This process's rank in a multi-process launch (None alone), for error lines."""
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "run",
        help="generate, score and summarise an evaluation (resumable; shards under accelerate launch)",
        description="Generate, score and summarise an evaluation; rerun the same command to resume.",
    )
    add_run_arguments(generate)
    again = commands.add_parser("rescore", help="add SSCD or CLIP to a run from its saved images")
    add_rescore_arguments(again)
    table = commands.add_parser("summarise", help="print and write the results table of a run directory")
    table.add_argument("out_dir", help="run directory written by guard.evaluation (run or evaluate_prompts)")
    table.add_argument("--baseline", help="no-mitigation method name: keep prompts whose SSCD exceeds --threshold")
    table.add_argument("--threshold", type=float, default=0.7, help="SSCD threshold for --baseline (default 0.7)")
    table.add_argument("--interval", choices=("t", "bootstrap"), default="t", help="95%% interval kind (default t)")
    table.add_argument("--no-kinds", action="store_true", help="one line per method instead of one per kind")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        if args.command == "rescore":
            return rescore_command(args)
        from .summary import summarise

        markdown = summarise(
            args.out_dir,
            baseline=args.baseline,
            threshold=args.threshold,
            interval=args.interval,
            by_kind=not args.no_kinds,
        )
    except (CommandError, OSError, ValueError, ImportError) as error:
        # a user error (no such run or file, bad list, changed settings, missing package): one line
        if debugging():
            raise
        return report_error(error, _process())
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
