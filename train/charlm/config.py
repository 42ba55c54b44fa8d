"""`leanfit lstm`'s settings: one dataclass, its presets, and the checks that need no data."""

import math
from dataclasses import asdict, dataclass, fields

from ..config import MAX_SEED
from .data import VOCABS
from .model import BACKENDS

__all__ = ["LSTMConfig", "PRESETS", "DTYPES", "DEFAULT_PROMPTS", "validate", "from_dict", "to_dict"]

DTYPES = ("auto", "fp32", "bf16")
DEFAULT_PROMPTS = ("The Count ", "I was ", "Van Helsing ")


@dataclass
class LSTMConfig:
    corpus: str | None = None  # None: the embedded Dracula (train/data/dracula.txt)
    encoding: str = "utf-8"
    vocab: str = "char"
    embed: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0
    backend: str = "auto"
    block_size: int = 64  # characters per TBPTT window
    batch_size: int = 32  # parallel streams
    iters: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    clip: float = 1.0
    dtype: str = "auto"  # bf16 autocast on CUDA, fp32 elsewhere
    eval_every: int = 100
    eval_windows: int = 0  # validate on the first this many windows, 0: the whole held-out text
    val_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"
    out: str = "runs/lstm"
    prompts: str | None = None  # None: DEFAULT_PROMPTS
    max_length: int = 200  # characters per sample, prompt included
    num_return_sequences: int = 2
    temperature: float = 0.8
    top_k: int = 0  # 0: the whole vocabulary
    save_every: int = 100  # steps
    keep_last: int = 2
    profile_steps: int = 3  # steps under the memory profiler (its tensor tracking slows the CPU)


PRESETS = {
    # 1 x 256 LSTM, 32 streams x 64 characters = 2,048 characters a step x 300 steps (~0.7 epoch of Dracula)
    "cpu": dict(embed=32, hidden=256, layers=1, block_size=64, batch_size=32, iters=300, lr=4e-3, warmup=10,
                eval_every=100, eval_windows=20, save_every=100, max_length=160),
    # 2 x 1,024, 64 streams x 256 characters = 16,384 characters a step x 2,000 steps (~38 epochs)
    "gpu": dict(embed=128, hidden=1024, layers=2, dropout=0.2, block_size=256, batch_size=64, iters=2000,
                lr=2e-3, warmup=50, eval_every=250, save_every=500, dtype="bf16", max_length=400),
}

_CHOICES = {"vocab": VOCABS, "backend": BACKENDS[:3], "dtype": DTYPES, "schedule": ("cosine", "constant")}
_POSITIVE = ("embed", "hidden", "layers", "block_size", "batch_size", "iters", "eval_every", "max_length",
             "num_return_sequences", "save_every", "keep_last", "lr")


def validate(c: LSTMConfig) -> LSTMConfig:
    """ValueError naming the flag of the first bad setting."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, choices in _CHOICES.items():
        if getattr(c, name) not in choices:
            raise ValueError(f"{flag(name)}: expected one of {', '.join(choices)}, got {getattr(c, name)!r}")
    for name in _POSITIVE:
        if not getattr(c, name) > 0:
            raise ValueError(f"{flag(name)}: expected a positive value, got {getattr(c, name)!r}")
    if not 0 <= c.dropout < 1:
        raise ValueError(f"--dropout: expected a value in [0, 1), got {c.dropout}")
    if not 0 < c.val_fraction < 1:
        raise ValueError(f"--val-fraction: expected a value in (0, 1), got {c.val_fraction}")
    if not (c.temperature > 0 and math.isfinite(c.temperature)):
        raise ValueError(f"--temperature: expected a positive number, got {c.temperature}")
    if not 0 <= c.seed <= MAX_SEED:
        raise ValueError(f"--seed: expected an integer in [0, {MAX_SEED}], got {c.seed}")
    if c.block_size < 2:
        raise ValueError(f"--block-size: expected at least 2 characters a window, got {c.block_size}")
    return c


def to_dict(c: LSTMConfig) -> dict:
    return asdict(c)


def from_dict(d: dict) -> LSTMConfig:
    known = {f.name for f in fields(LSTMConfig)}
    return LSTMConfig(**{k: v for k, v in d.items() if k in known})
