"""`leanfit info`: what this install can run; `--gpu`: the cards `--gpu` plans for (train/gpus.py)."""

import argparse
import os
import platform
import sys

from ..gpus import GPUS, KERNEL_WORDS


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


def gpu_table() -> str:
    """One line per card: the --gpu name, memory, what PyTorch gets, compute capability, bf16, SDPA kernels."""
    head = f"{'--gpu':<11}{'card':<18}{'memory':<13}{'usable':>10}  {'cc':<5}{'bf16':<6}SDPA kernel (fp16/bf16; fp32)"
    lines = [head]
    for g in GPUS.values():
        half = "bf16" if g.bf16 else "fp16"
        usable = f"{g.usable_bytes / 2**30:.2f} GiB" + ("*" if g.usable_source == "derived" else "")
        lines.append(f"{g.name:<11}{g.card:<18}{g.memory:<13}{usable:>10}  {'.'.join(map(str, g.capability)):<5}"
                     f"{'yes' if g.bf16 else 'no':<6}{KERNEL_WORDS[g.kernel(half)]}; {KERNEL_WORDS[g.kernel('fp32')]}")
    lines.append("usable: what PyTorch gets (torch.cuda.get_device_properties().total_memory) as users reported it; "
                 "*: derived, not reported. Sources: train/gpus.py")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="leanfit info", description=__doc__)
    parser.add_argument("--gpu", action="store_true", help="list the cards --gpu plans for")
    if parser.parse_args(argv).gpu:
        print(gpu_table())
        return 0
    for key, value in collect().items():
        print(f"{key:<17} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
