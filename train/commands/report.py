"""`leanfit report RUN_DIR` or `leanfit report --compare OUT LABEL=RUN_DIR ...`: report.md and report.html."""

import json
import sys
from pathlib import Path

from ..evaluation.compare import write_comparison_report
from ..evaluation.report import write_report
from .common import OneLineParser, fail

__all__ = ["main"]


def main(argv=None):
    p = OneLineParser(prog="leanfit report", description="Write report.md and report.html for runs.")
    p.add_argument("runs", nargs="+", help="a run folder, or with --compare, LABEL=RUN_DIR pairs")
    p.add_argument("--compare", metavar="OUT", help="write one comparison report into OUT")
    args = p.parse_args(argv)
    try:
        if args.compare:
            pairs = [r.split("=", 1) if "=" in r else (Path(r).name, r) for r in args.runs]
            paths = write_comparison_report(args.compare, dict(pairs))
        else:
            if len(args.runs) != 1:
                raise ValueError(f"expected one run folder without --compare, got {len(args.runs)}")
            paths = write_report(args.runs[0])
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        return fail(p.prog, e)
    print("\n".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
