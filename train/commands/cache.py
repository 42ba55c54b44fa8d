"""`leanfit cache`: what the model cache holds (`LEANFIT_CACHE`, default ~/.cache/leanfit), and clearing it."""

import sys

from ..model.loading import cache_entries, cache_root, clear_cache
from ..units import format_bytes
from .common import OneLineParser

CACHE_HELP = ("LEANFIT_CACHE: where converted models are kept (default ~/.cache/leanfit; `leanfit cache list` "
              "shows it)")


def main(argv=None) -> int:
    p = OneLineParser(prog="leanfit cache", description=__doc__.split("\n")[0], epilog=CACHE_HELP)
    p.add_argument("action", choices=("list", "clear"), help="list the converted models, or remove them all")
    args = p.parse_args(argv)
    root = cache_root()
    if args.action == "clear":
        removed = clear_cache()
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {root}")
        return 0
    entries = cache_entries()
    print(f"{root}: {len(entries)} converted model(s), {format_bytes(sum(n for _, n in entries))}")
    for path, size in entries:
        print(f"  {path.name:<40}{format_bytes(size):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
