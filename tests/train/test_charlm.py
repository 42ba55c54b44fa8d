"""`leanfit lstm`: the model against nn.LSTM + F.cross_entropy, TBPTT state carrying, exact resume after a kill,
the CPU preset's learning, and one-line errors for bad input."""

import collections
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from leanfit.train.charlm.data import build_vocab, make_streams
from leanfit.train.charlm.loop import sample
from leanfit.train.charlm.model import CharLM, ModelShape
from leanfit.train.charlm.outputs import run as run_lstm
from leanfit.train.commands import lstm as cli
from leanfit.train.data import DEFAULT_CORPUS, read_corpus
from tests.helpers import HAS_TRITON, TRITON_DEVICE, assert_close

ROOT = Path(__file__).resolve().parents[2]
SHAPE = ModelShape(vocab_size=11, embed=6, hidden=8, layers=2)


def _windows(steps=5, batch=2, window=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SHAPE.vocab_size, (steps * batch * window + 1,), generator=g)
    return make_streams(ids, batch, window)


def _reference_loss(model, lstm, x, y, state):  # x, y: (B, T)
    """nn.LSTM and full logits through F.cross_entropy, with the model's embedding and head."""
    h, state = lstm(model.embed(x.t()), state)
    logits = F.linear(h, model.head.weight, model.head.bias)
    return F.cross_entropy(logits.reshape(-1, SHAPE.vocab_size), y.t().reshape(-1)), state


