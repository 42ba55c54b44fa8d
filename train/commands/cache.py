"""`leanfit cache`: what the model cache holds (`LEANFIT_CACHE`, default ~/.cache/leanfit), and clearing it."""

import sys

from ..model.loading import cache_entries, cache_removals, cache_root, clear_cache
from ..units import format_bytes
from .common import OneLineParser, fail

CACHE_HELP = ("LEANFIT_CACHE: where converted models are kept (default ~/.cache/leanfit; `leanfit cache list` "
              "shows it)")
PROG = "leanfit cache"


def _confirm(root, doomed, yes: bool) -> bool:
    print(f"{root}: would remove {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'} leanfit made:")
    for p in doomed:
        print(f"  {p.name}")
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError("clear: not removing without confirmation (pass --yes when not at a terminal)")
    return input("remove them? [y/N] ").strip().lower() in ("y", "yes")


def _clear(yes: bool) -> int:
    root, doomed = cache_removals()
    if not doomed:
        print(f"removed 0 entries from {root} (nothing leanfit made is there)")
        return 0
    if not _confirm(root, doomed, yes):
        print("nothing removed")
        return 1
    removed = clear_cache()
    print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {root}")
    return 0


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0], epilog=CACHE_HELP)
    p.add_argument("action", choices=("list", "clear"),
                   help="list the converted models, or remove the ones leanfit's index records")
    p.add_argument("--yes", action="store_true", help="clear: remove without asking")
    args = p.parse_args(argv)
    try:
        if args.action == "clear":
            return _clear(args.yes)
        root, entries = cache_root(), cache_entries()
    except ValueError as e:
        return fail(PROG, e)
    print(f"{root}: {len(entries)} converted model(s), {format_bytes(sum(n for _, n in entries))}")
    for path, size in entries:
        print(f"  {path.name:<40}{format_bytes(size):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
