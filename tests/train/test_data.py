import math

import pytest
import torch

from leanfit.train.data import (
    DEFAULT_CORPUS,
    BlockLoader,
    CorpusError,
    make_blocks,
    read_corpus,
    split_blocks,
    strip_gutenberg,
)
from tests.tiny_lm import TRAIN_TEXT, tiny_tokenizer


def test_embedded_corpus_is_stripped_of_gutenberg_matter():
    raw = DEFAULT_CORPUS.read_bytes().decode("utf-8").replace("\r\n", "\n")
    start = raw.index("*** START OF THE PROJECT GUTENBERG EBOOK DRACULA ***")
    end = raw.index("*** END OF THE PROJECT GUTENBERG EBOOK DRACULA ***")
    body = raw[raw.index("\n", start) + 1: end].strip()
    text = read_corpus(DEFAULT_CORPUS)
    assert text == body
    assert "gutenberg" not in text.lower()
    assert "\r" not in text and not text.startswith("\ufeff")
    assert text.startswith("DRACULA")
    assert "Jonathan Harker" in text and "CHAPTER I" in text


def test_strip_gutenberg_keeps_text_without_markers():
    assert strip_gutenberg("  no markers here\n") == "no markers here"


def test_strip_gutenberg_marker_variants():
    text = ("head\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nbody\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\ntail")
    assert strip_gutenberg(text) == "body"


def test_read_corpus_bom_crlf_and_folder(tmp_path):
    (tmp_path / "b.txt").write_bytes("\ufeffsecond\r\nfile".encode())
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / "skip.md").write_bytes(b"not a corpus")
    assert read_corpus(tmp_path) == "first\n\nsecond\nfile"
    assert read_corpus(tmp_path / "b.txt") == "second\nfile"


def test_read_corpus_other_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match="--encoding"):
        read_corpus(path)
    assert read_corpus(path, encoding="latin-1") == "caf\xe9 au lait"


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), (b"", "empty"), (b" \n\n \t", "empty"), (b"GIF89a\x00\x01\x02\x00" * 20, "binary")],
    ids=["missing", "empty", "blank", "binary"],
)
def test_read_corpus_errors(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_corpus(path)


def test_read_corpus_folder_without_txt(tmp_path):
    with pytest.raises(CorpusError, match="no .txt files"):
        read_corpus(tmp_path)


@pytest.mark.parametrize("block_size", [2, 7, 32], ids=lambda b: f"T{b}")
def test_make_blocks_packs_exactly(block_size):
    tokenizer = tiny_tokenizer()
    ids = tokenizer(TRAIN_TEXT, add_special_tokens=False)["input_ids"]
    blocks = make_blocks(TRAIN_TEXT, tokenizer, block_size)
    n = len(ids) // block_size
    assert blocks.shape == (n, block_size) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == ids[: n * block_size]


def test_make_blocks_too_short():
    with pytest.raises(CorpusError, match="shorter than one block"):
        make_blocks("tiny", tiny_tokenizer(), 64)


@pytest.mark.parametrize("n, fraction", [(10, 0.1), (10, 0.25), (7, 0.05), (5, 0.0)])
def test_split_blocks_is_contiguous_without_overlap(n, fraction):
    blocks = torch.arange(n * 5).view(n, 5)
    train, val = split_blocks(blocks, fraction)
    n_val = math.ceil(n * fraction)
    assert val.shape[0] == n_val and train.shape[0] == n - n_val
    assert torch.equal(torch.cat([train, val]), blocks)
    assert not set(train.flatten().tolist()) & set(val.flatten().tolist())


def test_split_blocks_needs_a_training_block():
    with pytest.raises(CorpusError, match="none are left"):
        split_blocks(torch.zeros(1, 5, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        split_blocks(torch.zeros(4, 5, dtype=torch.long), 1.0)


def test_loader_reshuffles_restarts_and_counts_epochs():
    blocks = torch.arange(10).view(10, 1).expand(10, 3).contiguous()
    loader = BlockLoader(blocks, batch_size=3, seed=5)
    assert loader.batches_per_epoch == 3
    epochs = []
    for _ in range(4):
        seen = torch.cat([loader.next_batch()[:, 0] for _ in range(loader.batches_per_epoch)]).tolist()
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
        epochs.append((loader.epoch, seen))
    assert [e for e, _ in epochs] == [0, 1, 2, 3]
    assert len({tuple(s) for _, s in epochs}) == 4
    again = BlockLoader(blocks, batch_size=3, seed=5)
    assert again.next_batch()[:, 0].tolist() == epochs[0][1][:3]
    other = BlockLoader(blocks, batch_size=3, seed=6)
    assert [other.next_batch()[:, 0].tolist() for _ in range(3)] != [epochs[0][1][i: i + 3] for i in (0, 3, 6)]


def test_loader_state_resumes_the_same_batches():
    blocks = torch.arange(13).view(13, 1)
    loader = BlockLoader(blocks, batch_size=4, seed=1)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch().tolist() for _ in range(7)]
    resumed = BlockLoader(blocks, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch().tolist() for _ in range(7)] == expected


def test_loader_rejects_a_batch_larger_than_the_data():
    with pytest.raises(CorpusError, match="larger than the 3 training blocks"):
        BlockLoader(torch.zeros(3, 4, dtype=torch.long), batch_size=4)
