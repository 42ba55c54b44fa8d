"""`leanfit info`: what this install can run."""

import argparse
import os
import platform
import sys


def collect():
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["lstm_backends"] = ["reference"] + (
        ["triton"] if info["triton"] and (info["cuda"] or info["triton_interpret"]) else []
    )
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="leanfit info", description=__doc__)
    parser.parse_args(argv)
    for key, value in collect().items():
        print(f"{key:<17} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
