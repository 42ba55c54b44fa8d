"""Run safety (issue 26): nothing leanfit did not make is deleted, one writer per run folder, resumes that skip a
damaged unit and survive a moved corpus or a truncated run.json."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leanfit.train.checkpointing import atomic
from leanfit.train.checkpointing.checkpoint import (
    MANIFEST,
    PARTIAL,
    clean_stale,
    latest_unit,
    list_units,
    save_unit,
    verify_unit,
)
from leanfit.train.checkpointing.lock import lock_run
from leanfit.train.commands.cache import main as cache_main
from leanfit.train.commands.finetune import main as finetune_main
from leanfit.train.model import loading as models
from tests.tiny_lm import TRAIN_TEXT, tiny_model_dir
from tests.train.test_runs import argv, one_line, train_records

ROOT = Path(__file__).resolve().parents[2]
FOREIGN = {"src/main.py": "print(1)", ".git/HEAD": "ref: main", ".draft.tmp": "draft",
           "checkpoints/epoch=3/weights.ckpt": "lightning", "checkpoints/.tmp-mine/a.txt": "mine"}


def plant(folder: Path, files=FOREIGN):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def intact(folder: Path, files=FOREIGN) -> bool:
    return all((folder / n).is_file() and (folder / n).read_text() == t for n, t in files.items())


@pytest.fixture
def corpus(corpus, prompts):
    """The shared corpus, with the shared prompts.txt beside it (argv passes both)."""
    return corpus


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("LEANFIT_CACHE", str(root))
    return root


def test_cache_clear_removes_only_the_indexed_entries_and_asks_first(cache, capsys):
    plant(cache)
    (cache / "smollm2-135m-abc" / "config.json").parent.mkdir()
    (cache / "smollm2-135m-abc" / "config.json").write_text("{}")
    (cache / ".smollm2-135m-abc.x1.tmp").mkdir()
    models._write_index(cache, ["smollm2-135m-abc", "..", ".git", "src/../.."])
    assert cache_main(["clear"]) == 2  # stdin is not a terminal: no silent removal
    assert "pass --yes" in one_line(capsys.readouterr().err) and (cache / "smollm2-135m-abc").is_dir()
    assert cache_main(["clear", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-abc" in out and "removed 2 entries" in out
    assert not (cache / "smollm2-135m-abc").exists() and not (cache / ".smollm2-135m-abc.x1.tmp").exists()
    assert intact(cache)


@pytest.mark.parametrize("where", ["empty", "no index", "home", "root"])
def test_cache_clear_refuses_a_folder_that_is_not_a_leanfit_cache(tmp_path, monkeypatch, capsys, where):
    folder = tmp_path / "demo"
    plant(folder)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(folder if where == "home" else tmp_path))
    value = {"empty": "", "no index": str(folder), "home": "~", "root": "/"}[where]
    monkeypatch.setenv("LEANFIT_CACHE", value)
    assert cache_main(["clear", "--yes"]) == 2
    line = one_line(capsys.readouterr().err)
    assert {"empty": "set but empty", "no index": "no leanfit index", "home": "home folder", "root": "/: refusing"}[
        where] in line
    assert intact(folder)


def test_clean_stale_removes_only_leftovers_leanfit_can_prove(tmp_path):
    out = tmp_path / "run"
    plant(out)
    partial = out / "checkpoints" / ".tmp-step-000004-dead"
    partial.mkdir()
    (partial / PARTIAL).write_text("run")
    (partial / "model.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".tmp-step-000006-empty").mkdir()
    (out / ".metrics.jsonl.abc.tmp").write_text("half")
    os.symlink("checkpoints/step-000002", out / ".checkpoint.tmp-dead")
    os.symlink("/etc", out / ".checkpoint.tmp-foreign")
    removed = clean_stale(out, ("metrics.jsonl",))
    assert removed == sorted([".tmp-step-000004-dead", ".tmp-step-000006-empty", ".metrics.jsonl.abc.tmp",
                              ".checkpoint.tmp-dead"])
    assert intact(out) and (out / ".checkpoint.tmp-foreign").is_symlink()


@pytest.mark.slow
def test_overwrite_removes_only_what_the_previous_run_recorded(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    plant(out)
    (out / "checkpoints" / "step-000002" / "notes.txt").write_text("mine")
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2", "--overwrite")) == 0
    kept = list((out / "checkpoints").glob(".kept-step-000002-*"))
    assert intact(out) and len(kept) == 1 and [p.name for p in kept[0].iterdir()] == ["notes.txt"]
    assert [u.name for u in list_units(out)] == ["step-000002"]

    lightning = tmp_path / "lightning"
    plant(lightning)
    capsys.readouterr()
    assert finetune_main(argv(tmp_path, corpus, "lightning", "--iters", "2")) == 2
    assert "is not a leanfit run" in one_line(capsys.readouterr().err)
    assert finetune_main(argv(tmp_path, corpus, "lightning", "--iters", "2", "--overwrite")) == 0
    assert intact(lightning)


def test_a_symlinked_checkpoints_folder_is_refused_in_one_line(tmp_path, corpus, capsys, no_weights):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "run"
    plant(elsewhere)
    out.mkdir()
    os.symlink(elsewhere / "checkpoints", out / "checkpoints")
    assert finetune_main(argv(tmp_path, corpus, "run", "--overwrite")) == 2
    assert "is a symlink or a file" in one_line(capsys.readouterr().err)
    assert intact(elsewhere)


@pytest.fixture
def no_weights(monkeypatch):
    from leanfit.train.recipe import finetune

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(finetune, "load_for_training", refuse)


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s run lock (as a live run would), until killed."""
    code = ("import sys, time; from leanfit.train.checkpointing.lock import lock_run; lock_run(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_locked_run_folder_refuses_a_second_writer_until_the_holder_dies(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        from leanfit.train.recipe import finetune

        monkeypatch.setattr(finetune, "load_for_training", lambda *a, **k: pytest.fail("loaded while locked"))
        assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 2
        line = one_line(capsys.readouterr().err)
        assert f"in use by another leanfit run (pid {holder.pid}, started " in line
        assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2", "--overwrite")) == 2
        assert f"pid {holder.pid}" in one_line(capsys.readouterr().err)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run(out).release()  # the kernel dropped the dead holder's lock: no stale lock to clear


@pytest.mark.slow
def test_a_resume_beside_a_live_run_is_refused_and_starts_once_the_holder_is_killed(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert finetune_main(argv(tmp_path, corpus, "run", "--iters", "2")) == 0
    holder = hold_lock(out)
    capsys.readouterr()
    try:
        assert finetune_main(["--resume", str(out), "--iters", "4"]) == 2
        assert f"pid {holder.pid}" in one_line(capsys.readouterr().err)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert finetune_main(["--resume", str(out), "--iters", "4"]) == 0
    assert [u.name for u in list_units(out)] == ["step-000002", "step-000004"]


def _flip(unit: Path):
    path = unit / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))


