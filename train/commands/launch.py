"""`leanfit launch`: torchrun for `leanfit finetune`, with the finetune flags checked before any process starts
and the first failing rank's error as the last line.

    leanfit launch --nproc-per-node 2 finetune --parallel fsdp2 --corpus book.txt --out runs/book
    leanfit launch --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id book \\
        finetune --parallel fsdp2 ...

Everything before `finetune` is torchrun's (`torchrun --help`), everything after is `leanfit finetune`'s. It runs
torchrun's own launcher in this process (`torch.distributed.run`), so the ranks are torchrun's workers; when one
fails, torchrun stops the others, and this prints the rank whose error came first, on one line, and exits 1.
"""

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from .. import config as cfg
from .common import fail
from .finetune import parse_args

PROG = "leanfit launch"
USAGE = "usage: leanfit launch [torchrun options] finetune [finetune options]"


def _first_error(folder: Path, failures: dict) -> str:
    found = []
    for path in folder.glob("rank-*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        found.append((record["time"], record["line"]))
    if found:
        return min(found)[1]
    rank, failure = min(failures.items(), key=lambda kv: kv[1].timestamp)
    return f"rank {rank} exited with code {failure.exitcode} (its output is above)"


def _quiet_torchrun():
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}")
        return 0
    if "finetune" not in argv:
        return fail(PROG, f"expected `{USAGE.removeprefix('usage: ')}`, given no `finetune` in {' '.join(argv)!r}")
    cut = argv.index("finetune")
    torchrun_args, finetune_args = argv[:cut], argv[cut + 1:]
    try:
        config = cfg.validate(parse_args(finetune_args)[0])
        if config.parallel == "none":
            raise ValueError("expected --parallel ddp or fsdp2 (launch starts one process per rank), given none")
    except ValueError as e:
        return fail(PROG, e)
    from torch.distributed import run as torchrun  # deferred: the launcher is only needed here
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args([*torchrun_args, "-m", "leanfit.train.commands.finetune", *finetune_args])
    _quiet_torchrun()
    with tempfile.TemporaryDirectory(prefix="leanfit-launch-") as errors:
        os.environ["LEANFIT_ERROR_DIR"] = errors
        try:
            torchrun.run(args)
        except ChildFailedError as e:
            print(f"{PROG}: error: {_first_error(Path(errors), e.failures)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
