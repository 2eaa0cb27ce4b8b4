"""Command line: ``python -m guard.evaluation summarise RUN_DIR [--baseline none] ...`` prints the table."""

from __future__ import annotations

import argparse
import sys

from .summary import summarise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guard.evaluation", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("summarise", help="print and write the results table of a run directory")
    table.add_argument("out_dir", help="run directory written by guard.evaluation.evaluate_prompts")
    table.add_argument("--baseline", help="no-mitigation method name: keep prompts whose SSCD exceeds --threshold")
    table.add_argument("--threshold", type=float, default=0.7, help="SSCD threshold for --baseline (default 0.7)")
    table.add_argument("--interval", choices=("t", "bootstrap"), default="t", help="95%% interval kind (default t)")
    table.add_argument("--no-kinds", action="store_true", help="one line per method instead of one per kind")
    args = parser.parse_args(argv)
    try:
        markdown = summarise(
            args.out_dir,
            baseline=args.baseline,
            threshold=args.threshold,
            interval=args.interval,
            by_kind=not args.no_kinds,
        )
    except (OSError, ValueError) as error:  # a user error (no such run, no rows, unknown baseline): one line
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
