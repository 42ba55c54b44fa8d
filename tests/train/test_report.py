"""report.md / report.html of one run and of a comparison, from hand-written run folders."""

import base64
import json

import pytest

from leanfit.train.commands.report import main
from leanfit.train.evaluation.compare import write_comparison_report
from leanfit.train.evaluation.report import write_report

SECTIONS = ["## Configuration", "## Loss curves", "## Memory", "## Perplexity", "## The a/an probe",
            "## Prompt studies", "## Samples"]


def _png(path, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [seed, seed + 1, seed * 2])
    fig.savefig(path, format="png", dpi=30)
    plt.close(fig)


def _probe(acc_a, acc_an, mass_a, mass_an, n=4):
    return {"n": 2 * n, "accuracy": (acc_a + acc_an) / 2, "balanced_accuracy": (acc_a + acc_an) / 2,
            "a": {"n": n, "accuracy": acc_a, "mean_mass_correct": mass_a, "mean_share_correct": mass_a},
            "an": {"n": n, "accuracy": acc_an, "mean_mass_correct": mass_an, "mean_share_correct": mass_an}}


def _eval(label, ppl, probe, samples):
    return {"schema": "leanfit.evaluate/1", "model": label, "perplexity": ppl, "val_loss": 2.5, "val_tokens": 640,
            "val_blocks": 5, "probe": {"builtin": probe, "heldout": None}, "seconds": 1.0,
            "prompts": [{"prompt": "You are an", "themes": ["count"], "samples": samples, "distinct_1": 0.8125,
                         "distinct_2": 0.9375, "mean_logprob": -3.25, "theme_share": 0.5}]}


def make_run(path, lr, ppl_after, sample, memory=True):
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"config": {"model": "tiny", "lr": lr, "iters": 3},
                                               "summary": {"status": "complete", "steps": 3}}))
    lines = [{"kind": "eval", "step": 0, "val_loss": 3.0, "val_ppl": 20.0855}]
    lines += [{"kind": "train", "step": s, "loss": 3.0 - 0.25 * s, "lr": lr, "tokens_per_s": 1000.0,
               "peak_mem_mb": 10.0} for s in (1, 2, 3)]
    lines.append({"kind": "eval", "step": 3, "val_loss": 2.5, "val_ppl": 12.1825})
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    _png(path / "loss.png", 1)
    if memory:
        (path / "memory_report.json").write_text(json.dumps({
            "device": "cpu", "rss_peak_bytes": 5 * 2**20,
            "peak": {"bytes": 3 * 2**20, "step": 2, "phase": "backward",
                     "breakdown": {"parameters": 2**20, "activations": 2 * 2**20},
                     "top_modules": [["model.layers.0", 2**19]]},
            "phases": {"forward": {"peak_bytes": 2 * 2**20}, "backward": {"peak_bytes": 3 * 2**20}},
            "steps": []}))
        _png(path / "memory.png", 2)
    before = _eval("before", 20.0855, _probe(1.0, 1.0, 0.97, 0.96), ["You are an apple", "You are an owl"])
    after = _eval("after", ppl_after, _probe(1.0, 0.25, 0.51, 0.14), [sample, "You are an hour"])
    (path / "eval_before.json").write_text(json.dumps(before))
    (path / "eval_after.json").write_text(json.dumps(after))
    (path / "samples.jsonl").write_text(json.dumps({"prompt": "You are an",
                                                    "samples": [{"generated_text": sample}]}) + "\n")
    return path


