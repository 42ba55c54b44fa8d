"""Fixtures of the train tests: a small corpus and a prompts file in the test's own folder."""

import pytest

from tests.tiny_lm import TRAIN_TEXT


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TRAIN_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("You are a\nYou are an\n", encoding="utf-8")
    return path
