"""finetune's wiring of the memory issue (profiler, budget, dry run, optimizer in backward) and the run report."""

import json

import pytest
import torch

from leanfit.train.checkpointing.checkpoint import latest_unit
from leanfit.train.commands.finetune import main
from leanfit.train.recipe.context import Hooks
from leanfit.train.recipe.finetune import OutOfMemory, run
from leanfit.train.step import make_loss_fn
from tests.helpers import assert_close
from tests.tiny_lm import tiny_model_dir, tiny_run_config

PARAM_TOL = {torch.float32: (1e-5, 1e-4)}
SECTIONS = ["## Configuration", "## Loss curves", "## Memory", "## Perplexity", "## The a/an probe",
            "## Prompt studies", "## Samples"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("You are a || guest, vampire\nYou are an\n", encoding="utf-8")
    return path


def tiny(tmp_path, corpus, prompts, **overrides):
    return tiny_run_config(tmp_path, corpus, prompts, **{**dict(iters=4, warmup=1, lr=5e-4, eval_every=2,
                                                                eval_contexts=5), **overrides})


def argv(tmp_path, corpus, *extra):
    return ["--model", str(tiny_model_dir("gpt2")), "--corpus", str(corpus), "--block-size", "16",
            "--device", "cpu", "--out", str(tmp_path / "out"), *extra]


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanfit finetune: error: "), err
    return lines[0]


def test_a_run_writes_the_evaluations_the_report_and_a_memory_report_that_adds_up(tmp_path, corpus, prompts):
    summary = run(tiny(tmp_path, corpus, prompts))
    out = tmp_path / "run"
    assert summary["status"] == "complete"
    for name in ["eval_before.json", "eval_after.json", "report.md", "report.html", "memory_report.json",
                 "memory.png"]:
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if m["kind"] == "eval"]
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    assert before["perplexity"] == evals[0]["val_ppl"] and after["perplexity"] == evals[-1]["val_ppl"]
    assert before["probe"]["builtin"] is not None and after["probe"]["builtin"] is not None
    assert [p["prompt"] for p in after["prompts"]] == ["You are a", "You are an"]
    assert after["prompts"][0]["themes"] == ["guest", "vampire"]
    md = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    assert "data:image/png;base64," in (out / "report.html").read_text()

    report = json.loads((out / "memory_report.json").read_text())
    peak = report["peak"]
    assert peak["bytes"] > 0 and peak["bytes"] == sum(peak["breakdown"].values())
    assert [s["step"] for s in report["steps"]] == [1, 2, 3, 4]
    assert set(report["phases"]) == {"weights_loaded", "forward", "backward", "optimizer_step"}
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    param_bytes = sum(p.numel() * p.element_size() for p in fresh.parameters())
    assert peak["breakdown"]["parameters"] >= param_bytes
    assert peak["breakdown"]["optimizer_state"] >= 2 * param_bytes


def test_dry_run_with_a_budget_prints_a_choice_and_loads_and_writes_nothing(tmp_path, corpus, capsys,
                                                                            monkeypatch):
    import leanfit.train.model.loading as models

    def no_weights(*a, **k):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(models, "load_model", no_weights)
    assert main(argv(tmp_path, corpus, "--batch-size", "4", "--memory-budget", "1GiB", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "chosen: micro-batch 4 x 16 tokens, 1 accumulation step(s)" in out
    assert "fits in the budget of 1.00 GiB" in out and "dry run: nothing loaded or written" in out
    assert not (tmp_path / "out").exists()

    assert main(argv(tmp_path, corpus, "--batch-size", "4", "--memory-budget", "4KiB", "--dry-run")) == 2
    captured = capsys.readouterr()
    assert "nothing fits in" in one_line(captured.err)
    assert "does NOT fit" in captured.out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--optimizer-in-backward", "--grad-accum", "2", "--clip", "0"], "gradient accumulation"),
    (["--optimizer-in-backward", "--clip", "1.0"], "clipping"),
    (["--block-size", "257"], "positions"),
])
def test_bad_combinations_exit_2_with_one_line(tmp_path, corpus, capsys, extra, message):
    assert main(argv(tmp_path, corpus, *extra)) == 2
    assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_optimizer_in_backward_matches_the_normal_step(tmp_path, corpus, prompts):
    held = {}

    def keep(name):
        def writer(ctx):
            held[name] = dict(ctx.model.named_parameters())
            held[name + " optimizer"] = type(ctx.optimizer).__name__

        return Hooks(on_setup=[], writers={"complete": [writer]})

    common = dict(clip=0.0, iters=4, lr=5e-4, dtype="fp32")
    run(tiny(tmp_path, corpus, prompts, out=str(tmp_path / "a"), **common), hooks=keep("normal"))
    run(tiny(tmp_path, corpus, prompts, out=str(tmp_path / "b"), optimizer_in_backward=True, **common),
        hooks=keep("oib"))
    from transformers import AutoModelForCausalLM

    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")).named_parameters())
    assert (held["normal optimizer"], held["oib optimizer"]) == ("AdamW", "OptimizerInBackward")
    moved = 0
    for name, p in held["normal"].items():
        assert_close(f"param {name}", p.detach(), held["oib"][name].detach(), table=PARAM_TOL)
        moved += int(not torch.equal(p.detach(), start[name].detach()))
    assert moved == len(start)


def test_out_of_memory_saves_the_last_step_and_the_memory_report(tmp_path, corpus, prompts):
    loss, calls = make_loss_fn("chunked"), []

    def fails_in_step_3(model, blocks, num_items):
        calls.append(torch.is_grad_enabled())
        if sum(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss(model, blocks, num_items)

    with pytest.raises(OutOfMemory, match="out of memory in step 3"):
        run(tiny(tmp_path, corpus, prompts, eval_every=10), loss_fn=fails_in_step_3, hooks=Hooks(on_setup=[]))
    out = tmp_path / "run"
    report = json.loads((out / "memory_report.json").read_text())
    assert report["oom"]["step"] == 3 and report["oom"]["phase"] == "forward"
    unit, state, _ = latest_unit(out)
    assert unit.name == "step-000002" and state["step"] == 2
    assert (out / "checkpoint").is_dir()
    assert json.loads((out / "run.json").read_text())["summary"]["status"] == "out of memory"
