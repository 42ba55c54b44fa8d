"""What the subcommands share: a parser whose errors are one line, number types, and exit codes.

Bad input exits with code 2 and one line on stderr (`leanfit finetune: error: ...`), with no traceback:
argparse errors, and every ValueError the job raises while checking its input (missing corpus, unknown
model, ...).
"""

import argparse
import json
import math
import os
import sys
import time

from ..config import MAX_SEED
from ..dtypes import dtype_name

__all__ = ["OneLineParser", "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fail",
           "record_failure", "flag_type", "dtype_flag", "seed_int"]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, error: BaseException) -> int:
    """Prints `error` on one line (under torchrun with the rank: `prog: error: rank R: ...`); returns 2."""
    text = " ".join(str(error).split()) or type(error).__name__
    rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""
    print(f"{prog}: error: {rank}{text}", file=sys.stderr, flush=True)
    record_failure(f"{rank}{text}")
    return 2


def record_failure(line: str):
    """Under `leanfit launch` (LEANFIT_ERROR_DIR set), keeps this rank's first error and its time."""
    folder = os.environ.get("LEANFIT_ERROR_DIR")
    if not folder:
        return
    path = os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.json")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"time": time.time(), "line": line}, f)


def _number(kind, check, expected):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
non_negative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a non-negative finite number")
seed_int = _number(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def flag_type(parse, name: str):
    """An argparse type from a function that raises ValueError with its own message (kept on the one line)."""

    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


dtype_flag = flag_type(dtype_name, "dtype")
