# N tokens, B batch (parallel streams), T window (TBPTT length), L stream length
"""The corpus as character (or byte) ids, split, and cut into parallel streams for truncated BPTT.

The training ids are cut into B contiguous streams of L ids; window w is the columns `[w*T, (w+1)*T)` of the
inputs and, shifted by one, of the targets. Consecutive windows continue each stream, so the LSTM state at the
end of window w is the right initial state of window w + 1 (carried, detached). An epoch is `L // T` windows;
the state starts from zero at each epoch. The last `val_fraction` of the ids is the validation text.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import CorpusError

__all__ = ["VOCABS", "Vocab", "Streams", "build_vocab", "split_ids", "make_streams", "unigram_bits"]

VOCABS = ("char", "byte")


@dataclass
class Vocab:
    """`kind` "byte": the 256 byte values of the UTF-8 text; "char": the corpus's own characters, sorted."""

    kind: str
    chars: str = ""

    @property
    def size(self) -> int:
        return 256 if self.kind == "byte" else len(self.chars)

    def encode(self, text: str) -> torch.Tensor:  # (N,) int64
        if self.kind == "byte":
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ValueError(f"characters outside the vocabulary: {''.join(unknown[:10])!r} (expected only the "
                             f"training corpus's characters)")
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def save_pretrained(self, folder):
        """vocab.json in `folder` (the checkpoint unit calls it, as it calls a tokenizer's)."""
        Path(folder, "vocab.json").write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder) -> "Vocab":
        d = json.loads(Path(folder, "vocab.json").read_text(encoding="utf-8"))
        return build_vocab("", d["kind"], d["chars"])


def build_vocab(text: str, kind: str = "char", chars: str | None = None) -> Vocab:
    if kind not in VOCABS:
        raise ValueError(f"vocab must be one of {VOCABS}, got {kind!r}")
    if kind == "byte":
        return Vocab("byte")
    return Vocab("char", chars if chars is not None else "".join(sorted(set(text))))


def split_ids(ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:  # ids: (N,)
    """(train, validation): the last `ceil(N * val_fraction)` ids are the validation text."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = math.ceil(ids.numel() * val_fraction)
    return ids[: ids.numel() - n_val], ids[ids.numel() - n_val:]


@dataclass
class Streams:
    inputs: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L)
    window: int  # T

    @property
    def windows(self) -> int:
        return self.inputs.shape[1] // self.window

    def batch(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T) each
        cols = slice(w * self.window, (w + 1) * self.window)
        return self.inputs[:, cols], self.targets[:, cols]


def make_streams(ids: torch.Tensor, streams: int, window: int, what: str = "training") -> Streams:  # ids: (N,)
    """`streams` parallel streams of whole windows; CorpusError when not even one window fits."""
    length = (ids.numel() - 1) // streams // window * window
    if length == 0:
        raise CorpusError(f"the {what} text has {ids.numel()} characters, shorter than one window of "
                          f"{streams} x {window} + 1 (expected a longer corpus or a smaller --batch-size or "
                          f"--block-size)")
    x = ids[: streams * length].view(streams, length)
    y = ids[1: streams * length + 1].view(streams, length)
    return Streams(x, y, window)


def unigram_bits(ids: torch.Tensor, vocab_size: int) -> float:  # ids: (N,)
    """The entropy of the ids' unigram distribution, in bits per character."""
    p = torch.bincount(ids, minlength=vocab_size).double() / ids.numel()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())