def _truncate(unit: Path):
    path = unit / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _manifest_list(unit: Path):
    (unit / MANIFEST).write_text("[]")


def _foreign_symlink(unit: Path):
    path = unit / "model.safetensors"
    foreign = unit.parents[2] / "foreign.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)
    foreign.write_bytes(bytes(data))
    path.unlink()
    os.symlink(foreign, path)


def _leaving_path(unit: Path):
    manifest = json.loads((unit / MANIFEST).read_text())
    entry = manifest["files"].pop("model.safetensors")
    manifest["files"]["../../../foreign.safetensors"] = entry
    shutil.copy(unit / "model.safetensors", unit.parents[2] / "foreign.safetensors")
    (unit / MANIFEST).write_text(json.dumps(manifest))


DAMAGES = {"flipped": (_flip, "SHA-256"), "truncated": (_truncate, "truncated"),
           "manifest []": (_manifest_list, "not a leanfit manifest"), "symlink": (_foreign_symlink, "symlink"),
           "../ path": (_leaving_path, "outside the unit")}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of 4 steps (units 2 and 4), and a copy of it resumed to 6 steps from unit 2 (unit 4 removed)."""
    root = tmp_path_factory.mktemp("four")
    (root / "corpus.txt").write_text(TRAIN_TEXT)
    (root / "prompts.txt").write_text("You are a\n")
    assert finetune_main(argv(root, root / "corpus.txt", "base", "--iters", "4")) == 0
    shutil.copytree(root / "base", root / "reference", symlinks=True)
    shutil.rmtree(root / "reference" / "checkpoints" / "step-000004")
    assert finetune_main(["--resume", str(root / "reference"), "--iters", "6"]) == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_unit_is_passed_over_with_one_warning(four_steps, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(four_steps / "base", run, symlinks=True)
    spoil, reason = DAMAGES[damage]
    spoil(run / "checkpoints" / "step-000004")
    capsys.readouterr()
    assert finetune_main(["--resume", str(run), "--iters", "6"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and reason in warnings[0] and "step-000004" in warnings[0], captured.err
    assert "from step-000002" in captured.out
    assert train_records(run) == train_records(four_steps / "reference")
    assert not (tmp_path / "foreign.safetensors").exists() or (tmp_path / "foreign.safetensors").stat().st_size


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_latest_unit_verifies_each_file_and_falls_back_to_the_previous_unit(tmp_path, damage):
    run = _two_units(tmp_path)
    spoil, reason = DAMAGES[damage]
    spoil(run / "checkpoints" / "step-000004")
    unit, state, skipped = latest_unit(run)
    assert unit.name == "step-000002" and state["step"] == 2
    assert len(skipped) == 1 and reason in skipped[0] and "step-000004" in skipped[0]
    assert verify_unit(unit)["files"]["model.safetensors"]["sha256"]


def test_no_verified_unit_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / MANIFEST).write_text("[]")
    (run / "run.json").write_text("")
    assert finetune_main(["--resume", str(run)]) == 2
    assert "no complete checkpoint" in one_line(capsys.readouterr().err)


@pytest.mark.slow
def test_resume_survives_a_relative_corpus_a_moved_one_and_an_empty_run_json(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path, corpus, "run", "--iters", "2")
    args[args.index("--corpus") + 1] = "corpus.txt"
    assert finetune_main(args) == 0
    run = str(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert finetune_main(["--resume", run, "--iters", "4"]) == 0
    moved = tmp_path / "moved.txt"
    corpus.rename(moved)
    capsys.readouterr()
    assert finetune_main(["--resume", run, "--iters", "6"]) == 2
    assert "give its new path with --corpus" in one_line(capsys.readouterr().err)
    assert finetune_main(["--resume", run, "--iters", "6", "--corpus", str(moved)]) == 0
    (tmp_path / "run" / "run.json").write_bytes(b"")
    capsys.readouterr()
    assert finetune_main(["--resume", run, "--iters", "8"]) == 0
    assert "rebuilt from the newest verified checkpoint" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["summary"]["steps"] == 8
    changed = tmp_path / "changed.txt"
    changed.write_text(TRAIN_TEXT + "more")
    assert finetune_main(["--resume", run, "--iters", "10", "--corpus", str(changed)]) == 2
    assert "the content of that corpus differs" in one_line(capsys.readouterr().err)


def test_run_json_is_written_synced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic, "fsync_path", lambda path: synced.append(Path(path)))
    atomic.atomic_write_json(tmp_path / "run.json", {"a": 1}, sync=True)
    assert synced[0].name.startswith(".run.json.") and synced[1] == tmp_path
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1}


def _two_units(tmp_path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    run = tmp_path / "run"
    for step in (2, 4):
        save_unit(run, model, tokenizer, {"step": step, "run_id": "r", "config": {}, "metrics": []})
    return run


def test_generate_on_a_damaged_unit_is_one_line(tmp_path, capsys):
    from leanfit.train.commands.generate import main as generate_main

    run = _two_units(tmp_path)
    _flip(run / "checkpoints" / "step-000004")
    assert generate_main(["--model", str(run / "checkpoint"), "--prompt", "You", "--max-length", "4",
                          "--num-return-sequences", "1", "--device", "cpu"]) == 2
    assert "does not match its SHA-256" in one_line(capsys.readouterr().err)


def test_a_full_disk_after_publishing_says_the_unit_was_saved(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanfit.train.checkpointing import checkpoint
    from leanfit.train.checkpointing.checkpoint import SaveError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))

    def full_at_fsync_units(what):
        if what == "fsync units":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_HOOK", full_at_fsync_units)
    with pytest.raises(SaveError, match="step-000002 was saved"):
        save_unit(tmp_path / "run", model, tokenizer, {"step": 2, "run_id": "r", "config": {}, "metrics": []})
    assert [u.name for u in list_units(tmp_path / "run")] == ["step-000002"]


def test_ctrl_c_outside_the_loop_is_one_line_and_exit_130(tmp_path, corpus, capsys, monkeypatch):
    from leanfit.train.commands import finetune as command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run", interrupted)
    assert finetune_main(argv(tmp_path, corpus)) == 130
    assert "interrupted" in one_line(capsys.readouterr().err)


def test_an_interrupted_summary_names_the_step_of_its_last_validation(capsys):
    from leanfit.train.commands.finetune import print_summary

    s = {"status": "interrupted", "out": "/nonexistent", "steps": 3, "device": "cpu", "seconds": 1.0,
         "val_ppl_start": 9.0, "val_ppl_end": 9.0, "val_step_end": 0}
    print_summary(s)
    assert "9.00 at the start -> 9.00 at step 0" in capsys.readouterr().out
    print_summary({**s, "status": "complete", "val_ppl_end": 5.0, "val_step_end": 3})
    assert "-> 5.00 at the end" in capsys.readouterr().out


def test_a_negative_allocator_margin_is_refused(capsys):
    from leanfit.train.commands.estimate import main as estimate_main

    with pytest.raises(SystemExit) as e:
        estimate_main(["--allocator-margin", "-1"])
    assert e.value.code == 2 and "--allocator-margin" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, expected", [
    (["--corpus", "short"], "shorter than one block"),
    (["--batch-size", "500"], "larger than the"),
    (["--val-fraction", "0.99"], "none are left to train on"),
])
def test_a_corpus_too_small_for_the_run_is_refused_before_any_weight(tmp_path, corpus, capsys, no_weights, flags,
                                                                      expected):
    (tmp_path / "short").write_text("You are a guest.")
    assert finetune_main(argv(tmp_path, corpus, "run", *[str(tmp_path / f) if f == "short" else f for f in flags])) == 2
    assert expected in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_tilde_in_a_path_flag_means_the_home_folder(tmp_path, monkeypatch, corpus):
    from leanfit.train.commands.finetune import parse

    monkeypatch.setenv("HOME", str(tmp_path))
    config, *_ = parse(["--out", "~/runs/a", "--corpus", "~/corpus.txt"])
    assert config.out == str(tmp_path / "runs" / "a") and config.corpus == str(corpus)


def test_a_memory_budget_beyond_the_device_is_warned(tmp_path, corpus, capsys):
    assert finetune_main(argv(tmp_path, corpus, "run", "--memory-budget", "10TB", "--dry-run")) == 0
    assert "warning: --memory-budget" in capsys.readouterr().err


def test_a_folder_is_replaced_in_one_swap(tmp_path, monkeypatch):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "old.txt").write_text("old")
    renames = []
    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    with atomic.atomic_dir(merged) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in merged.iterdir()] == ["new.txt"] and not renames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_sharded_optimizer_entry_must_stay_inside_its_unit_and_have_an_index(tmp_path):
    from leanfit.train.checkpointing.checkpoint import UnitError, _check_sharded

    unit = tmp_path / "unit"
    (unit / "optim").mkdir(parents=True)
    for entry, expected in (("../..", "outside the unit"), ("optim", "index.json is missing"), (3, "not a folder")):
        with pytest.raises(UnitError, match=expected):
            _check_sharded(unit, {"sharded": entry})


def test_a_unit_whose_train_state_is_malformed_or_points_outside_is_passed_over(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanfit.train.recipe.settings import resume_point

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    run = tmp_path / "run"
    save_unit(run, model, tokenizer, {"step": 2, "run_id": "r", "config": {}, "metrics": []})
    save_unit(run, model, tokenizer, {"step": 4, "run_id": "r", "config": {}, "metrics": [],
                                      "optimizer": {"sharded": "../..", "param_groups": []}})
    unit, _, skipped = latest_unit(run)
    assert unit.name == "step-000002" and "outside the unit" in skipped[0]
    with pytest.raises(ValueError, match="lacks corpus_sha256, loader"):
        resume_point(run)


def test_ctrl_c_while_a_command_starts_is_one_line_and_exit_130(monkeypatch, capsys):
    import importlib

    from leanfit.train import commands

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert commands.main(["finetune", "--help"]) == 130
    assert one_line(capsys.readouterr().err) == "leanfit finetune: error: interrupted"