def _curve(model, streams, loss_fn, device):
    """Five AdamW steps over consecutive windows, the state carried (detached); (losses, first gradients)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads, state = [], None, None
    for w in range(streams.windows):
        x, y = (t.to(device) for t in streams.batch(w))
        loss, state = loss_fn(x, y, state)
        loss.backward()
        if grads is None:
            grads = {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        state = tuple(s.detach() for s in state)
        losses.append(loss.detach().cpu())
    return torch.stack(losses), grads


def _nn_lstm_curve(like, streams):
    model = CharLM(SHAPE, "reference")
    model.load_state_dict(like.state_dict())
    lstm = torch.nn.LSTM(SHAPE.embed, SHAPE.hidden, SHAPE.layers)
    lstm.load_state_dict(model.lstm.state_dict())
    params = [*model.embed.parameters(), *lstm.parameters(), *model.head.parameters()]
    model.lstm = lstm  # its parameters move with the model's optimizer below
    assert len(list(model.parameters())) == len(params)
    return _curve(model, streams, lambda x, y, s: _reference_loss(model, lstm, x, y, s), "cpu")


def test_reference_backend_matches_nn_lstm_with_full_logits_over_a_tbptt_curve():
    streams = _windows()
    ours = CharLM(SHAPE, "reference")
    expected, ref_grads = _nn_lstm_curve(ours, streams)
    losses, grads = _curve(ours, streams, ours.loss, "cpu")
    assert_close("losses", expected, losses)
    for name, g in ref_grads.items():
        assert_close(f"grad {name}", g, grads[name])
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_gives_the_reference_backends_loss_curve():
    streams = _windows()
    reference = CharLM(SHAPE, "reference")
    fused = CharLM(SHAPE, "triton").to(TRITON_DEVICE)
    fused.load_state_dict(reference.state_dict())
    expected, ref_grads = _curve(reference, streams, reference.loss, "cpu")
    losses, grads = _curve(fused, streams, fused.loss, TRITON_DEVICE)
    assert fused.loss_impl == "triton" and fused.lstm.backend == "triton"
    assert_close("losses", expected, losses, table={torch.float32: (1e-4, 1e-4)})
    for name, g in ref_grads.items():
        assert_close(f"grad {name}", g, grads[name], table={torch.float32: (1e-4, 1e-4)})


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_two_windows_of_32_carry_the_state_into_one_window_of_64(backend):
    model = CharLM(ModelShape(vocab_size=20, embed=8, hidden=12, layers=2), backend).eval()
    x = torch.randint(0, 20, (3, 64))
    with torch.no_grad():
        whole, (h, c) = model(x)
        first, state = model(x[:, :32])
        second, (h2, c2) = model(x[:, 32:], state)
    assert_close("outputs", whole, torch.cat([first, second]))
    assert_close("h_n", h, h2)
    assert_close("c_n", c, c2)
    assert not torch.allclose(model(x[:, 32:])[0], second)  # the carried state matters


def test_consecutive_windows_continue_each_stream_and_targets_are_the_next_character():
    ids = torch.arange(1000)
    streams = make_streams(ids, 4, 16)
    length = streams.inputs.shape[1]
    assert streams.windows == length // 16 and length * 4 < 1000
    for w in range(streams.windows):
        x, y = streams.batch(w)
        starts = torch.arange(4) * length + w * 16
        assert torch.equal(x[:, 0], starts)
        assert torch.equal(y, x + 1)
        if w:
            assert torch.equal(x[:, 0], streams.batch(w - 1)[0][:, -1] + 1)


def _argv(out, corpus, prompts, *extra):
    return ["--corpus", str(corpus), "--out", str(out), "--prompts", str(prompts), "--device", "cpu",
            "--embed", "8", "--hidden", "16", "--layers", "2", "--dropout", "0.1", "--block-size", "8",
            "--batch-size", "4", "--iters", "6", "--eval-every", "3", "--save-every", "2", "--keep-last", "5",
            "--max-length", "20", "--warmup", "1", *extra]


def _train_records(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s",)} for m in map(json.loads, lines)]


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, corpus, prompts):
    command = [sys.executable, "-m", "leanfit", "lstm"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run(command + _argv(tmp_path / "whole", corpus, prompts), capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = subprocess.run(command + _argv(tmp_path / "killed", corpus, prompts), capture_output=True, text=True,
                            env=dict(env, LEANFIT_TEST_FAULT="kill@16"), cwd=ROOT, timeout=600)  # in step 4's save
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run(command + ["--resume", str(tmp_path / "killed")], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _train_records(tmp_path / "killed") == _train_records(tmp_path / "whole")
    a, b = (load_file(str(tmp_path / name / "checkpoint" / "model.safetensors")) for name in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["resumes"] == [{"step": 2}]
    assert (tmp_path / "killed" / "samples.md").read_text() == (tmp_path / "whole" / "samples.md").read_text()


def _unigram_bits(text):
    counts = collections.Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


@pytest.mark.slow
def test_the_cpu_preset_falls_well_below_the_corpus_unigram_entropy(tmp_path):
    out = tmp_path / "cpu"
    done = subprocess.run([sys.executable, "-m", "leanfit", "lstm", "--preset", "cpu", "--device", "cpu", "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # one thread: steady on a shared machine
    assert done.returncode == 0, done.stderr[-2000:]
    s = json.loads((out / "run.json").read_text())["summary"]
    entropy = _unigram_bits(read_corpus(DEFAULT_CORPUS))
    assert s["val_bpc_start"] > entropy > s["val_bpc_end"] + 1.0, (s["val_bpc_start"], entropy, s["val_bpc_end"])
    assert f"-> {s['val_bpc_end']:.3f} at the end" in done.stdout
    for name in ("metrics.jsonl", "loss.png", "samples.md", "memory_report.json", "report.md", "report.html",
                 "checkpoint/model.safetensors", "checkpoint/vocab.json"):
        assert (out / name).is_file(), name


def _one_line_error(capsys, argv):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit from the parser
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("leanfit lstm: error: "), err
    assert "Traceback" not in err
    return err


def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys, corpus, prompts, monkeypatch):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "is empty" in _one_line_error(capsys, _argv(out, empty, prompts))
    short = tmp_path / "short.txt"
    short.write_text(corpus.read_text()[:40])
    assert "shorter than one window" in _one_line_error(capsys, _argv(out, short, prompts))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "needs CUDA" in _one_line_error(capsys, _argv(out, corpus, prompts, "--backend", "triton"))
    odd = tmp_path / "odd.txt"
    odd.write_text("Zebra\n")
    assert "outside the vocabulary" in _one_line_error(capsys, _argv(out, corpus, odd))
    assert "expected a number in [0, 1)" in _one_line_error(capsys, _argv(out, corpus, prompts, "--dropout", "1"))
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "--overwrite" in _one_line_error(capsys, _argv(out, corpus, prompts))
    assert "--resume" in _one_line_error(capsys, ["--resume", str(tmp_path / "nothing")])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_byte_vocabulary_round_trips_any_text():
    vocab = build_vocab("", "byte")
    text = "Dracula — ünïcode"
    assert vocab.size == 256 and vocab.decode(vocab.encode(text)) == text


def test_top_k_1_sampling_is_greedy_decoding_of_the_whole_prefix():
    vocab = build_vocab("abcdefgh ")
    model = CharLM(ModelShape(vocab.size, 8, 12, 2), "reference")
    text = sample(model, vocab, "ab", 12, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3))
    ids = vocab.encode("ab").tolist()
    with torch.no_grad():
        while len(ids) < 12:
            logits = F.linear(model(torch.tensor([ids]))[0][-1, 0], model.head.weight, model.head.bias)
            ids.append(int(logits.argmax()))
    assert text == vocab.decode(ids)


def test_ctrl_c_stops_after_the_step_and_a_resume_finishes_the_run(tmp_path, corpus, prompts, capsys):
    out = tmp_path / "run"
    config, flags, _, _ = cli.parse(_argv(out, corpus, prompts, "--save-every", "100"))

    def interrupt(run, record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    s = run_lstm(config, flags=flags, on_step=interrupt)
    assert s["status"] == "interrupted" and s["steps"] == 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert "interrupt: saving" in capsys.readouterr().err
    assert not (out / "samples.md").exists() and (out / "report.md").is_file()
    assert cli.main(["--resume", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["summary"]["steps"] == 6
