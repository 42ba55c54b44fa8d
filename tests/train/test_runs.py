"""Runs that cannot be hijacked, lost or silently corrupted: state files without pickle, checkpoint units that a
kill cannot tear, out folders that are never clobbered, and bad input refused before any slow work."""

import json
import math
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanfit.train.checkpointing import checkpoint
from leanfit.train.checkpointing.checkpoint import latest_unit, list_units
from leanfit.train.checkpointing.state_files import StateFileError, load_state, save_state
from leanfit.train.commands.estimate import main as estimate_main
from leanfit.train.commands.evaluate import main as evaluate_main
from leanfit.train.commands.finetune import main as finetune_main
from leanfit.train.commands.generate import main as generate_main
from leanfit.train.model import loading as models
from tests.tiny_lm import TRAIN_TEXT, tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus(corpus, prompts):
    """The shared corpus, with the shared prompts.txt beside it (argv passes both)."""
    return corpus


def argv(tmp_path, corpus, out="run", *extra):
    return ["--model", str(tiny_model_dir("gpt2")), "--corpus", str(corpus), "--block-size", "16", "--batch-size",
            "2", "--iters", "6", "--warmup", "1", "--lr", "5e-4", "--eval-every", "3", "--val-fraction", "0.2",
            "--device", "cpu", "--out", str(tmp_path / out), "--num-return-sequences", "1", "--max-length", "12",
            "--prompts", str(tmp_path / "prompts.txt"),
            "--eval-contexts", "0", "--no-eval-study", "--save-every", "2", *extra]


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanfit ") and "Traceback" not in err, err
    return lines[0]


TIMINGS = ("tokens_per_s", "step_s", "peak_mem_mb")


def train_records(out):
    """The metrics of a run without its timings (which no two runs share)."""
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


