# N blocks, B batch, T block size (tokens per sequence)
"""The corpus: read it, strip Project Gutenberg matter, pack tokens into blocks, split, and batch.

Token ids are concatenated and cut into N blocks of T tokens, as HF's `run_clm.py` groups texts: the model
sees all T tokens of a block and predicts the T - 1 next tokens `b[1:]` from `b[:-1]`. The last
`val_fraction` of blocks is the validation set, contiguous, so no training block shares a token with it.
`BlockLoader` shuffles the training blocks each epoch from `(seed, epoch)` alone, so its position is two
integers and a resumed run sees the same batches as an uninterrupted one.
"""

import hashlib
import math
import re
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_CORPUS",
    "CorpusError",
    "read_corpus",
    "strip_gutenberg",
    "make_blocks",
    "split_blocks",
    "BlockLoader",
]

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "dracula.txt"

_START = re.compile(r"^[ \t]*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$", re.I | re.M)
_END = re.compile(r"^[ \t]*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$", re.I | re.M)
_BINARY_CONTROL = set(range(0, 9)) | {11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31}


class CorpusError(ValueError):
    """A corpus that cannot be used: missing, empty, binary, wrongly encoded or too short."""


def strip_gutenberg(text: str) -> str:
    """Returns the text between the Project Gutenberg START and END marker lines, when they are present.

    Args:
        text: a whole book, with or without the markers.
    Returns:
        the text after the START line and before the END line (either may be absent), trimmed.
    Example:
        >>> strip_gutenberg("licence\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\nbody\\n"
        ...                 "*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nlicence")
        'body'
    """
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def _looks_binary(data: bytes) -> bool:
    head = data[:8192]
    if b"\x00" in head:
        return True
    return bool(head) and sum(b in _BINARY_CONTROL for b in head) / len(head) > 0.01


def _read_one(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    if _looks_binary(data):
        raise CorpusError(f"corpus file {path} looks binary (expected a text file)")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"corpus file {path} is not valid {encoding} (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"pass --encoding with the file's encoding, e.g. --encoding latin-1"
        ) from None
    except LookupError:
        raise CorpusError(f"unknown encoding {encoding!r} (expected a Python codec name, e.g. utf-8)") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg(text)


def text_sha256(text: str) -> str:
    """The SHA-256 of a corpus text (UTF-8), which a run records and a resume compares."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_corpus(path, encoding: str = "utf-8") -> str:
    """Reads a .txt file, or every .txt file of a folder in name order, without Gutenberg matter.

    Args:
        path: a text file or a folder of .txt files.
        encoding: the files' encoding.
    Returns:
        the text, with Unix newlines; a folder's files are joined by blank lines.
    Raises:
        CorpusError (a ValueError) for a missing path, an empty folder, a binary or wrongly encoded
        file, or a corpus with no text.
    Example:
        >>> text = read_corpus(DEFAULT_CORPUS)
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"corpus folder {path} has no .txt files (expected a .txt file or a folder of them)")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(f"corpus not found: {path} (expected a .txt file or a folder of .txt files)")
    text = "\n\n".join(t for t in (_read_one(p, encoding) for p in files) if t)
    if not text.strip():
        raise CorpusError(f"corpus {path} is empty (expected some text)")
    return text


def make_blocks(text: str, tokenizer, block_size: int) -> torch.Tensor:
    """Tokenizes `text` and cuts the ids into blocks of `block_size` tokens; a short tail is dropped.

    Args:
        text: the corpus.
        tokenizer: a HuggingFace tokenizer; no special tokens are added.
        block_size: tokens per block (the model's sequence length), at least 2.
    Returns:
        (N, block_size) int64 ids.
    Example:
        >>> blocks = make_blocks(read_corpus(DEFAULT_CORPUS), tokenizer, 128)
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    width = block_size
    n = len(ids) // width
    if n == 0:
        raise CorpusError(
            f"corpus has {len(ids)} tokens, shorter than one block of {width}; "
            f"use a longer corpus or a smaller --block-size"
        )
    return torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)


def split_blocks(blocks: torch.Tensor, val_fraction: float):  # blocks: (N, T)
    """Splits off the last `ceil(N * val_fraction)` blocks, contiguously, as validation.

    Returns:
        (train, val): (N - n_val, T) and (n_val, T).
    Example:
        >>> train, val = split_blocks(blocks, 0.05)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = blocks.shape[0]
    n_val = math.ceil(n * val_fraction) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise CorpusError(
            f"corpus gives {n} block(s) of {blocks.shape[1]} tokens; {n_val} go to validation and none are "
            f"left to train on: use a longer corpus, a smaller --block-size or a smaller --val-fraction"
        )
    return blocks[: n - n_val], blocks[n - n_val:]


class BlockLoader:
    """Endless batches of training blocks, reshuffled each epoch from `(seed, epoch)`.

    An epoch yields `N // (batch_size * world_size)` full global batches; the loader then starts the next
    epoch, so it never runs dry. Over several ranks, rank r takes the r-th `batch_size` blocks of each global
    batch, so the ranks read distinct blocks and together the blocks one process with `batch_size *
    world_size` would read. `state_dict()` is `{"epoch", "cursor", "seed"}` (the cursor counts global blocks,
    so a run resumed at another world size continues from the same place); loading it resumes at the same batch.

    Example:
        >>> loader = BlockLoader(train_blocks, batch_size=4, seed=0)
        >>> batch = loader.next_batch()  # (4, T)
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):  # blocks: (N, T)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if batch_size * world_size > blocks.shape[0]:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise CorpusError(
                f"batch size {batch_size}{ranks} is larger than the {blocks.shape[0]} training blocks; "
                f"use a smaller --batch-size or --block-size, or a longer corpus"
            )
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.blocks.shape[0] // (self.batch_size * self.world_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.blocks.shape[0], generator=gen)

    def next_batch(self) -> torch.Tensor:  # (B, T)
        span = self.batch_size * self.world_size
        if self.cursor + span > self.blocks.shape[0]:
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        start = self.cursor + self.rank * self.batch_size
        idx = self._order[start: start + self.batch_size]
        self.cursor += span
        return self.blocks[idx]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict):
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        self._order = self._permutation(self.epoch)