def test_write_report_has_every_section(tmp_path):
    run = make_run(tmp_path / "run", 5e-5, 12.1825, "You are an old friend of the Count")
    md_path, html_path = write_report(run)
    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    md, page = md_path.read_text(), html_path.read_text()
    positions = [md.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    for text in ("20.09", "12.18", "0.625", "0.14", "You are an old friend of the Count", "backward",
                 "activations", "66.7%", "5e-05", "0.8125", "-3.25", "(loss.png)", "(memory.png)"):
        assert text in md, text
    for s in SECTIONS:
        assert f"<h2>{s[3:]}</h2>" in page
    for png in ("loss.png", "memory.png"):
        assert base64.b64encode((run / png).read_bytes()).decode() in page
    assert "src='http" not in page and "src=\"http" not in page
    assert "You are an old friend of the Count" in page


def test_report_without_optional_files(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"model": "tiny"}}))
    (run / "samples.jsonl").write_text(json.dumps({"prompt": "It was", "samples": [
        {"generated_text": "It was a dark night"}]}) + "\n")
    md = write_report(run)[0].read_text()
    assert "## Memory" not in md
    assert "No eval_before.json" in md and "It was a dark night" in md


def test_report_rejects_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        write_report(tmp_path / "nope")


def test_comparison_report(tmp_path):
    low = make_run(tmp_path / "low", 5e-5, 12.1825, "You are an old friend", memory=False)
    high = make_run(tmp_path / "high", 1e-2, 912.5, "You are an the the the", memory=False)
    md_path, html_path = write_comparison_report(tmp_path / "cmp", {"lr 5e-5": low, "lr 1e-2": high})
    md, page = md_path.read_text(), html_path.read_text()
    for text in ("## Configuration differences", "| lr | 5e-05 | 0.01 |", "## Loss curves", "## Perplexity",
                 "## The a/an probe", "## Samples", "after, lr 5e-5", "after, lr 1e-2", "912.5",
                 "You are an the the the", "You are an old friend", "before (pretrained)"):
        assert text in md, text
    assert "| iters |" not in md
    assert (tmp_path / "cmp" / "comparison_loss.png").is_file()
    assert base64.b64encode((tmp_path / "cmp" / "comparison_loss.png").read_bytes()).decode() in page


def test_report_cli(tmp_path, capsys):
    run = make_run(tmp_path / "run", 5e-5, 12.1825, "You are an owl")
    assert main([str(run)]) == 0
    assert (run / "report.html").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["--compare"])
    assert exc.value.code == 2
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error" in line for line in err), err


def test_finetune_hooks_write_evals_and_report(tmp_path):
    from leanfit.train.config import TrainConfig
    from leanfit.train.evaluation.evaluate import finetune_eval_before
    from leanfit.train.recipe.context import Hooks
    from leanfit.train.recipe.finetune import run
    from leanfit.train.recipe.outputs import WRITERS, write_eval_after
    from tests.tiny_lm import TRAIN_TEXT, tiny_model_dir

    corpus, prompts = tmp_path / "corpus.txt", tmp_path / "prompts.txt"
    corpus.write_text(TRAIN_TEXT)
    prompts.write_text("You are an\nThe Count said\n")
    out = tmp_path / "run"
    config = TrainConfig(model=str(tiny_model_dir("gpt2")), corpus=str(corpus), block_size=16, batch_size=2,
                         iters=2, warmup=1, eval_every=2, val_fraction=0.2, out=str(out), prompts=str(prompts),
                         max_length=12, num_return_sequences=2, device="cpu", loss="naive")
    run(config, hooks=Hooks(on_setup=[finetune_eval_before], writers={"complete": WRITERS["complete"]}))
    assert write_eval_after in WRITERS["complete"]
    before, after = (json.loads((out / f"eval_{n}.json").read_text()) for n in ("before", "after"))
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if m["kind"] == "eval"]
    assert before["perplexity"] == pytest.approx(evals[0]["val_ppl"]) and evals[0]["step"] == 0
    assert after["perplexity"] == pytest.approx(evals[-1]["val_ppl"]) and evals[-1]["step"] == 2
    assert [p["prompt"] for p in after["prompts"]] == ["You are an", "The Count said"]
    assert before["probe"]["builtin"]["n"] == after["probe"]["builtin"]["n"] > 0
    written = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [p["samples"] for p in after["prompts"]] == [[s["generated_text"] for s in w["samples"]] for w in written]
    md = (out / "report.md").read_text()
    for s in ("## Configuration", "## Loss curves", "## Perplexity", "## The a/an probe", "## Prompt studies",
              "## Samples"):
        assert s in md, s
