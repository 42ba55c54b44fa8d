import os
import subprocess
import sys

import pytest

from leanfit.train.commands.estimate import build_parser as estimate_parser
from leanfit.train.commands.estimate import main as estimate_main
from leanfit.train.commands.evaluate import _parser as evaluate_parser
from leanfit.train.commands.finetune import main as finetune_main
from leanfit.train.commands.finetune import parse_args as finetune_parse
from leanfit.train.commands.generate import main as generate_main
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


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "leanfit", "finetune", "--model", "nobody/no-such-model",
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


def test_leanfit_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "leanfit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("finetune", "generate", "estimate", "evaluate", "info"):
        assert f"\n  {name} " in proc.stdout, proc.stdout


@pytest.mark.parametrize("spelling, canonical", [("fp32", "fp32"), ("float32", "fp32"), ("bf16", "bf16"),
                                                 ("bfloat16", "bf16"), ("FP16", "fp16"), ("float16", "fp16")])
def test_every_subcommand_takes_the_same_dtype_spellings(spelling, canonical):
    assert finetune_parse(["--dtype", spelling])[0].dtype == canonical
    assert estimate_parser().parse_args(["--dtype", spelling]).dtype == canonical
    assert evaluate_parser().parse_args(["--dtype", spelling]).dtype == canonical


@pytest.mark.parametrize("parse", ["finetune", "estimate", "evaluate"])
def test_a_dtype_outside_the_vocabulary_is_one_line_naming_both_spellings(capsys, parse):
    parsers = {"finetune": lambda a: finetune_parse(a), "estimate": lambda a: estimate_parser().parse_args(a),
               "evaluate": lambda a: evaluate_parser().parse_args(a)}
    with pytest.raises(SystemExit) as exit_:
        parsers[parse](["--dtype", "fp64"])
    line = one_line_error(capsys.readouterr().err)
    assert exit_.value.code == 2 and "'fp64'" in line and "bf16 (bfloat16)" in line


def test_block_size_is_the_tokens_the_model_sees_in_every_subcommand(tmp_path, capsys):
    """A model with 256 positions takes --block-size 256 everywhere (as GPT-2 takes 1024) and refuses 257."""
    model = str(tiny_model_dir("gpt2"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text " * 400)
    common = ["--model", model, "--corpus", str(corpus), "--device", "cpu", "--out", str(tmp_path / "out"),
              "--dry-run", "--batch-size", "1"]
    assert finetune_main([*common, "--block-size", "256"]) == 0
    assert "micro-batch 1 x 256 tokens" in capsys.readouterr().out
    assert estimate_main(["--model", model, "--block-size", "256", "--batch-size", "1", "--device", "cpu"]) == 0
    assert "micro-batch 1 x 256 tokens" in capsys.readouterr().out
    assert finetune_main([*common, "--block-size", "257"]) == 2
    assert "--block-size 256 or less" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
