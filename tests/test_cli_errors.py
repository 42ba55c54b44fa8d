import os
import subprocess
import sys

import pytest

from leanfit.train.finetune import main as finetune_main
from leanfit.train.generate import main as generate_main
from tests.tiny_lm import tiny_model_dir


def corpus_file(tmp_path, content):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    return path


CORPUS_CASES = {
    "missing": (None, "not found"),
    "empty": (b"", "empty"),
    "too-short": (b"Just a few words.", "shorter than one block"),
    "non-utf8": ("caf\xe9 ".encode("latin-1") * 50, "--encoding"),
    "binary": (bytes(range(256)) * 8, "binary"),
}


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("leanfit "), err
    return lines[0]


@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_bad_corpus(tmp_path, capsys, case):
    content, message = CORPUS_CASES[case]
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir("gpt2")), "--corpus", str(corpus_file(tmp_path, content)),
            "--block-size", "64", "--out", str(out), "--device", "cpu"]
    assert finetune_main(argv) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [
    ("--iters", "0"), ("--lr", "-1e-4"), ("--batch-size", "-2"), ("--block-size", "0"), ("--lr", "nan"),
    ("--eval-every", "x"),
])
def test_non_positive_numbers(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        finetune_main([flag, value, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert flag in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_unknown_model_offline(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "c.txt").write_text("some text " * 200)
    argv = ["--model", "nobody/no-such-model", "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "out")]
    assert finetune_main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "nobody/no-such-model" in line and "offline choices: smollm2-135m" in line
    assert generate_main(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "offline choices" in one_line_error(capsys.readouterr().err)


def test_generate_bad_numbers(capsys):
    with pytest.raises(SystemExit) as exit_:
        generate_main(["--max-length", "0"])
    assert exit_.value.code == 2 and "--max-length" in one_line_error(capsys.readouterr().err)


def test_console_script_end_to_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "leanfit.train.cli", "finetune", "--model", "nobody/no-such-model",
           "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "corpus not found" in one_line_error(proc.stderr)
    (tmp_path / "c.txt").write_text("some text " * 200)
    cmd[7] = str(tmp_path / "c.txt")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "offline choices" in one_line_error(proc.stderr)
    assert not (tmp_path / "out").exists()