class Payload:
    """A pickle that, when loaded, creates `marker`: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(path, marker):
    path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: the checks under test must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for name in ("recipe.finetune.load_for_training", "model.lora.load_model", "commands.evaluate.load_model",
                 "commands.generate.load_model"):
        monkeypatch.setattr(f"leanfit.train.{name}", refuse)


def test_state_files_round_trip_types_that_json_alone_would_lose(tmp_path):
    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.randn(4, 3), "step": torch.tensor(3.0)},
                                                7: {"mom": torch.arange(5, dtype=torch.bfloat16)}},
                                      "param_groups": [{"betas": (0.9, 0.95), "params": [0, 7], "lr": math.inf}]},
             "rng": {"python": (3, (1, 2, 3), None), "torch": torch.get_rng_state()}, "nan": math.nan, "none": None}
    save_state(tmp_path, "s", state)
    back = load_state(tmp_path, "s")
    assert set(back["optimizer"]["state"]) == {0, 7}
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["state"][7]["mom"].dtype == torch.bfloat16
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["optimizer"]["param_groups"][0]["lr"] == math.inf and math.isnan(back["nan"])
    assert back["rng"]["python"] == (3, (1, 2, 3), None) and torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert load_state(tmp_path, "s", tensors=False)["optimizer"]["state"][0]["exp_avg"] is None


def test_a_pickle_in_place_of_a_state_file_is_refused_and_never_runs(tmp_path):
    save_state(tmp_path, "s", {"x": torch.ones(2)})
    marker = tmp_path / "pwned"
    hostile(tmp_path / "s.safetensors", marker)
    with pytest.raises(StateFileError, match="s.safetensors cannot be read"):
        load_state(tmp_path, "s")
    assert not marker.exists()


@pytest.mark.slow
def test_a_kill_at_every_step_of_a_save_leaves_the_previous_or_the_new_unit(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.train.crash_worker", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [r["before"] for r in results]
    assert {"model", "train state", "manifest", "fsync", "publish", "export rename", "prune"} <= set(steps), steps
    published = steps.index("publish")
    for r in results:
        assert r["killed"], r
        assert r["step"] == (6 if r["at"] > published + 1 else 4), r
        assert r["same"] and r["weights"] and not r["skipped"], r
        assert r["link"] in r["units"], r
        assert not r["left"], r


@pytest.mark.slow
def test_resume_after_sigkill_in_a_save_equals_an_uninterrupted_run_bit_for_bit(tmp_path, corpus):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cli = [sys.executable, "-m", "leanfit", "finetune"]
    whole = subprocess.run(cli + argv(tmp_path, corpus, "whole"), capture_output=True, text=True, env=env,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    ops_per_save = 11  # units folder ... export rename: tests/train/crash_worker.py lists them; no prune below 3 units
    for name, op in (("before-publish", ops_per_save + 5), ("after-publish", ops_per_save + 9)):
        killed = subprocess.run(cli + argv(tmp_path, corpus, name), capture_output=True, text=True, timeout=600,
                                env=dict(env, LEANFIT_TEST_FAULT=f"kill@{op}"))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        resumed = subprocess.run(cli + ["--resume", str(tmp_path / name)], capture_output=True, text=True,
                                 env=env, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"from step-00000{2 if name == 'before-publish' else 4}" in resumed.stdout
        assert train_records(tmp_path / name) == train_records(tmp_path / "whole"), name
        assert not [p for p in (tmp_path / name / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_the_previous_unit_stays(tmp_path, corpus):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    size = (out / "checkpoints" / "step-000002" / "model.safetensors").stat().st_size

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = subprocess.run([sys.executable, "-m", "leanfit", "finetune", "--resume", str(out), "--iters", "4"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=600,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "could not save checkpoint step-000004" in line and "step-000002 is intact" in line
    unit, state, skipped = latest_unit(out)
    assert unit.name == "step-000002" and state["step"] == 2 and not skipped
    assert [u.name for u in list_units(out)] == ["step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_units_are_pruned_to_keep_last_and_the_export_is_the_newest(tmp_path, corpus):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--keep-last", "2")) == 0
    assert [u.name for u in list_units(out)] == ["step-000004", "step-000006"]
    assert os.readlink(out / "checkpoint") == "checkpoints/step-000006"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint")


@pytest.mark.parametrize("flag, value", [("--model", "gpt2"), ("--block-size", "8"), ("--corpus", "OTHER")])
def test_resume_refuses_to_change_what_defines_the_run(tmp_path, corpus, capsys, flag, value):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    capsys.readouterr()
    if value == "OTHER":
        value = str(tmp_path / "other.txt")
        Path(value).write_text(TRAIN_TEXT + " and more")
    before = sorted(p.name for p in out.rglob("*"))
    assert finetune_main(["--resume", str(out), flag, value]) == 2
    line = one_line(capsys.readouterr().err)
    assert flag in line and "a resumed run keeps its" in line
    assert sorted(p.name for p in out.rglob("*")) == before


def test_resume_records_the_settings_it_changes(tmp_path, corpus):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    assert finetune_main(["--resume", str(out), "--iters", "4", "--eval-every", "2"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumes"] == [{"step": 2, "changed": {"iters": [2, 4], "eval_every": [3, 2]}}]
    assert run["config"]["iters"] == 4 and run["summary"]["steps"] == 4


def test_a_corpus_whose_content_changed_cannot_be_resumed(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    corpus.write_text(TRAIN_TEXT.replace("vampire", "werewolf"))
    capsys.readouterr()
    assert finetune_main(["--resume", str(out), "--iters", "4"]) == 2
    assert "not the one this run trained on" in one_line(capsys.readouterr().err)


def test_a_fresh_run_never_clobbers_an_existing_folder_without_overwrite(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    first_run = json.loads((out / "run.json").read_text())["run_id"]
    capsys.readouterr()
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 2
    assert "already holds a leanfit run" in one_line(capsys.readouterr().err)
    assert json.loads((out / "run.json").read_text())["run_id"] == first_run

    mine = tmp_path / "mine"
    (mine / "checkpoint").mkdir(parents=True)
    (mine / "checkpoint" / "notes.txt").write_text("my notes")
    (mine / "report.md").write_text("my report")
    assert finetune_main(argv(tmp_path, corpus, "mine", "--iters", "2")) == 2
    assert "is not empty and is not a leanfit run" in one_line(capsys.readouterr().err)
    assert (mine / "checkpoint" / "notes.txt").read_text() == "my notes"
    assert (mine / "report.md").read_text() == "my report"

    (out / "keep.txt").write_text("not the run's")
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2", "--overwrite")) == 0
    assert json.loads((out / "run.json").read_text())["run_id"] != first_run
    assert (out / "keep.txt").read_text() == "not the run's"
    assert [u.name for u in list_units(out)] == ["step-000002"]


def test_a_half_overwritten_folder_is_not_resumed_with_spliced_parts(tmp_path, corpus, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert finetune_main(argv(tmp_path, corpus, "a", "--iters", "2")) == 0
    assert finetune_main(argv(tmp_path, corpus, "b", "--iters", "2")) == 0
    shutil.copy(b / "run.json", a / "run.json")
    capsys.readouterr()
    assert finetune_main(["--resume", str(a), "--iters", "4"]) == 2
    assert "belongs to another run" in one_line(capsys.readouterr().err)


def test_a_truncated_newest_unit_is_passed_over_for_the_previous_one(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "4")) == 0
    state_file = out / "checkpoints" / "step-000004" / "train_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:100])
    capsys.readouterr()
    assert finetune_main(["--resume", str(out), "--iters", "6"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.out and "from step-000002" in captured.out
    assert "passing over a damaged checkpoint" in captured.err and "train_state.safetensors" in captured.err
    assert [u.name for u in list_units(out)] == ["step-000004", "step-000006"]
    assert latest_unit(out)[1]["step"] == 6
    shutil.rmtree(out / "checkpoints" / "step-000006")
    state_file.write_bytes(state_file.read_bytes()[:100])
    assert finetune_main(["--resume", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no complete checkpoint" in line and "train_state.safetensors" in line


def test_leftovers_of_an_interrupted_save_are_removed_at_the_next_start(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    (out / "checkpoints" / ".tmp-step-000004-dead").mkdir()
    (out / "checkpoints" / ".tmp-step-000004-dead" / checkpoint.PARTIAL).write_text("run id")
    (out / "checkpoints" / ".tmp-step-000004-dead" / "model.safetensors").write_bytes(b"half")
    os.symlink("checkpoints/step-000002", out / ".checkpoint.tmp-dead")
    (out / ".metrics.jsonl.abc.tmp").write_text("half")
    capsys.readouterr()
    assert finetune_main(["--resume", str(out), "--iters", "4"]) == 0
    assert "removed from" in capsys.readouterr().out
    assert not [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]


def test_an_old_pickled_train_state_is_never_loaded(tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir("gpt2"), old / "checkpoint")
    marker = tmp_path / "pwned"
    hostile(old / "train_state.pt", marker)
    (old / "run.json").write_text(json.dumps({"config": {"iters": 4}, "summary": {"status": "interrupted"}}))
    assert finetune_main(["--resume", str(old)]) == 2
    assert "older leanfit" in one_line(capsys.readouterr().err)
    (old / "notes.txt").write_text("mine")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TRAIN_TEXT)
    (tmp_path / "prompts.txt").write_text("You are a\n")
    capsys.readouterr()
    assert finetune_main(argv(tmp_path, corpus, "old", "--iters", "2", "--overwrite")) == 2
    assert "was not made by leanfit" in one_line(capsys.readouterr().err)
    assert (old / "train_state.pt").exists() and (old / "notes.txt").read_text() == "mine"
    assert (old / "checkpoint" / "config.json").is_file() and not list_units(old)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["finetune", "generate", "evaluate"])
def test_pickle_weights_are_refused_and_never_run(tmp_path, corpus, capsys, command):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir("gpt2"), folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    hostile(folder / "pytorch_model.bin", marker)
    if command == "finetune":
        code = finetune_main(argv(tmp_path, corpus, "run")[2:] + ["--model", str(folder)])
    elif command == "generate":
        code = generate_main(["--model", str(folder), "--prompt", "You are"])
    else:
        code = evaluate_main(["--model", str(folder), "--corpus", str(corpus), "--block-size", "16"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "pickle weights (pytorch_model.bin)" in line and "save_pretrained" in line
    assert not marker.exists()


def test_pickles_beside_safetensors_weights_are_never_opened(tmp_path, corpus):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir("gpt2"), folder)
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        hostile(folder / name, marker)
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")[2:] + ["--model", str(folder)]) == 0
    unit = tmp_path / "run" / "checkpoints" / "step-000002"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "train_state.pt"):
        hostile(unit / name, marker)
    assert finetune_main(["--resume", str(tmp_path / "run"), "--iters", "4"]) == 0
    assert generate_main(["--model", str(tmp_path / "run" / "checkpoint"), "--prompt", "You", "--max-length",
                          "6", "--num-return-sequences", "1"]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("case", ["prompts-missing", "prompts-empty", "max-length", "out-is-file", "out-under-file",
                                  "lr-inf", "seed-huge", "seed-float", "triton-on-cpu", "save-every"])
def test_bad_finetune_input_is_one_line_before_any_weight_and_writes_nothing(tmp_path, corpus, capsys, monkeypatch,
                                                                              no_weights, case):
    extra, message = {
        "prompts-missing": (["--prompts", str(tmp_path / "none.txt")], "prompts file not found"),
        "prompts-empty": (["--prompts", str(tmp_path / "empty.txt")], "has no prompts"),
        "max-length": (["--max-length", "2"], "--max-length 2 counts the prompt's tokens"),
        "out-is-file": (["--out", str(tmp_path / "file")], "is a file"),
        "out-under-file": (["--out", str(tmp_path / "file" / "run")], "cannot write in"),
        "lr-inf": (["--lr", "inf"], "--lr"),
        "seed-huge": (["--seed", str(10**23)], "--seed"),
        "seed-float": (["--seed", "1e23"], "--seed"),
        "triton-on-cpu": (["--loss", "triton"], "--loss triton needs a CUDA device"),
        "save-every": (["--save-every", "soon"], "save_every"),
    }[case]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "file").write_text("a file")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = finetune_main(argv(tmp_path, corpus, "run") + extra)
    except SystemExit as e:  # argparse's own refusals exit from the parser
        code = e.code
    assert code == 2
    assert message in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_evaluate_and_estimate_input_is_one_line_before_any_weight(tmp_path, corpus, capsys, no_weights):
    model = str(tiny_model_dir("gpt2"))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert evaluate_main(["--model", model, "--corpus", str(corpus), "--json", str(folder)]) == 2
    assert "--json" in one_line(capsys.readouterr().err)
    mine = tmp_path / "mine.json"
    mine.write_text("my results")
    assert evaluate_main(["--model", model, "--corpus", str(corpus), "--json", str(mine)]) == 2
    assert "already exists" in one_line(capsys.readouterr().err) and mine.read_text() == "my results"
    assert evaluate_main(["--model", model, "--corpus", str(corpus), "--block-size", "300"]) == 2
    assert "more than the model's 256 positions" in one_line(capsys.readouterr().err)
    assert estimate_main(["--model", "gpt2", "--block-size", "5000"]) == 2
    assert "more than the model's 1024 positions" in one_line(capsys.readouterr().err)


def test_a_corrupt_run_json_is_named_and_rebuilt_from_the_newest_unit(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    (out / "run.json").write_text('{"config": ')
    capsys.readouterr()
    assert finetune_main(["--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'run.json'} is not valid JSON" in err and "rebuilt from the newest verified" in err
    assert json.loads((out / "run.json").read_text())["schema"] == "leanfit.run/1"


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path, corpus, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert finetune_main(argv(tmp_path, corpus, "run")[2:] + ["--model", "nobody/not-cached"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "not in the local HF cache and the hub cannot be reached" in line
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_without_a_and_an_tokens_trains_with_the_probe_skipped(tmp_path, corpus, capsys):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    chars = sorted(set(TRAIN_TEXT))
    tok = Tokenizer(tok_models.WordLevel({c: i for i, c in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>",
                                        pad_token="<unk>")
    folder = tmp_path / "chars"
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(chars) + 1, n_embd=16, n_layer=1, n_head=2,
                                                n_positions=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = argv(tmp_path, corpus, "run", "--iters", "2", "--eval-contexts", "5")[2:] + ["--model", str(folder)]
    assert finetune_main(args) == 0
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())
    assert after["probe"]["builtin"] is None and "expected" in after["probe"]["skipped"]
    assert capsys.readouterr().err.count("the a/an probe is skipped") >= 1


def test_the_cache_lists_and_clears_and_a_new_conversion_prunes_stale_ones(tmp_path, monkeypatch, capsys):
    from leanfit.train.commands.cache import main as cache_main

    monkeypatch.setenv("LEANFIT_CACHE", str(tmp_path / "cache"))
    gone, kept = tmp_path / "cache" / "smollm2-135m-old", tmp_path / "cache" / "smollm2-135m-other"
    for entry in (gone, kept):
        entry.mkdir(parents=True)
        (entry / "config.json").write_text("{}")
    (tmp_path / "kept.gguf").write_bytes(b"gguf")
    stat = (tmp_path / "kept.gguf").stat()
    (kept / models.SOURCE).write_text(json.dumps({"gguf": str(tmp_path / "kept.gguf"), "size": stat.st_size,
                                                  "mtime_ns": stat.st_mtime_ns}))
    (gone / models.SOURCE).write_text(json.dumps({"gguf": str(tmp_path / "removed.gguf"), "size": 1,
                                                  "mtime_ns": 1}))
    models._write_index(tmp_path / "cache", [gone.name, kept.name])
    (tmp_path / "cache" / "mine").mkdir()
    assert cache_main(["list"]) == 0
    assert "2 converted model(s)" in capsys.readouterr().out
    assert models._source_gone(gone) and not models._source_gone(kept)
    assert cache_main(["clear", "--yes"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [models.INDEX, "mine"]


def test_no_torch_load_without_weights_only_in_the_package():
    for folder in ("train", "kernels", "lstm_core"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path.name}:{n}: {line.strip()}"
                assert "trust_remote_code=True" not in line, f"{path.name}:{n}"
                assert "weights_only=False" not in line, f"{path.name}:{n}"


def test_checkpoint_fault_hook_injects_a_full_disk_before_a_step(tmp_path, monkeypatch):
    """The in-process version of the full disk: an ENOSPC before the manifest leaves no unit and no temp folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    state = {"step": 2, "run_id": "r", "metrics": []}
    checkpoint.save_unit(tmp_path, model, tokenizer, state)

    def full(what):
        if what == "manifest":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_HOOK", full)
    with pytest.raises(checkpoint.SaveError, match="No space left on device.*step-000002 is intact"):
        checkpoint.save_unit(tmp_path, model, tokenizer, {**state, "step": 4})
    assert [u.name for u in list_units(tmp_path)] == ["step-000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
